"""The parallel arithmetic of a plan, written once: planner, cost model, simulator and executors
all ask ``ParallelDims`` instead of working it out again.

Notation: ``dp`` replicas, each a pipeline of ``pp`` stages; a stage is ``P = tp * sp`` GPUs.
``H`` query heads, ``KV`` key/value heads.

Ranks. The global rank is row-major over ``axis_order`` (default ``dp, pp, tp, sp``, ``sp``
innermost)::

    rank = ((dp_i * pp + pp_i) * tp + tp_i) * sp + sp_i

and the GPU at ``(tp_i, sp_i)`` of a stage takes shift (TP-P) rank ``r = tp_i * sp + sp_i``: after
the Ulysses all-to-all it holds the head block ``r`` of P, exactly what it holds under plain TP
of degree P, so one KV cache serves both modes.

Heads. Query heads split evenly over P (``H % P == 0``); KV heads are split when ``KV % P == 0``
and replicated ``P / KV`` times when ``P % KV == 0`` (one KV head per GPU); otherwise the mesh
cannot hold the model.

Modes (shift parallelism). A micro-batch of ``T`` tokens runs on a stage as plain TP of degree P
(mode ``"tp"``) when shift is on and ``T <= threshold``, else as Ulysses SP x TP (``"sp_tp"``).
With ``sp == 1`` the two are the same computation and the mode is ``"tp"``. A stage's threshold
is its own (``Stage.shift_threshold_tokens``), else the plan's (``shift.threshold_tokens``), else
stage 0's own.

CUDA graphs (this repo's engine, ``executors.graphs``): a step in mode ``"tp"`` of at most
``GRAPH_TOKEN_BUCKETS[-1]`` tokens is replayed as a captured graph (no host launches); SP x TP
steps and larger steps run eagerly. The cost model prices the host side
of the eager ones (``costmodels.steps``).

Vision encoder placements: ``stage0_tp`` (stage 0's P GPUs run one tower, TP-sharded when its
heads and MLP width divide by P), ``stage0_dp`` (a whole tower on each of stage 0's P GPUs,
images spread over them), ``all_dp`` (a tower on every GPU of the replica), ``dedicated`` (GPUs
of its own, after the mesh), ``none`` (a model with a vision tower then runs it as stage0_tp).

This module imports only the standard library and ``plans.errors``: ``plans.schema`` builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

from plans.errors import UserError

GRAPH_TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
                       2048)  # the engine's step graphs' token buckets: 1.5x steps up to 256, then four an octave
# (with 1.5x steps a 1,153-token prefill ran as 1,536 and cost a third more), but no 448: cuBLAS runs a layer's
# dense products slower at 448 rows than at 512 on an H200 for Llama-3.1-8B (409.8 against 303.6 us: gate+up
# 272 against 162), Llama-3.1-70B at TP2 and TP4 and Qwen2.5-32B at TP4 (bench/results/bucket_matmuls.md;
# Llama-3.1-8B's 448-token mixed steps ran 149 us a layer over the cost model while serving), so steps of
# 385-512 tokens run as 512 (padding at most a third; Qwen2-VL-7B's products take 6% longer at 512 than at 448)


def bucket(n: float, sizes: tuple[int, ...] = GRAPH_TOKEN_BUCKETS) -> int | None:
    """The smallest size ``>= n``, or None past the largest: the rows a step graph of the engine
    computes for ``n`` tokens (its padding rows run every dense op; the cost model prices them too)."""
    return next((b for b in sizes if b >= n), None)

AxisName = Literal["dp", "pp", "tp", "sp"]
AXES: tuple[str, ...] = get_args(AxisName)
Mode = Literal["sp_tp", "tp"]
EncoderPlacement = Literal["stage0_tp", "stage0_dp", "all_dp", "dedicated"]  # what a spec may search
VisionPlacement = Literal["none", EncoderPlacement]
PLACEMENTS: tuple[str, ...] = get_args(VisionPlacement)
ENCODER_PLACEMENTS: tuple[str, ...] = get_args(EncoderPlacement)


class Coords(NamedTuple):
    dp: int
    pp: int
    tp: int
    sp: int


class EncoderLayout(NamedTuple):
    """Where images are encoded: ``stages`` whose GPUs run the tower inside a step (``()`` for
    dedicated GPUs), as ``dp`` tower replicas of ``tp`` GPUs each (images spread over the replicas
    by patch count)."""

    stages: tuple[int, ...]
    tp: int
    dp: int


# ---------------------------------------------------------------- splits


def mesh_label(dp: int = 1, pp: int = 1, tp: int = 1, sp: int = 1) -> str:
    """e.g. ``dp2xtp4xsp2``: the degrees above 1 in axis order; ``single`` for one GPU."""
    return "x".join(f"{a}{n}" for a, n in zip(AXES, (dp, pp, tp, sp)) if n > 1) or "single"


def shift_rank(tp_i: int, sp_i: int, sp: int) -> int:
    """TP-P rank of the GPU at ``(tp_i, sp_i)``: ``tp_i * sp + sp_i``."""
    return tp_i * sp + sp_i


def even_range(n: int, parts: int, i: int, what: str) -> tuple[int, int]:
    """Part ``i`` of ``n`` rows split evenly: ``[i*n/parts, (i+1)*n/parts)``; UserError naming
    ``what`` when ``n`` is not divisible."""
    if n % parts:
        raise UserError(f"{what} = {n} is not divisible by {parts} ({n} = {n // parts} x {parts} + {n % parts})")
    k = n // parts
    return i * k, (i + 1) * k


def even_layers(layers: int, stages: int) -> tuple[tuple[int, int], ...]:
    """Contiguous inclusive layer ranges of ``stages`` stages, sizes ``floor(L/S)`` or one more,
    the larger stages first."""
    if stages < 1 or stages > layers:
        raise UserError(f"pp = {stages} needs 1 <= pp <= {layers} decoder layers")
    base, extra = divmod(layers, stages)
    out, first = [], 0
    for i in range(stages):
        n = base + (1 if i < extra else 0)
        out.append((first, first + n - 1))
        first += n
    return tuple(out)


def kv_heads_per_gpu(kv_heads: int, P: int) -> int:
    """KV heads one GPU holds under P-way head sharding: ``KV / P``, or 1 (replicated) when KV < P."""
    return max(1, kv_heads // P)


def heads_problem(heads: int, kv_heads: int, tp: int, sp: int = 1) -> str | None:
    """None when H query and KV key/value heads split over P = tp*sp GPUs, else why not (with the
    arithmetic)."""
    P = tp * sp
    degree = f"tp*sp = {tp}*{sp} = {P}" if tp > 1 and sp > 1 else f"tp*sp = {P}"
    if heads % P:
        return f"{heads} query heads are not divisible by {degree} ({heads} % {P} = {heads % P})"
    if kv_heads >= P and kv_heads % P:
        return f"{kv_heads} KV heads are not divisible by {degree} ({kv_heads} % {P} = {kv_heads % P})"
    if kv_heads < P and P % kv_heads:
        return (f"{degree} is not a multiple of the {kv_heads} KV heads ({P} % {kv_heads} = {P % kv_heads}); "
                "KV heads are split when KV >= P, replicated P/KV times when KV < P")
    return None


def weight_layouts(sp: int, shift: bool) -> tuple[Mode, ...]:
    """Weight layouts a GPU holds: ``sp_tp`` (W/tp) when sp > 1, ``tp`` (W/P) when sp == 1 or shift
    is on (shift holds both: the price of switching per step)."""
    return (("sp_tp",) if sp > 1 else ()) + (("tp",) if sp == 1 or shift else ())


@dataclass(frozen=True)
class HeadSplit:
    """Which heads shift rank ``r`` holds. TP layout (degree P): query heads ``[r*H/P, (r+1)*H/P)``
    and the KV heads those read (``q // (H/KV)``). SP x TP layout (degree tp, rank tp_i): the TP
    blocks of shift ranks ``tp_i*sp + j`` for ``j < sp``, concatenated."""

    heads: int
    kv_heads: int
    degree: int  # P

    def __post_init__(self) -> None:
        why = heads_problem(self.heads, self.kv_heads, self.degree)
        if why:
            raise UserError(why)

    @property
    def q_per_rank(self) -> int:
        return self.heads // self.degree

    @property
    def kv_per_rank(self) -> int:
        return kv_heads_per_gpu(self.kv_heads, self.degree)

    def q_heads(self, r: int) -> list[int]:
        n = self.q_per_rank
        return list(range(r * n, (r + 1) * n))

    def kv_heads_of(self, r: int) -> list[int]:
        """KV heads read by shift rank r's query heads: ``q // g`` for its heads, deduplicated."""
        g = self.heads // self.kv_heads
        out: list[int] = []
        for q in self.q_heads(r):
            if q // g not in out:
                out.append(q // g)
        return out

    def q_heads_sptp(self, tp_i: int, sp: int) -> list[int]:
        return [h for j in range(sp) for h in self.q_heads(shift_rank(tp_i, j, sp))]

    def kv_heads_sptp(self, tp_i: int, sp: int) -> list[int]:
        return [h for j in range(sp) for h in self.kv_heads_of(shift_rank(tp_i, j, sp))]


# ---------------------------------------------------------------- the mesh


@dataclass(frozen=True)
class ParallelDims:
    """A plan's mesh with everything that follows from it. Validates itself on construction
    (UserError with the arithmetic). ``gpus_per_node``/``nodes`` None: hardware unknown (no world
    size check; every GPU on one node)."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    sp: int = 1
    axis_order: tuple[str, ...] = AXES
    gpus_per_node: int | None = None
    nodes: int | None = None
    placement: str = "none"
    dedicated_gpus: int = 0
    vision: bool = False  # the model has a vision tower
    shift: bool = False
    threshold: int | None = None  # the plan's shift threshold (tokens)
    stage_thresholds: tuple[int | None, ...] = ()  # each stage's own (None: the plan's)
    name: str = "mesh"  # what error messages call it

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis_order", tuple(self.axis_order))
        object.__setattr__(self, "stage_thresholds", tuple(self.stage_thresholds))
        bad = [f"{a} = {getattr(self, a)}" for a in AXES if getattr(self, a) < 1]
        if bad:
            raise UserError(f"{self.name}: {', '.join(bad)}; every parallel degree must be >= 1")
        if sorted(self.axis_order) != sorted(AXES):
            raise UserError(f"{self.name}: axis_order {list(self.axis_order)} must order each of "
                            f"{', '.join(AXES)} once")
        if self.placement not in PLACEMENTS:
            raise UserError(f"{self.name}: vision placement '{self.placement}' is not one of {', '.join(PLACEMENTS)}")
        if self.placement == "dedicated" and self.dedicated_gpus < 1:
            raise UserError(f"{self.name}: vision placement 'dedicated' needs dedicated_gpus >= 1, "
                            f"got {self.dedicated_gpus}")
        if self.world is not None and self.gpus > self.world:
            enc = f" + {self.dedicated_gpus} encoder GPUs = {self.gpus}" if self.gpus > self.size else ""
            raise UserError(f"{self.name}: dp*pp*tp*sp = {self.dp}*{self.pp}*{self.tp}*{self.sp} = {self.size}{enc} "
                            f"GPUs > {self.gpus_per_node} per node x {self.nodes} nodes = {self.world}")
        if self.shift and self.sp < 2:
            raise UserError(f"{self.name}: shift is enabled but sp = {self.sp} (needs sp >= 2)")
        if self.stage_thresholds and len(self.stage_thresholds) != self.pp:
            raise UserError(f"{self.name}: {len(self.stage_thresholds)} stage thresholds for pp = {self.pp} stages")
        if self.shift:
            missing = [s for s in range(self.pp) if self.threshold_of(s) is None]
            if missing:
                raise UserError(f"{self.name}: shift is enabled but neither shift.threshold_tokens nor stage "
                                f"{missing[0]}'s shift_threshold_tokens is set")

    @staticmethod
    def from_plan(plan: Any) -> "ParallelDims":
        """From a ``plans.schema.Plan`` (its mesh, hardware, vision placement and shift)."""
        m, hw = plan.mesh, plan.hardware
        return ParallelDims(dp=m.dp, pp=m.pp, tp=m.tp, sp=m.sp, axis_order=tuple(m.axis_order),
                            gpus_per_node=hw.gpus_per_node, nodes=hw.nodes, placement=plan.vision.placement,
                            dedicated_gpus=plan.vision.dedicated_gpus, vision=plan.model.vision_blocks > 0,
                            shift=plan.shift.enabled, threshold=plan.shift.threshold_tokens,
                            stage_thresholds=tuple(st.shift_threshold_tokens for st in plan.stages)
                            if len(plan.stages) == m.pp else (), name=f"plan {plan.name}")

    # ------------------------------------------------------------ sizes
    @property
    def P(self) -> int:
        """GPUs of one pipeline stage, the TP degree of shifted mode: tp * sp."""
        return self.tp * self.sp

    @property
    def size(self) -> int:
        """GPUs of the LLM mesh: dp * pp * tp * sp."""
        return self.dp * self.pp * self.P

    @property
    def encoder_gpus(self) -> int:
        """GPUs that run only the vision encoder: ``dedicated_gpus`` with the dedicated placement, else 0."""
        return self.dedicated_gpus if self.placement == "dedicated" else 0

    @property
    def gpus(self) -> int:
        """GPUs used: the mesh plus the encoder GPUs (global ranks ``size ..`` after the mesh)."""
        return self.size + self.encoder_gpus

    @property
    def world(self) -> int | None:
        return self.gpus_per_node * self.nodes if self.gpus_per_node and self.nodes else None

    def label(self) -> str:
        return mesh_label(self.dp, self.pp, self.tp, self.sp)

    # ------------------------------------------------------------ ranks
    def coords(self, rank: int) -> Coords:
        """Mesh coordinates of a global rank (inverse of ``rank``)."""
        if not 0 <= rank < self.size:
            raise UserError(f"{self.name}: rank {rank} is outside the mesh of {self.size} GPUs")
        out: dict[str, int] = {}
        for a in reversed(self.axis_order):
            n = getattr(self, a)
            out[a] = rank % n
            rank //= n
        return Coords(**out)

    def rank(self, dp: int = 0, pp: int = 0, tp: int = 0, sp: int = 0) -> int:
        """Global rank at mesh coordinates: row-major over ``axis_order``."""
        at = {"dp": dp, "pp": pp, "tp": tp, "sp": sp}
        r = 0
        for a in self.axis_order:
            r = r * getattr(self, a) + at[a]
        return r

    def shift_rank(self, tp_i: int, sp_i: int) -> int:
        return shift_rank(tp_i, sp_i, self.sp)

    def stage_ranks(self, replica: int, stage: int) -> tuple[int, ...]:
        """Global ranks of one stage of a replica, in shift-rank order ``tp_i * sp + sp_i``."""
        return tuple(self.rank(replica, stage, t, s) for t in range(self.tp) for s in range(self.sp))

    def replica_ranks(self, replica: int, stages: Any = None) -> tuple[int, ...]:
        """Global ranks of one replica (of ``stages``, default all), stage by stage."""
        return tuple(r for p in (range(self.pp) if stages is None else stages) for r in self.stage_ranks(replica, p))

    def crosses_nodes(self, boundary: int, replica: int = 0) -> bool:
        """Whether a stage ``boundary -> boundary + 1`` send crosses nodes: some GPU of the stage
        and its peer (same tp_i, sp_i) on the next stage sit on different nodes."""
        g = self.gpus_per_node
        if not g:
            return False
        return any(a // g != b // g for a, b in zip(self.stage_ranks(replica, boundary),
                                                     self.stage_ranks(replica, boundary + 1)))

    # ------------------------------------------------------------ model fit
    def check_heads(self, heads: int, kv_heads: int) -> HeadSplit:
        """The head split over P, or UserError naming the arithmetic that fails."""
        why = heads_problem(heads, kv_heads, self.tp, self.sp)
        if why:
            raise UserError(f"{self.name}: {why}")
        return HeadSplit(heads, kv_heads, self.P)

    def layouts(self) -> tuple[Mode, ...]:
        return weight_layouts(self.sp, self.shift)

    def check_model(self, heads: int, kv_heads: int, intermediate: int) -> HeadSplit:
        """Heads split over P and the MLP width splits over each layout's degree."""
        hs = self.check_heads(heads, kv_heads)
        for mode in self.layouts():
            n, what = (self.P, "tp*sp") if mode == "tp" else (self.tp, "tp")
            if intermediate % n:
                raise UserError(f"{self.name}: intermediate_size = {intermediate} is not divisible by {what} = {n} "
                                f"({intermediate} % {n} = {intermediate % n})")
        return hs

    # ------------------------------------------------------------ shift
    def threshold_of(self, stage: int | None = None) -> int | None:
        """A stage's shift threshold: its own, else the plan's, else stage 0's own (``stage``
        None: the plan's, else stage 0's)."""
        th = self.stage_thresholds
        if stage is not None and stage < len(th) and th[stage] is not None:
            return th[stage]
        if self.threshold is not None:
            return self.threshold
        return th[0] if th else None

    def mode_for(self, tokens: int, stage: int | None = None) -> Mode:
        """``"tp"`` for a micro-batch of ``tokens`` at most the stage's threshold (shift on) or
        when sp == 1, else ``"sp_tp"``."""
        if self.sp == 1:
            return "tp"
        th = self.threshold_of(stage)
        return "tp" if self.shift and th is not None and tokens <= th else "sp_tp"

    def stage_modes(self, tokens: int) -> tuple[Mode, ...]:
        """The mode of each stage for a micro-batch of ``tokens``."""
        return tuple(self.mode_for(tokens, s) for s in range(self.pp))

    # ------------------------------------------------------------ vision encoder
    def encoder(self, vision_heads: int | None = None, mlp_dim: int | None = None) -> EncoderLayout:
        """Where and how images are encoded under the plan's placement (see the module doc).
        ``stage0_tp`` falls back to a whole tower per stage-0 GPU when the encoder's heads or MLP
        width (where given) do not divide by P."""
        where, P = self.placement, self.P
        if not self.vision:
            return EncoderLayout((), 1, 1)
        if where == "dedicated":
            return EncoderLayout((), 1, self.dedicated_gpus)
        if where == "all_dp":
            return EncoderLayout(tuple(range(self.pp)), 1, self.pp * P)
        if where == "stage0_dp":
            return EncoderLayout((0,), 1, P)
        split = all(n is None or n % P == 0 for n in (vision_heads, mlp_dim))
        return EncoderLayout((0,), P if split else 1, 1)

    def encoder_stages(self) -> tuple[int, ...]:
        """Stages whose GPUs hold the vision tower (``Stage.vision``)."""
        return self.encoder().stages
