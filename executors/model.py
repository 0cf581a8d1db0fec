"""The Llama-style decoder (Llama 3.x, Qwen2/2.5, Mistral, the Qwen2-VL language model) as an
``nn.Module`` tree: built whole on the meta device, cut and sharded by ``executors.parallelize``,
then loaded in place from a ``WeightSource`` (each parameter reads only this rank's rows)::

    with torch.device("meta"):
        model = Transformer(args)             # the unsharded model: shapes only, no memory
    parallelize(model, plan, stage, par)      # PP cut, TP / SP x TP / shift layouts, vocab-parallel ends
    load(model, src, device, dtype, fp8)      # meta parameters -> this rank's real tensors (layers.py)

The tree, with the HF checkpoint tensors each module reads (fused ones as row-concatenations);
``H`` hidden, ``D`` head dim, ``Hq``/``Hkv`` query/KV heads, ``I`` MLP width, ``V`` vocab::

    embed                    VocabEmbedding [V, H]              model.embed_tokens
    layers["i"]              DecoderLayer                       model.layers.i.*
      input_layernorm        RMSNorm [H]
      post_attention_layernorm RMSNorm [H]
      layouts[mode]          Layout, one per weight layout a rank holds ("tp", "sp_tp")
        attn.qkv             Linear [(Hq + 2 Hkv) D, H] (+ bias)   self_attn.{q,k,v}_proj
        attn.core            AttentionCore: paged KV cache + attention (executors.attention.attend)
        attn.o               Linear [H, Hq D] (+ bias)          self_attn.o_proj
        mlp.gate_up          Linear [2 I, H] (+ bias)           mlp.{gate,up}_proj
        mlp.down             Linear [H, I] (+ bias)             mlp.down_proj

(Biases as the config has them: Qwen2's QKV; Llama's ``attention_bias`` on QKV and o, ``mlp_bias``
on the MLP's three products. A row-parallel product's bias is added once, after its all-reduce.)
    norm                     RMSNorm [H]                        model.norm
    lm_head                  LMHead [V, H]                      lm_head (the embedding when tied)

Unsharded, ``layouts`` holds one ``"tp"`` layout of degree 1. The parallel styles narrow a module's
parameter shapes and record which rows it reads (``take`` along ``dim``), set the group a
row-parallel output is all-reduced over, and may swap a submodule (Ulysses wraps ``attn.core``);
the forward below is the same on every mesh.

Forward of one layer on ``x [n, H]`` (rotary ``cos, sin [n, D]``)::

    h = x + o(attend(rope(q), rope(k), v))      q, k, v = split(qkv(rms(x)))   [n, hq|hkv, D]
    y = h + down(silu(gate) * up)               gate, up = chunk(gate_up(rms(h)))

Row-parallel ``o`` and ``down`` leave their all-reduce to the next norm: a layer returns its MLP
term before the sum and the stream before it, and ``RMSNorm.add`` completes the sum, adds the
stream and normalises (one kernel over symmetric memory where the group has one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from executors.attention import LayerCache, attend
from executors.config import ModelArgs
from executors.layers import Checkpointed, Linear, RMSNorm, param
from executors.parallel import all_gather_cat, all_reduce
from executors.rope import apply as apply_rope
from executors.rope import cos_sin
from executors.vision import vision_shapes


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
    dec_rows: torch.Tensor | None = None  # [S_d] CUDA mixed steps: token rows of the decodes read via ``table``
    prefill: Any = None  # CUDA: paged_prefill.PrefillInputs, the sequences the Triton kernel attends (all of
    # ``seqs``; in a captured step, every sequence, with ``seqs`` None)


# ---------------------------------------------------------------- the ends


class VocabEmbedding(Checkpointed):
    """``tokens [T] -> [T, H]``. Vocab-parallel (``group`` set): this rank holds rows
    ``[lo, lo + V/P)``; other ids look up zeros and the all-reduce sums the shards."""

    def __init__(self, vocab: int, dim: int, part: str):
        super().__init__((part,))
        self.weight = param(vocab, dim)
        self.lo = 0
        self.group: Any = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(tokens, self.weight)
        n = self.weight.shape[0]
        local = tokens - self.lo
        ok = (local >= 0) & (local < n)
        x = F.embedding(local.clamp(0, n - 1), self.weight) * ok[:, None].to(self.weight.dtype)
        return all_reduce(x, self.group)


class LMHead(Checkpointed):
    """``x [S, H] -> logits [S, V]`` fp32. Vocab-parallel (``group`` of ``size`` ranks): each rank
    computes ``[S, V/P]`` and the shards are all-gathered in rank order."""

    def __init__(self, vocab: int, dim: int, part: str):
        super().__init__((part,))
        self.weight = param(vocab, dim)
        self.tied = "model.embed_tokens"  # checkpoints of tied models may lack lm_head.weight
        self.group: Any = None
        self.size = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight).float()
        if self.group is None:
            return logits
        return all_gather_cat(logits.t().contiguous(), self.group, self.size).t()


# ---------------------------------------------------------------- the decoder layer


class AttentionCore(nn.Module):
    """Writes the new keys to the paged cache and attends: ``q [n, hq, D]``, ``k, v [n, hkv, D]``
    -> ``[n, hq * D]``. ``kv_of_q [hq]`` maps each local query head to its local KV head when KV
    heads are replicated over ranks (None: plain GQA, query head j reads KV head ``j // (hq/hkv)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kv_of_q", None, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttnMeta) -> torch.Tensor:
        return attend(q, k, v, cache, meta, self.kv_of_q)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, prefix: str):
        super().__init__()
        D, p = a.head_dim, prefix + "self_attn."
        self.head_dim, self.nq, self.nkv = D, a.heads, a.kv_heads  # heads computed here (styles narrow them)
        self.qkv = Linear(a.hidden, (a.heads + 2 * a.kv_heads) * D, (p + "q_proj", p + "k_proj", p + "v_proj"),
                          bias=a.qkv_bias)
        self.core: nn.Module = AttentionCore()
        self.o = Linear(a.heads * D, a.hidden, (p + "o_proj",), bias=a.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache,
                meta: AttnMeta) -> torch.Tensor:
        """``x [n, H]`` -> ``[n, H]``, this rank's term of the row-parallel ``o`` (``o.finish`` sums it)."""
        n, D = x.shape[0], self.head_dim
        qk, v = self.qkv(x).split([(self.nq + self.nkv) * D, self.nkv * D], dim=-1)
        q, k = apply_rope(qk.reshape(n, self.nq + self.nkv, D), cos, sin).split([self.nq, self.nkv], dim=1)  # one pass
        return self.o.partial(self.core(q, k, v.reshape(n, self.nkv, D), cache, meta))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs, prefix: str):
        super().__init__()
        p = prefix + "mlp."
        self.gate_up = Linear(a.hidden, 2 * a.intermediate, (p + "gate_proj", p + "up_proj"), bias=a.mlp_bias)
        self.down = Linear(a.intermediate, a.hidden, (p + "down_proj",), bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``down(silu(gate) * up)``, this rank's term of the row-parallel ``down`` (``down.finish`` sums
        it); the gate is applied in ``down``'s loads where the GEMV serves (``quant.linear``)."""
        return self.down.partial(self.gate_up(x), gated=True)


class Layout(nn.Module):
    """One weight layout of a layer's attention and MLP (shift parallelism holds two per layer)."""

    def __init__(self, a: ModelArgs, prefix: str):
        super().__init__()
        self.attn = Attention(a, prefix)
        self.mlp = FeedForward(a, prefix)


class DecoderLayer(nn.Module):
    def __init__(self, a: ModelArgs, i: int):
        super().__init__()
        p = f"model.layers.{i}."
        self.input_layernorm = RMSNorm(a.hidden, a.rms_eps, p + "input_layernorm")
        self.post_attention_layernorm = RMSNorm(a.hidden, a.rms_eps, p + "post_attention_layernorm")
        self.layouts = nn.ModuleDict({"tp": Layout(a, p)})

    def forward(self, x: torch.Tensor, mode: str, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache,
                meta: AttnMeta, residual: torch.Tensor | None = None,
                prev: Linear | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the residual stream, through the weights of layout ``mode``. ``x [n, H]``:
        the stream itself (``residual`` None), or the previous layer's MLP output as this rank's
        term of its row-parallel sum, ``residual`` the stream before it and ``prev`` that layer's
        ``mlp.down`` (the sum, with its bias, is completed here, with the add and the input norm:
        ``RMSNorm.add``). Returns ``(m, h)``: this layer's MLP term and the stream before it; the
        layer's output is ``h + mlp.down.finish(m)``."""
        w = self.layouts[mode]
        if residual is None:
            h, y = x, self.input_layernorm(x)
        else:
            h, y = self.input_layernorm.add(x, residual, prev)
        h, y = self.post_attention_layernorm.add(w.attn(y, cos, sin, cache, meta), h, w.attn.o)
        return w.mlp(y), h


# ---------------------------------------------------------------- the model


class Transformer(nn.Module):
    """The whole decoder; after ``parallelize`` one stage's share (``embed`` / ``norm`` /
    ``lm_head`` None on stages without them, ``layers`` keyed by global layer index)."""

    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.embed: VocabEmbedding | None = VocabEmbedding(a.vocab, a.hidden, "model.embed_tokens")
        self.layers = nn.ModuleDict({str(i): DecoderLayer(a, i) for i in range(a.layers)})
        self.norm: RMSNorm | None = RMSNorm(a.hidden, a.rms_eps, "model.norm")
        self.lm_head: LMHead | None = LMHead(a.vocab, a.hidden, "model.embed_tokens" if a.tie_embeddings else "lm_head")
        freq = torch.tensor(a.rope_inv_freq, dtype=torch.float32, device="cpu")  # from the config, never meta
        self.register_buffer("freq", freq, persistent=False)  # [D/2]
        self.rope_scale = a.rope_scale

    def forward(self, x: torch.Tensor, pos: torch.Tensor, caches: list[LayerCache], meta: AttnMeta,
                mode: str = "tp") -> torch.Tensor:
        """``tokens [T]`` (a stage with the embedding) or hidden ``[T, H]`` at rotary positions
        ``pos [T]`` (M-RoPE ``[3, T]``) -> ``[T, V]`` fp32 logits (a stage with the lm_head) or
        ``[T, H]``."""
        if self.embed is not None:
            x = self.embed(x)
        x = self.layers_forward(x, pos, caches, meta, mode)
        return x if self.lm_head is None else self.logits(x)

    def layers_forward(self, x: torch.Tensor, pos: torch.Tensor, caches: list[LayerCache], meta: AttnMeta,
                       mode: str) -> torch.Tensor:
        """The layers on ``x [n, H]``, all on the device: no host synchronisation (CUDA graphs)."""
        cos, sin = cos_sin(pos, self.freq, self.rope_scale, self.a.mrope_section)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        h = down = None  # the residual stream before the last layer's MLP term x, and that layer's down product
        for layer, cache in zip(self.layers.values(), caches):
            x, h = layer(x, mode, cos, sin, cache, meta, h, down)
            down = layer.layouts[mode].mlp.down
        return x if down is None else down.finish(x, h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: ``x [S, H]`` -> ``[S, V]`` fp32."""
        return self.lm_head(self.norm(x))


def checkpoint_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of the whole model (what seeded random weights generate)."""
    H, D, I = a.hidden, a.head_dim, a.intermediate
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (a.vocab, H), "model.norm.weight": (H,)}
    if not a.tie_embeddings:
        s["lm_head.weight"] = (a.vocab, H)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  p + "self_attn.q_proj.weight": (a.heads * D, H), p + "self_attn.k_proj.weight": (a.kv_heads * D, H),
                  p + "self_attn.v_proj.weight": (a.kv_heads * D, H), p + "self_attn.o_proj.weight": (H, a.heads * D),
                  p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)})
        if a.qkv_bias:
            s.update({p + "self_attn.q_proj.bias": (a.heads * D,), p + "self_attn.k_proj.bias": (a.kv_heads * D,),
                      p + "self_attn.v_proj.bias": (a.kv_heads * D,)})
        if a.o_bias:
            s[p + "self_attn.o_proj.bias"] = (H,)
        if a.mlp_bias:
            s.update({p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,), p + "mlp.down_proj.bias": (H,)})
    if a.vision is not None:
        s.update(vision_shapes(a.vision))
    return s
