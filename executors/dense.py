"""Llama-style decoder layers with both weight layouts of shift parallelism.

Per layer and rank the weights are held in up to two layouts (see ``executors.shard``):

* ``tp``: W/P shards for plain TP over the P = tp*sp GPUs of a stage (all T tokens per GPU);
* ``sp_tp``: W/tp shards for Ulysses SP x TP (T/sp tokens per GPU).

With sp == 1 the two are the same and held once; a plan with sp > 1 and shift off holds only
``sp_tp``. Forward of one layer in SP x TP mode, local tokens ``x [T/sp, hidden]``::

    qkv = x W_qkv^T                       [T/sp, sp, hq + 2 hkv, D]  (rope on local positions)
    all-to-all over sp (chunk j -> sp rank j)  -> [T, hq + 2 hkv, D] = heads of shift rank r
    attention over all T tokens + KV cache      [T, hq * D]
    all-to-all back                              [T/sp, sp * hq * D]
    o = . W_o^T, all-reduce over tp; MLP (gate/up column, down row), all-reduce over tp

In TP mode the same with T tokens, no all-to-all, and all-reduces over the shift group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from executors.attention import LayerCache, attend
from executors.config import ModelArgs
from executors.parallel import Par, all_reduce, all_to_all
from executors.quant import Weight, cat, linear, read_linear
from executors.rope import apply as apply_rope
from executors.shard import HeadSplit, even_range, head_rows
from executors.weights import WeightSource
from plans.mesh import weight_layouts


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: normalise in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@dataclass
class Shard:
    """One layout's weights of one layer on one rank (plain tensors, or FP8 ``executors.quant``)."""

    qkv_w: Weight  # [(nq + 2 nkv) * D, hidden]
    qkv_b: torch.Tensor | None
    o_w: Weight  # [hidden, nq * D]
    gate_up_w: Weight  # [2 * I_local, hidden]
    down_w: Weight  # [hidden, I_local]
    nq: int  # query heads computed by this rank in this layout
    nkv: int


def load_shard(src: WeightSource, prefix: str, a: ModelArgs, q_heads: list[int], kv_heads: list[int],
               ff: tuple[int, int], dtype: torch.dtype, device: torch.device, fp8: bool = False) -> Shard:
    """Read one layout's slices of ``prefix`` (``model.layers.{i}.``): only the rows it needs."""
    D = a.head_dim
    qr, kr = head_rows(q_heads, D), head_rows(kv_heads, D)
    at, mp = prefix + "self_attn.", prefix + "mlp."

    def lin(name: str, runs: list[tuple[int, int]], dim: int = 0) -> Weight:
        return read_linear(src, name, runs, dim, fp8, dtype, device)

    bias = None
    if a.qkv_bias:
        bias = torch.cat([src.rows(at + "q_proj.bias", qr), src.rows(at + "k_proj.bias", kr),
                          src.rows(at + "v_proj.bias", kr)]).to(device, dtype)
    return Shard(
        qkv_w=cat([lin(at + "q_proj.weight", qr), lin(at + "k_proj.weight", kr), lin(at + "v_proj.weight", kr)]),
        qkv_b=bias, o_w=lin(at + "o_proj.weight", qr, dim=1),
        gate_up_w=cat([lin(mp + "gate_proj.weight", [ff]), lin(mp + "up_proj.weight", [ff])]),
        down_w=lin(mp + "down_proj.weight", [ff], dim=1), nq=len(q_heads), nkv=len(kv_heads),
    )


class DecoderLayer:
    def __init__(self, i: int, a: ModelArgs, par: Par, src: WeightSource, dtype: torch.dtype, shift: bool,
                 fp8: bool = False):
        self.a, self.par = a, par
        p = f"model.layers.{i}."
        self.ln1 = src.rows(p + "input_layernorm.weight").to(par.device, dtype)
        self.ln2 = src.rows(p + "post_attention_layernorm.weight").to(par.device, dtype)
        hs = HeadSplit(a.heads, a.kv_heads, par.P)
        self.layouts: dict[str, Shard] = {}
        layouts = weight_layouts(par.sp, shift)
        if "sp_tp" in layouts:  # SP x TP layout: W/tp
            self.layouts["sp_tp"] = load_shard(
                src, p, a, hs.q_heads_sptp(par.tp_i, par.sp), hs.kv_heads_sptp(par.tp_i, par.sp),
                even_range(a.intermediate, par.tp, par.tp_i, "intermediate_size / tp"), dtype, par.device, fp8)
        if "tp" in layouts:  # plain TP layout: W/P
            self.layouts["tp"] = load_shard(
                src, p, a, hs.q_heads(par.r), hs.kv_heads_of(par.r),
                even_range(a.intermediate, par.P, par.r, "intermediate_size / (tp*sp)"), dtype, par.device, fp8)
        kv = hs.kv_heads_of(par.r)
        g = a.heads // a.kv_heads
        kv_of_q = [kv.index(q // g) for q in hs.q_heads(par.r)]
        nq, nkv = len(kv_of_q), len(kv)
        grouped = nq % nkv == 0 and kv_of_q == [j // (nq // nkv) for j in range(nq)]
        self.kv_of_q = None if grouped else torch.tensor(kv_of_q, device=par.device)  # None: plain GQA
        self.nkv = len(kv)

    def forward(self, x: torch.Tensor, mode: str, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache,
                meta: "AttnMeta") -> torch.Tensor:
        """``x``: ``[T, hidden]`` (tp mode) or the local ``[T/sp, hidden]`` slice (sp_tp mode)."""
        a, par = self.a, self.par
        w = self.layouts[mode]
        D, n = a.head_dim, x.shape[0]
        h = rms_norm(x, self.ln1, a.rms_eps)
        qkv = linear(h, w.qkv_w, w.qkv_b)
        q, k, v = qkv.split([w.nq * D, w.nkv * D, w.nkv * D], dim=-1)
        q = apply_rope(q.reshape(n, w.nq, D), cos, sin)
        k = apply_rope(k.reshape(n, w.nkv, D), cos, sin)
        v = v.reshape(n, w.nkv, D)
        if mode == "sp_tp" and par.sp > 1:
            sp = par.sp
            hq, hkv = w.nq // sp, w.nkv // sp
            packed = torch.cat([q.reshape(n, sp, hq, D), k.reshape(n, sp, hkv, D), v.reshape(n, sp, hkv, D)], dim=2)
            packed = all_to_all(packed.transpose(0, 1), par.sp_group)  # [sp (src), n, hq+2hkv, D]
            packed = packed.reshape(sp * n, hq + 2 * hkv, D)
            q, k, v = packed.split([hq, hkv, hkv], dim=1)
            o = attend(q, k, v, cache, meta, self.kv_of_q)  # [T, hq*D]
            o = all_to_all(o.reshape(sp, n, hq * D), par.sp_group)  # [sp (head group), n, hq*D]
            o = o.transpose(0, 1).reshape(n, sp * hq * D)
            group = par.tp_group
        else:
            o = attend(q, k, v, cache, meta, self.kv_of_q)
            group = par.shift_group if par.sp > 1 else par.tp_group
        x = x + all_reduce(linear(o, w.o_w), group)
        h = rms_norm(x, self.ln2, a.rms_eps)
        gate, up = linear(h, w.gate_up_w).chunk(2, dim=-1)
        return x + all_reduce(linear(F.silu(gate) * up, w.down_w), group)


@dataclass
class AttnMeta:
    """Per micro-batch, shared by all layers (on the rank's device). A micro-batch in which
    every sequence has one query token (decodes) uses ``seq_keys`` instead of the packed mask."""

    slots: torch.Tensor  # [T_pad]
    key_slots: torch.Tensor  # [K]
    mask: torch.Tensor | None  # [T_pad, K] bool
    seq_keys: torch.Tensor | None = None  # [S, L_max] each sequence's key slots, padded with the scratch slot
    seq_mask: torch.Tensor | None = None  # [S, L_max] bool: real keys
    seqs: list[tuple[int, int, int, int]] | None = None  # CUDA prefill: per-sequence spans (attention.sequence_spans)
    table: torch.Tensor | None = None  # [S, nb] CUDA decodes: each sequence's KV blocks (keys read block-wise)
    block_size: int = 0
    seq_lens: torch.Tensor | None = None  # [S] keys of each sequence (with ``table``)
