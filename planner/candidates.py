"""Candidate meshes: every (dp, pp, tp, sp) and encoder placement worth giving to the ILP.

Pure arithmetic over ``ModelFacts`` and ``SearchSpace`` (plain numbers), so it is testable
without a graph or a cost model. Rules, for G GPUs of which k go to a dedicated encoder:

* ``dp * pp * tp * sp = G - k``  (``<=`` when the objective is ``min_gpus``);
* query heads divisible by ``P = tp * sp``; KV heads divisible by P, or (fewer KV heads than
  P) P divisible by the KV heads, each KV head then replicated ``P / kv_heads`` times;
* the P GPUs of a stage inside one node (``gpus_per_node % P == 0``; on a single node
  ``P <= gpus_per_node`` is enough, the LLM ranks coming first) unless cross-node TP is
  allowed; ``pp <= layers``;
* memory, a necessary condition (the ILP decides the exact split): with the best split, a
  stage GPU holds on average ``W/(pp*tp)`` of the text weights, plus the shift copy
  ``W/(pp*P)`` when sp > 1, plus the minimum KV budget, plus activations -- that must fit.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from plans.mesh import ENCODER_PLACEMENTS, ParallelDims, heads_problem, kv_heads_per_gpu, mesh_label


@dataclass(frozen=True)
class ModelFacts:
    """Sizes in GB (1e9 bytes) in the spec's dtypes, unsharded."""

    layers: int
    heads: int
    kv_heads: int
    layer_weights_gb: float  # one decoder layer
    embed_gb: float
    head_gb: float  # final norm + lm_head (0 when tied to the embedding and shared)
    kv_gb_per_token_head: float  # K and V of one KV head, one token, one layer
    vision_gb: float = 0.0  # whole vision tower + merger
    vision_heads: int = 0  # 0: no vision encoder
    weights_dtype: str = "bf16"

    @property
    def has_vision(self) -> bool:
        return self.vision_heads > 0

    @property
    def text_weights_gb(self) -> float:
        return self.layers * self.layer_weights_gb + self.embed_gb + self.head_gb


@dataclass(frozen=True)
class SearchSpace:
    gpus: int
    gpus_per_node: int
    capacity_gb: float  # usable memory per GPU
    hbm_gb: float = 0.0  # raw device memory per GPU (0: same as capacity_gb), for the world-level message
    activations_gb: float = 0.0  # per GPU, reserved for the step's activations
    min_kv_tokens: int = 0  # KV budget each replica must hold at least
    allow_cross_node_tp: bool = False
    allow_fewer_gpus: bool = False  # min_gpus: meshes may leave GPUs idle
    dp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    tp: tuple[int, ...] | None = None
    sp: tuple[int, ...] | None = None
    placements: tuple[str, ...] = ENCODER_PLACEMENTS
    dedicated_gpus: tuple[int, ...] | None = None  # None: 1, 2 and 4 where they leave GPUs for the LLM
    engine_check: Callable[[int, int, int, int], str | None] | None = None  # (dp, pp, tp, sp) -> the engine's limit


@dataclass(frozen=True)
class Candidate:
    dp: int
    pp: int
    tp: int
    sp: int
    placements: tuple[str, ...] = ()  # encoder placements the ILP may choose from; () for text models
    dedicated_gpus: int = 0

    @property
    def shift_degree(self) -> int:
        return self.tp * self.sp

    @property
    def llm_gpus(self) -> int:
        return self.dp * self.pp * self.tp * self.sp

    @property
    def gpus(self) -> int:
        return self.llm_gpus + self.dedicated_gpus

    @property
    def mesh_label(self) -> str:
        return mesh_label(self.dp, self.pp, self.tp, self.sp)

    @property
    def label(self) -> str:
        return self.mesh_label + (f"+vision{self.dedicated_gpus}" if self.dedicated_gpus else "")


@dataclass(frozen=True)
class Rejected:
    label: str
    reason: str


@dataclass(frozen=True)
class CandidateSet:
    candidates: tuple[Candidate, ...]
    rejected: tuple[Rejected, ...] = field(default_factory=tuple)


def heads_ok(facts: ModelFacts, tp: int, sp: int) -> str | None:
    """None when the heads split evenly over P = tp*sp, else the reason (``plans.mesh.heads_problem``)."""
    return heads_problem(facts.heads, facts.kv_heads, tp, sp)


def min_memory_per_gpu(facts: ModelFacts, space: SearchSpace, c: Candidate) -> tuple[float, str]:
    """Lower bound of the per-GPU memory of the best split, and its arithmetic."""
    P = c.shift_degree
    w = facts.text_weights_gb / (c.pp * c.tp)
    shift = facts.text_weights_gb / (c.pp * P) if c.sp > 1 else 0.0
    kv = space.min_kv_tokens * facts.kv_gb_per_token_head * kv_heads_per_gpu(facts.kv_heads, P) * facts.layers / c.pp
    vis = min((vision_gb_per_gpu(facts, c, pl) for pl in c.placements), default=0.0) / c.pp
    total = w + shift + kv + vis + space.activations_gb
    text = (f"weights {w:.1f}" + (f" + shift copy {shift:.1f}" if shift else "") + f" + KV for {space.min_kv_tokens} "
            f"tokens {kv:.1f}" + (f" + vision {vis:.1f}" if vis else "") + f" + activations {space.activations_gb:.1f}"
            f" = {total:.1f} GB per GPU > {space.capacity_gb:.1f} GB")
    return total, text


def vision_gb_per_gpu(facts: ModelFacts, c: Candidate, placement: str) -> float:
    """Encoder weights on one GPU of the stage(s) that run it: the tower / its TP degree (dedicated:
    none on LLM GPUs)."""
    enc = ParallelDims(pp=c.pp, tp=c.tp, sp=c.sp, placement=placement, dedicated_gpus=c.dedicated_gpus,
                       vision=True).encoder()
    return facts.vision_gb / enc.tp if enc.stages else 0.0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _allowed(value: int, limit: tuple[int, ...] | None) -> bool:
    return limit is None or value in limit


def enumerate_candidates(facts: ModelFacts, space: SearchSpace) -> CandidateSet:
    """All meshes that pass the rules above, in a stable order, plus why the others failed."""
    out: list[Candidate] = []
    rejected: list[Rejected] = []
    vision_options: list[tuple[int, tuple[str, ...]]] = [(0, ())]
    if facts.has_vision:
        shared = tuple(p for p in space.placements if p != "dedicated")
        vision_options = [(0, shared)] if shared else []
        if "dedicated" in space.placements:
            ks = space.dedicated_gpus or tuple(k for k in (1, 2, 4) if k < space.gpus)
            vision_options += [(k, ("dedicated",)) for k in ks if k < space.gpus]
    for k, placements in vision_options:
        left = space.gpus - k
        totals = range(1, left + 1) if space.allow_fewer_gpus else [left]
        for n in totals:
            for dp, pp, tp in itertools.product(_divisors(n), repeat=3):
                if n % (dp * pp * tp):
                    continue
                sp = n // (dp * pp * tp)
                c = Candidate(dp, pp, tp, sp, _usable(facts, placements, tp * sp, pp), k)
                why = _check(facts, space, c) if (c.placements or not placements) else (
                    f"the encoder's {facts.vision_heads} heads are not divisible by tp*sp = {tp * sp}")
                if why:
                    rejected.append(Rejected(c.label, why))
                else:
                    out.append(c)
    out.sort(key=lambda c: (c.dedicated_gpus, -c.llm_gpus, c.dp, c.pp, c.tp, c.sp))
    return CandidateSet(tuple(out), tuple(rejected))


def _usable(facts: ModelFacts, placements: tuple[str, ...], P: int, pp: int = 1) -> tuple[str, ...]:
    """Drop stage0_tp when the encoder's heads do not split over P GPUs, and all_dp when it is the
    same as stage0_dp (one stage: "all GPUs" are stage 0's)."""
    out = tuple(p for p in placements if not (p == "stage0_tp" and facts.vision_heads % P))
    if pp == 1 and "stage0_dp" in out:
        out = tuple(p for p in out if p != "all_dp")
    return out


def _check(facts: ModelFacts, space: SearchSpace, c: Candidate) -> str | None:
    for axis in ("dp", "pp", "tp", "sp"):
        if not _allowed(getattr(c, axis), getattr(space, axis)):
            return f"{axis} = {getattr(c, axis)} is outside search.{axis} = {list(getattr(space, axis))}"
    if c.pp > facts.layers:
        return f"pp = {c.pp} exceeds the {facts.layers} decoder layers"
    if space.engine_check is not None and (why := space.engine_check(c.dp, c.pp, c.tp, c.sp)):
        return why
    why = heads_ok(facts, c.tp, c.sp)
    if why:
        return why
    P = c.shift_degree
    one_node = space.gpus <= space.gpus_per_node
    if not space.allow_cross_node_tp and (P > space.gpus_per_node or (space.gpus_per_node % P and not one_node)):
        return (f"tp*sp = {P} does not fit inside a node of {space.gpus_per_node} GPUs "
                "(set search.allow_cross_node_tp to allow it)")
    if c.dedicated_gpus and facts.vision_gb + space.activations_gb > space.capacity_gb:
        return (f"the encoder needs {facts.vision_gb:.1f} + {space.activations_gb:.1f} GB on a dedicated GPU "
                f"> {space.capacity_gb:.1f} GB")
    need, text = min_memory_per_gpu(facts, space, c)
    if need > space.capacity_gb:
        return text
    return None


def pareto(items: Sequence[object], metrics: Callable[[object], tuple[float, ...]]) -> list[object]:
    """Items no other item beats or ties on every metric (lower is better), order kept.

    Cheap dominance pruning before the ILP: a mesh slower in throughput *and* latency *and*
    with less KV room than another of the same GPU count cannot win any objective."""
    vals = [metrics(x) for x in items]
    keep = []
    for i, vi in enumerate(vals):
        dominated = any(all(a <= b for a, b in zip(vj, vi)) and any(a < b for a, b in zip(vj, vi))
                        for j, vj in enumerate(vals) if j != i)
        if not dominated:
            keep.append(items[i])
    return keep


def weights_fit_message(facts: ModelFacts, space: SearchSpace) -> str | None:
    """The world-level memory bound: one copy of the weights must fit in all GPUs together."""
    total = facts.text_weights_gb + facts.vision_gb
    hbm = space.hbm_gb or space.capacity_gb
    room = space.gpus * hbm
    if total <= room:
        return None
    return (f"weights need {total:.0f} GB in {facts.weights_dtype}; {space.gpus} x {hbm:.0f} GB = "
            f"{room:.0f} GB; try {_smaller_dtype(facts.weights_dtype)}more GPUs (at least "
            f"{math.ceil(total / space.capacity_gb)} at {space.capacity_gb:.0f} GB usable each)")


def _smaller_dtype(dtype: str) -> str:
    return {"fp32": "bf16 or ", "bf16": "fp8 or ", "fp16": "fp8 or ", "fp8": "int4 or "}.get(dtype, "")
