"""Step times for the simulator: the ``Coster`` protocol and its two implementations.

* ``ModelCoster`` asks the cost model (``costmodels.model.CostModel``) and memoises on a log grid
  (a step mixing prefill chunks and decodes is costed as dense work on all its tokens plus each
  part's attention, see ``ModelCoster.stage_ms``):
  each of a step's four numbers (tokens T, attention pairs S, KV tokens K, sequences B; see
  ``graph.opgraph.StepShape``) is rounded to the nearest point of ``x_k = r^k`` with
  ``r = 2^(1/per_octave)`` (exact below ``exact_below``), the cost model is evaluated at the grid
  point, and the result is cached. The relative rounding of each number is at most
  ``r^(1/2) - 1`` (2.2% at 16 per octave); a step time is sub-linear in each of them, so its error
  is smaller still (``bench/sim_speed.py`` measures it on simulated steps).
* ``SyntheticCoster`` is affine in (T, S, K, B) per stage with separate coefficients per mode,
  for tests and quick what-ifs without a traced model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from graph.opgraph import StepShape

if TYPE_CHECKING:
    from costmodels.model import CostModel


class Coster(Protocol):
    """Per-stage step times of one replica (ms)."""

    pp: int

    def stage_ms(self, shape: StepShape, mode: str, decode: StepShape | None = None) -> tuple[float, ...]:
        """Time of each pipeline stage for one forward step of ``shape`` in ``mode``; ``decode`` is
        the step's decode part when the step also holds prefill chunks."""

    def p2p_ms(self, tokens: float, boundary: int) -> float:
        """Activation transfer of a ``tokens``-token micro-batch from stage ``boundary`` to the next."""

    def vision_ms(self, patches: tuple[int, ...], *, tp: int, dp: int) -> float:
        """Vision tower + merger over images of ``patches`` ViT patches, on tp x dp GPUs."""

    def embed_ms(self, image_tokens: int) -> float:
        """Sending ``image_tokens`` image embeddings from dedicated encoder GPUs to the LLM."""

    def form_ms(self, seqs: float, prefill: bool, patches: float = 0.0) -> float:
        """The driver's host time before a step of ``seqs`` sequences formed once the last step's
        tokens were back (``prefill``: it holds prefill chunks; ``patches``: of the images it encodes)."""

    def wait_ms(self, shape: StepShape, mode: str, decode: StepShape | None = None) -> float:
        """What each stage's GPU waits, on top of ``stage_ms``, before a step not sent ahead of its
        GPU work (the engine's look-ahead sends steps while the last one computes)."""


# ------------------------------------------------------------------ log-grid quantisation


@dataclass(frozen=True)
class LogGrid:
    """x -> nearest grid value: exact integers below ``exact_below``, else r^round(log_r x)."""

    per_octave: int = 16
    exact_below: int = 64

    def index(self, x: float) -> int:
        if x < self.exact_below:
            return -int(x + 0.5) - 1  # negative keys: exact small integers
        return int(math.log2(x) * self.per_octave + 0.5)

    def value(self, k: int) -> float:
        return float(-k - 1) if k < 0 else 2.0 ** (k / self.per_octave)


# ------------------------------------------------------------------ cost-model backed


class ModelCoster:
    """Memoised step times of a plan's replica from a ``CostModel`` (see the module doc).

    ``stages``: inclusive decoder-layer ranges, one per pipeline stage. ``hidden`` and ``act_bytes``
    size the p2p activations (T x hidden x act_bytes) and the image embeddings sent by dedicated
    encoders. ``inter_node``: per stage boundary, whether the hop crosses nodes.
    """

    def __init__(self, cost: CostModel, *, stages: list[tuple[int, int]], tp: int, sp: int, hidden: int,
                 act_bytes: float = 2.0, inter_node: list[bool] | None = None, grid: LogGrid | None = None,
                 exact: bool = False, max_seqs: int | None = None):
        self.cost = cost
        self.max_seqs = max_seqs  # the scheduler's: the sequence slots of the engine's step graphs
        self.stages = list(stages)
        self.pp = len(self.stages)
        self.tp, self.sp = tp, sp
        self.hidden, self.act_bytes = hidden, act_bytes
        self.inter_node = list(inter_node or [False] * max(0, self.pp - 1))
        self.grid = grid or LogGrid()
        self._eb, self._po = self.grid.exact_below, self.grid.per_octave
        self.exact = exact
        self._steps: dict[tuple, tuple[float, ...]] = {}
        self._vision: dict[tuple, float] = {}
        self._p2p: dict[tuple, float] = {}
        self.misses = 0
        self.calls = 0

    def exact_stage_ms(self, shape: StepShape, mode: str) -> tuple[float, ...]:
        """The cost model's own answer for one shape, no grid."""
        sc = self.cost.step_time(shape, pp=self.pp, tp=self.tp, sp=self.sp, mode=mode, stages=self.stages)
        return tuple(float(b.total_ms) for b in sc.stages)

    def _q(self, x: float) -> int:
        eb, po = self._eb, self._po  # LogGrid.index, inlined (the simulator's hot path)
        return -int(x + 0.5) - 1 if x < eb else int(math.log2(x) * po + 0.5)

    def _at(self, key: tuple, mode: str) -> tuple[float, ...]:
        """Cost-model time of the grid shape ``key`` = (kT, kS, kK, kB), cached (no longest decode:
        ``_tail`` adds its share exactly)."""
        full = key + (mode,)
        hit = self._steps.get(full)
        if hit is None:
            self.misses += 1
            v = self.grid.value
            shape = StepShape(v(key[0]), v(key[1]) if key[1] is not None else 0.0,
                              v(key[2]) if key[2] is not None else 0.0, v(key[3]))
            hit = self._steps[full] = self.exact_stage_ms(shape, mode)
        return hit

    def _tail(self, decode: StepShape, mode: str, graph: tuple[int, int] | None = None) -> tuple[float, ...]:
        """Each stage's share of the decodes' longest-range tail (``CostModel.decode_tail_ms`` a layer);
        ``graph``: the step graph of the mixed step ``decode`` is part of, which cuts the decodes' keys
        (``CostModel.step_graph``; None: not captured, or the slots unknown)."""
        per_layer = self.cost.decode_tail_ms(decode, tp=self.tp, sp=self.sp, mode=mode, graph=graph)
        return tuple(per_layer * (hi - lo + 1) for lo, hi in self.stages)

    def _one(self, t: float, p: float, k: float, b: float, mode: str) -> tuple[float, ...]:
        q = self._q
        kt = q(t)
        kp = q(p)
        return self._at((kt, kp, kp if k == p else q(k), kt if b == t else q(b)), mode)

    def _attention(self, t: float, p: float, k: float, b: float, mode: str) -> tuple[float, ...]:
        """Attention share of a (pure prefill or pure decode) part: its time less the same tokens'
        time with no attention pairs and no KV."""
        q = self._q
        kt, kb = q(t), q(b)
        kp = q(p)
        with_attn = self._at((kt, kp, kp if k == p else q(k), kb), mode)
        without = self._at((kt, None, None, kb), mode)
        return tuple(a - w for a, w in zip(with_attn, without))

    def stage_ms(self, shape: StepShape, mode: str, decode: StepShape | None = None) -> tuple[float, ...]:
        """Per-stage ms of a step. ``decode``: the step's decode part when it also holds prefill
        chunks (a mixed step); such a step costs its dense work on all tokens plus the attention of
        each part on its own (prefill and decode attention are separate kernels):
        t(mixed) = t(T, B; no attention) + attn(prefill part) + attn(decode part),
        attn(x) = t(x) - t(x without pairs and KV); then each stage's host side when the engine
        launches the step eagerly (``CostModel.stage_wall_ms``: max(layers x host time, GPU time)).
        A step not sent ahead adds ``wait_ms``."""
        self.calls += 1
        graph = self.cost.step_graph(shape, decode, sp=self.sp, mode=mode, max_seqs=self.max_seqs) if self.max_seqs else None
        gpu = self._exact(shape, mode, decode, graph) if self.exact else self._gpu(shape, mode, decode, graph)
        if graph is not None:  # a captured prefill or mixed step: the decode kernel on its graph's empty slots
            part = decode if decode is not None and 0 < decode.tokens < shape.tokens else None
            gpu = tuple(g + self.cost.graph_slots_ms(graph, part, hi - lo + 1, tp=self.tp, sp=self.sp, mode=mode)
                        for g, (lo, hi) in zip(gpu, self.stages))
        if self.cost.launch is None:
            return gpu
        return tuple(self.cost.stage_wall_ms(g, hi - lo + 1, shape.tokens, sp=self.sp, mode=mode)
                     for g, (lo, hi) in zip(gpu, self.stages))

    def _gpu(self, shape: StepShape, mode: str, decode: StepShape | None,
             graph: tuple[int, int] | None = None) -> tuple[float, ...]:
        """GPU time per stage from the grid (``stage_ms`` adds the host side of eager steps; ``graph``:
        the step graph it replays in, ``CostModel.step_graph``)."""
        t, p, k, b = shape.tokens, shape.pairs, shape.kv, shape.seqs
        if decode is None or decode.tokens == t or decode.tokens == 0:
            return tuple(x + y for x, y in zip(self._one(t, p, k, b, mode), self._tail(shape, mode)))
        dense = self._at((self._q(t), None, None, self._q(b)), mode)
        pre = self._attention(t - decode.tokens, p - decode.pairs, k - decode.kv, b - decode.seqs, mode)
        dec = self._attention(decode.tokens, decode.pairs, decode.kv, decode.seqs, mode)
        return tuple(x + y + z + w for x, y, z, w in zip(dense, pre, dec, self._tail(decode, mode, graph)))

    def _exact(self, shape: StepShape, mode: str, decode: StepShape | None,
               graph: tuple[int, int] | None = None) -> tuple[float, ...]:
        """``stage_ms`` with no grid (the reference the grid's error is measured against)."""
        f = self.exact_stage_ms
        if decode is None or decode.tokens == shape.tokens or decode.tokens == 0:
            return f(shape, mode)
        pre = StepShape(shape.tokens - decode.tokens, shape.pairs - decode.pairs, shape.kv - decode.kv,
                        shape.seqs - decode.seqs)

        def attn(x: StepShape) -> tuple[float, ...]:
            return tuple(a - w for a, w in zip(f(x, mode), f(StepShape(x.tokens, 0.0, 0.0, x.seqs), mode)))

        dense = f(StepShape(shape.tokens, 0.0, 0.0, shape.seqs), mode)
        dec = attn(replace(decode, decode_max_kv=0.0))  # its tail as the grid path adds it: cut as the step runs it
        return tuple(x + y + z + w for x, y, z, w in zip(dense, attn(pre), dec, self._tail(decode, mode, graph)))

    def p2p_ms(self, tokens: float, boundary: int) -> float:
        """A step's hop from stage ``boundary`` to the next: the send of its T x hidden activations
        plus the engine's handoff (``CostModel.hop_ms``)."""
        inter = self.inter_node[boundary] if boundary < len(self.inter_node) else False
        key = (self.grid.index(tokens), inter)
        hit = self._p2p.get(key)
        if hit is None:
            nbytes = self.grid.value(key[0]) * self.hidden * self.act_bytes
            hit = self._p2p[key] = float(self.cost.hop_ms(nbytes, inter_node=inter))
        return hit

    def vision_ms(self, patches: tuple[int, ...], *, tp: int, dp: int) -> float:
        key = (tuple(sorted(patches)), tp, dp)
        hit = self._vision.get(key)
        if hit is None:
            hit = self._vision[key] = float(self.cost.vision_time(list(key[0]), tp=tp, dp=dp).total_ms)
        return hit

    def form_ms(self, seqs: float, prefill: bool, patches: float = 0.0) -> float:
        return self.cost.driver_ms(seqs, prefill, patches)

    def wait_ms(self, shape: StepShape, mode: str, decode: StepShape | None = None) -> float:
        """A graphed mixed step's rank host work before its replay (``CostModel.mixed_extra_ms``)."""
        if decode is None or not 0 < decode.tokens < shape.tokens:
            return 0.0
        return self.cost.mixed_extra_ms(shape, sp=self.sp, mode=mode)

    def embed_ms(self, image_tokens: int) -> float:
        key = (self.grid.index(image_tokens), "embed")
        hit = self._p2p.get(key)
        if hit is None:
            nbytes = self.grid.value(key[0]) * self.hidden * self.act_bytes
            hit = self._p2p[key] = float(self.cost.p2p_ms(nbytes, inter_node=False))
        return hit


# ------------------------------------------------------------------ synthetic


@dataclass
class SyntheticCoster:
    """Affine step times for tests: per stage, ``c + t*T + s*S + k*K`` (ms), coefficients per mode.

    ``sp_tp`` and ``tp`` give (c, t, s, k); the defaults make "tp" cheaper for small steps and
    "sp_tp" cheaper for large ones (crossover at T = (c_sp - c_tp) / (t_tp - t_sp) = 250 tokens).
    Vision: ``v_ms_per_kpatch`` per 1000 patches, divided by tp*dp. p2p: ``p2p_ms_per_ktok``.
    """

    pp: int = 1
    sp_tp: tuple[float, float, float, float] = (10.0, 0.010, 0.0, 0.0001)
    tp: tuple[float, float, float, float] = (7.5, 0.020, 0.0, 0.0001)
    v_ms_per_kpatch: float = 20.0
    p2p_ms_per_ktok: float = 0.05
    embed_ms_per_ktok: float = 0.1

    def stage_ms(self, shape: StepShape, mode: str, decode: StepShape | None = None) -> tuple[float, ...]:
        c, t, s, k = self.tp if mode == "tp" else self.sp_tp
        ms = (c + t * shape.tokens + s * shape.pairs + k * shape.kv) / self.pp
        return (ms,) * self.pp

    def p2p_ms(self, tokens: float, boundary: int) -> float:
        return self.p2p_ms_per_ktok * tokens / 1000.0

    def vision_ms(self, patches: tuple[int, ...], *, tp: int, dp: int) -> float:
        return self.v_ms_per_kpatch * sum(patches) / 1000.0 / (tp * dp)

    def embed_ms(self, image_tokens: int) -> float:
        return self.embed_ms_per_ktok * image_tokens / 1000.0

    def form_ms(self, seqs: float, prefill: bool, patches: float = 0.0) -> float:
        return 0.0

    def wait_ms(self, shape: StepShape, mode: str, decode: StepShape | None = None) -> float:
        return 0.0
