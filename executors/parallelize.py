"""Every parallel mode of a stage, applied to the meta model (``executors.model``) in one step.

    parallelize(model, plan, stage, par)

turns the whole unsharded ``Transformer`` on the meta device into this rank's share: still on
meta, with each parameter's shard shape and the checkpoint rows it will read (``load`` then reads
only those). The modes, one section each below; the arithmetic of heads, ranks and modes is
``plans.mesh``'s (``HeadSplit``, ``even_range``, ``weight_layouts``, ``ParallelDims.mode_for``).

Notation: ``P = tp * sp`` GPUs per stage, the GPU at ``(tp_i, sp_i)`` is shift rank
``r = tp_i * sp + sp_i``; ``H``/``KV`` query/KV heads, ``D`` head dim, ``I`` MLP width, ``V`` vocab.

* **PP** (``cut_stage``): a stage keeps its layers ``[first, last]``, the embedding on the first
  stage, norm and lm_head on the last. Hidden states go point-to-point between stages
  (``worker.py``); the driver keeps one step per pipeline lane in flight (``engine.py``).
* **TP** (``TP_PLAN``, degree P, rank r): column-parallel fused QKV (rows of the query heads
  ``[r H/P, (r+1) H/P)`` and of the KV heads they read, replicated when KV < P) and gate/up (rows
  ``[r I/P, (r+1) I/P)``); row-parallel o and down, all-reduced over the stage's P GPUs.
* **SP x TP** (``SP_TP_PLAN``, Ulysses): the same table over tp (rank tp_i: the TP blocks of shift
  ranks ``tp_i sp + j``, j < sp), all-reduced over tp; tokens split over sp (``split_tokens`` /
  ``gather_tokens``) and the attention core wrapped by ``Ulysses``: all-to-all of packed QKV to a
  head split, attention over all tokens, all-to-all back.
* **Shift**: both layouts per layer (``weight_layouts``: W/P for TP mode, W/tp for SP x TP mode);
  the mode per micro-batch is ``ParallelDims.mode_for`` (called by ``engine.py``). After the
  all-to-all sp rank j of tp rank tp_i holds the heads of shift rank ``tp_i sp + j`` -- its TP
  heads -- so one KV cache serves both modes.
* **Vocab-parallel ends** (``ENDS_PLAN``): embedding and lm_head rows ``[r V/P, (r+1) V/P)`` over
  the P GPUs (whole when V % P != 0).
* **DP**: independent replicas, schedulers of their own (``engine.py``); nothing to shard.
* **Vision encoder**: the tower's TP split (``VISION_TP_PLAN``, ``parallelize_tower``) is here;
  where the tower runs and how embeddings reach stage 0 is the placement (``encoders.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from executors.attention import LayerCache
from executors.config import ModelArgs
from executors.layers import Checkpointed
from executors.model import AttnMeta, Transformer
from executors.parallel import Par, all_gather_cat, all_to_all
from plans.mesh import HeadSplit, Mode, even_range, weight_layouts
from plans.schema import Plan, Stage


@dataclass(frozen=True)
class Split:
    """One weight layout's share on this rank: the query and KV heads it computes (of ``head_dim``
    rows each), MLP rows ``ff = [lo, hi)``, the group row-parallel outputs are all-reduced over, the
    Ulysses group (SP x TP with sp > 1), and ``kv_of_q`` (local query head -> local KV head when KV
    heads are replicated, else None). The vision tower's TP uses it with no KV heads."""

    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    ff: tuple[int, int]
    head_dim: int
    group: Any
    sp_group: Any = None
    sp: int = 1
    kv_of_q: tuple[int, ...] | None = None


class Style(Protocol):
    def apply(self, m: nn.Module, s: Any) -> nn.Module | None:
        """Shard ``m`` in place (meta shapes, ``take``, groups); return a module to put in its place, or None."""


def head_rows(heads: list[int], head_dim: int) -> list[tuple[int, int]]:
    """Row ranges ``[h D, (h+1) D)`` of a projection weight for a list of heads, adjacent runs merged
    (a KV head listed twice, replicated for two sp ranks, is read twice)."""
    runs: list[tuple[int, int]] = []
    for h in heads:
        s, e = h * head_dim, (h + 1) * head_dim
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((s, e))
    return runs


def _narrow(m: Checkpointed, take: tuple[list[tuple[int, int]], ...], dim: int) -> None:
    """``m`` reads runs ``take[i]`` of part i along ``dim``: its weight becomes ``[sum of runs, in]``
    (dim 0) or ``[out, sum of runs]`` (dim 1); a bias follows the rows."""
    n = sum(e - s for runs in take for s, e in runs)
    m.whole = m.whole or tuple(m.weight.shape)
    shape = list(m.weight.shape)
    shape[dim] = n
    m.weight = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
    if dim == 0 and getattr(m, "bias", None) is not None:
        m.bias = nn.Parameter(torch.empty(n, device="meta"), requires_grad=False)
    m.take, m.dim = take, dim


# ---------------------------------------------------------------- TP: column / row styles


class Heads:
    """``attn``: the heads it computes (and, with replicated KV, which KV head each query head reads)."""

    def apply(self, m: nn.Module, s: Split) -> None:
        m.nq, m.nkv = len(s.q_heads), len(s.kv_heads)
        m.core.kv_of_q = None if s.kv_of_q is None else torch.tensor(s.kv_of_q, device="cpu")


class ColwiseHeads:
    """Fused ``q | k | v`` rows: the query heads' rows of part 0, the KV heads' rows of parts 1, 2."""

    def apply(self, m: nn.Module, s: Split) -> None:
        kv = head_rows(list(s.kv_heads), s.head_dim)
        _narrow(m, (head_rows(list(s.q_heads), s.head_dim), kv, kv), 0)


class RowwiseHeads:
    """Input columns of the query heads; output all-reduced."""

    def apply(self, m: nn.Module, s: Split) -> None:
        _narrow(m, (head_rows(list(s.q_heads), s.head_dim),), 1)
        m.group = s.group


class Colwise:
    """Rows ``ff`` of every fused part (gate, up)."""

    def apply(self, m: nn.Module, s: Split) -> None:
        _narrow(m, tuple([s.ff] for _ in m.parts), 0)


class Rowwise:
    """Input columns ``ff``; output all-reduced."""

    def apply(self, m: nn.Module, s: Split) -> None:
        _narrow(m, ([s.ff],), 1)
        m.group = s.group


TP_PLAN: dict[str, Style] = {
    "attn": Heads(),
    "attn.qkv": ColwiseHeads(),
    "attn.o": RowwiseHeads(),
    "mlp.gate_up": Colwise(),
    "mlp.down": Rowwise(),
}


def tp_split(a: ModelArgs, par: Par, hs: HeadSplit) -> Split:
    """TP of degree P: shift rank r's heads and MLP rows; all-reduce over the stage's P GPUs."""
    return Split(tuple(hs.q_heads(par.r)), tuple(hs.kv_heads_of(par.r)),
                 even_range(a.intermediate, par.P, par.r, "intermediate_size / (tp*sp)"), a.head_dim,
                 group=par.shift_group if par.sp > 1 else par.tp_group, kv_of_q=kv_of_q(hs, par.r))


# ---------------------------------------------------------------- SP x TP (Ulysses)


class UlyssesCore(nn.Module):
    """Attention over all ``T = sp n`` tokens for ``1/sp`` of this rank's heads. In: local tokens
    ``q [n, sp hq, D]``, ``k, v [n, sp hkv, D]`` (head group j for sp rank j). All-to-all over sp
    -> ``[T, hq + 2 hkv, D]`` (the heads of shift rank ``tp_i sp + sp_i``), ``core`` ->
    ``[T, hq D]``, all-to-all back -> ``[n, sp hq D]`` in the rank's head order."""

    def __init__(self, core: nn.Module, group: Any, sp: int):
        super().__init__()
        self.core, self.group, self.sp = core, group, sp

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                meta: AttnMeta) -> torch.Tensor:
        n, D, sp = q.shape[0], q.shape[-1], self.sp
        hq, hkv = q.shape[1] // sp, k.shape[1] // sp
        packed = torch.cat([q.reshape(n, sp, hq, D), k.reshape(n, sp, hkv, D), v.reshape(n, sp, hkv, D)], dim=2)
        packed = all_to_all(packed.transpose(0, 1), self.group)  # [sp (source), n, hq + 2 hkv, D]
        q, k, v = packed.reshape(sp * n, hq + 2 * hkv, D).split([hq, hkv, hkv], dim=1)
        o = self.core(q, k, v, cache, meta)  # [T, hq D]
        o = all_to_all(o.reshape(sp, n, hq * D), self.group)  # [sp (head group), n, hq D]
        return o.transpose(0, 1).reshape(n, sp * hq * D)


class Ulysses:
    """``attn.core``: wrapped in the sequence-parallel all-to-alls."""

    def apply(self, m: nn.Module, s: Split) -> nn.Module:
        return UlyssesCore(m, s.sp_group, s.sp)


SP_TP_PLAN: dict[str, Style] = {**TP_PLAN, "attn.core": Ulysses()}


def sp_tp_split(a: ModelArgs, par: Par, hs: HeadSplit) -> Split:
    """SP x TP: tp rank tp_i's heads (the TP blocks of shift ranks ``tp_i sp + j``) and MLP rows
    ``[tp_i I/tp, (tp_i+1) I/tp)``; all-reduce over tp, all-to-all over sp."""
    return Split(tuple(hs.q_heads_sptp(par.tp_i, par.sp)), tuple(hs.kv_heads_sptp(par.tp_i, par.sp)),
                 even_range(a.intermediate, par.tp, par.tp_i, "intermediate_size / tp"), a.head_dim, group=par.tp_group,
                 sp_group=par.sp_group, sp=par.sp, kv_of_q=kv_of_q(hs, par.r))


def split_tokens(x: torch.Tensor, pos: torch.Tensor, par: Par) -> tuple[torch.Tensor, torch.Tensor]:
    """This sp rank's tokens: ``x [T, H]`` padded to ``T_pad = ceil(T / sp) sp`` rows, rows
    ``[sp_i T_pad/sp, (sp_i+1) T_pad/sp)``; rotary ``pos`` (``[T]`` or M-RoPE ``[3, T]``) sliced
    on the token axis."""
    T, sp = x.shape[0], par.sp
    t_pad = -(-T // sp) * sp
    n = t_pad // sp
    lo = par.sp_i * n
    return F.pad(x, (0, 0, 0, t_pad - T))[lo:lo + n], F.pad(pos, (0, t_pad - T))[..., lo:lo + n]


def gather_tokens(x: torch.Tensor, T: int, par: Par) -> torch.Tensor:
    """All sp ranks' ``[T_pad/sp, H]`` back to ``[T, H]`` on each."""
    return all_gather_cat(x, par.sp_group, par.sp)[:T]


# ---------------------------------------------------------------- shift: both layouts

LAYOUT_PLANS: dict[str, dict[str, Style]] = {"tp": TP_PLAN, "sp_tp": SP_TP_PLAN}
SPLITS = {"tp": tp_split, "sp_tp": sp_tp_split}


def kv_of_q(hs: HeadSplit, r: int) -> tuple[int, ...] | None:
    """For shift rank r's query heads, the index of the KV head each reads among r's KV heads;
    None when that is plain GQA (query head j reads KV head ``j // (hq / hkv)``)."""
    kv = hs.kv_heads_of(r)
    g = hs.heads // hs.kv_heads
    of_q = [kv.index(q // g) for q in hs.q_heads(r)]
    nq, nkv = len(of_q), len(kv)
    grouped = nq % nkv == 0 and of_q == [j // (nq // nkv) for j in range(nq)]
    return None if grouped else tuple(of_q)


# ---------------------------------------------------------------- vocab-parallel ends


@dataclass(frozen=True)
class VocabSplit:
    """Rank ``i`` of ``n`` in the stage's shift group; ``vocab`` rows."""

    i: int
    n: int
    group: Any
    vocab: int


class VocabParallel:
    """Rows ``[i V/n, (i+1) V/n)`` of a ``[V, H]`` table; whole (no collective) when V % n != 0."""

    def apply(self, m: nn.Module, s: VocabSplit) -> None:
        if s.n == 1 or s.vocab % s.n:
            return
        k = s.vocab // s.n
        _narrow(m, ([(s.i * k, (s.i + 1) * k)],), 0)
        m.lo, m.group, m.size = s.i * k, s.group, s.n


ENDS_PLAN: dict[str, VocabParallel] = {"embed": VocabParallel(), "lm_head": VocabParallel()}


# ---------------------------------------------------------------- the vision tower's TP


class StackedHeads:
    """``qkv [3 E, E]`` with q, k, v stacked in one tensor: this rank's heads' rows of each third."""

    def apply(self, m: nn.Module, s: Split) -> None:
        E = m.weight.shape[0] // 3
        ((lo, hi),) = head_rows(list(s.q_heads), s.head_dim)
        _narrow(m, ([(j * E + lo, j * E + hi) for j in range(3)],), 0)


class VisionHeads:
    """The tower's ``attn``: the heads it computes."""

    def apply(self, m: nn.Module, s: Split) -> None:
        m.heads = len(s.q_heads)


VISION_TP_PLAN: dict[str, Style] = {
    "attn": VisionHeads(),
    "attn.qkv": StackedHeads(),
    "attn.proj": RowwiseHeads(),
    "mlp.fc1": Colwise(),  # Qwen2-VL
    "mlp.fc2": Rowwise(),
    "mlp.gate_proj": Colwise(),  # Qwen2.5-VL
    "mlp.up_proj": Colwise(),
    "mlp.down_proj": Rowwise(),
}


def parallelize_tower(tower: nn.Module, group: Any, rank: int, size: int) -> nn.Module:
    """Encoder TP over ``size`` GPUs (``ParallelDims.encoder().tp``): rank ``rank`` of each block
    computes heads ``[rank nh, (rank+1) nh)`` (``nh = heads / size``) and MLP columns
    ``[rank F/size, (rank+1) F/size)``; proj and MLP-out all-reduce over ``group``. Patch
    embedding and merger stay whole."""
    v = tower.v
    heads = range(*even_range(v.num_heads, size, rank, "vision num_heads / (tp*sp)"))
    s = Split(tuple(heads), (), even_range(v.mlp_dim, size, rank, "vision MLP width / (tp*sp)"),
              v.embed_dim // v.num_heads, group)
    for block in tower.blocks:
        apply_plan(block, VISION_TP_PLAN, s)
    return tower


# ---------------------------------------------------------------- PP and the one step


def cut_stage(model: Transformer, stage: Stage) -> None:
    """PP: drop the layers outside ``[first_layer, last_layer]`` and the ends the stage lacks."""
    for k in list(model.layers.keys()):
        if not stage.first_layer <= int(k) <= stage.last_layer:
            del model.layers[k]
    if not stage.embedding:
        model.embed = None
    if not stage.lm_head:
        model.norm = model.lm_head = None


def apply_plan(root: nn.Module, table: dict[str, Any], s: Any) -> None:
    """Apply each ``path -> style`` of ``table`` to ``root``'s submodule at ``path`` (absent ones skipped)."""
    for path, style in table.items():
        parent, _, leaf = path.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        m = getattr(owner, leaf, None)
        if m is None:
            continue
        new = style.apply(m, s)
        if new is not None:
            setattr(owner, leaf, new)


def parallelize(model: Transformer, plan: Plan, stage: Stage, par: Par) -> Transformer:
    """This rank's share of ``stage`` (in place, on meta): PP cut, each layer's weight layouts
    (``weight_layouts``: shift holds both) sharded by their tables, vocab-parallel ends."""
    a = model.a
    cut_stage(model, stage)
    hs = HeadSplit(a.heads, a.kv_heads, par.P)
    modes: tuple[Mode, ...] = weight_layouts(par.sp, plan.shift.enabled and par.sp > 1)
    splits = {mode: SPLITS[mode](a, par, hs) for mode in modes}
    for layer in model.layers.values():
        whole = layer.layouts["tp"]
        layer.layouts = nn.ModuleDict({mode: copy.deepcopy(whole) for mode in modes})
        for mode, lay in layer.layouts.items():
            apply_plan(lay, LAYOUT_PLANS[mode], splits[mode])
    apply_plan(model, ENDS_PLAN, VocabSplit(par.r, par.P, par.shift_group if par.P > 1 else None, a.vocab))
    return model
