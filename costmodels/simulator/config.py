"""What the simulator needs from a plan, as plain numbers (``SimConfig.from_plan``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from plans.errors import UserError
from plans.mesh import ParallelDims


@dataclass(frozen=True)
class SimConfig:
    """One serving deployment: ``dp`` replicas, each a ``pp``-stage pipeline of P = tp*sp GPUs.

    ``lanes``: micro-batches in flight per replica (each lane is a scheduler with its own running
    set, the "virtual engine" of a PP server). ``microbatches``: forward passes each step of a lane
    is split into, run one after another (``scheduler.micro_batches``); more than one only on a
    single-stage replica. ``from_plan`` reads ``plan.scheduler.microbatches`` as the engine runs it
    (``executors.engine``: ``Engine.lanes``, ``Engine._micro``): under PP (pp > 1) it is
    ``lanes = max(pp, microbatches)``, one step per lane in flight, so a pipeline can keep every
    stage busy; at pp = 1 there is one lane (one scheduler, one ``max_batch_tokens`` budget a step)
    and each step's chunks are dealt into ``min(microbatches, chunks)`` micro-batches that run in
    turn on the one stage, its tokens coming when the last one ends.
    ``kv_tokens``: KV-cache capacity of one replica, tokens (``plan.memory_gb.kv_tokens``), held as
    ``ceil(kv_tokens / block_size)`` blocks of ``block_size`` tokens (as the executor sizes its cache).
    ``threshold``: with ``shift``, a step of at most this many tokens runs in mode "tp" (plain TP of
    degree P), a larger one in "sp_tp"; ``stage_thresholds`` are the stages' own. ``dims`` (the
    plan's ``ParallelDims``) owns these rules, the placement checks and the node crossings.
    ``lookahead``: the engine's look-ahead (single-stage replicas, one micro-batch a step): while a
    step computes, the next one is already formed (decodes, prompt chunks, requests that arrived
    by then), so a request arriving during it joins a step only after that next one, and the
    driver's time to form a step is hidden (plans for this project's engine; exported plans keep
    the plain loop).
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    sp: int = 1
    lanes: int = 1
    microbatches: int = 1
    max_batch_tokens: int = 8192
    max_seqs: int = 256
    block_size: int = 16
    kv_tokens: int = 1_000_000
    shift: bool = False
    threshold: int = 0
    stage_thresholds: tuple[int, ...] = ()  # per stage, when the plan sets them (else ``threshold``)
    placement: str = "none"
    dedicated_gpus: int = 0
    watermark: float = 0.01  # share of KV kept free when admitting new requests (vLLM's default)
    reserve_output: bool = False  # admit only with KV for prompt + all output (TensorRT-LLM's no-evict policy)
    lookahead: bool = False
    gpus_per_node: int = 8
    notes: tuple[str, ...] = field(default=())
    dims: ParallelDims = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("dp", "pp", "tp", "sp", "lanes", "microbatches", "max_batch_tokens", "max_seqs", "block_size",
                     "kv_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"simulator: {name} must be >= 1, got {getattr(self, name)}")
        if self.microbatches > 1 and self.pp > 1:
            raise UserError(f"simulator: a step split into {self.microbatches} micro-batches is simulated on "
                            f"single-stage replicas only (pp = {self.pp}: lanes instead)")
        object.__setattr__(self, "dims", ParallelDims(
            dp=self.dp, pp=self.pp, tp=self.tp, sp=self.sp, gpus_per_node=self.gpus_per_node,
            placement=self.placement, dedicated_gpus=self.dedicated_gpus, vision=True, shift=self.shift,
            threshold=self.threshold if self.shift else None, stage_thresholds=self.stage_thresholds, name="simulator"))

    @property
    def stage_gpus(self) -> int:
        """P: GPUs of one pipeline stage (tp * sp)."""
        return self.dims.P

    def mode(self, tokens: int) -> str:
        """The step's mode (``ParallelDims.mode_for``, the plan's threshold)."""
        return self.dims.mode_for(tokens)

    def stage_modes(self, tokens: int) -> tuple[str, ...] | None:
        """Per-stage modes when the stages have their own thresholds and they disagree, else None."""
        if not (self.shift and self.stage_thresholds):
            return None
        modes = self.dims.stage_modes(tokens)
        return None if len(set(modes)) == 1 else modes

    def inter_node(self, boundary: int) -> bool:
        """Whether the p2p hop from stage ``boundary`` to ``boundary + 1`` crosses nodes (replica 0)."""
        return self.dims.crosses_nodes(boundary)

    @staticmethod
    def from_plan(plan) -> "SimConfig":
        """Read a ``plans.schema.Plan`` (its ``scheduler.microbatches`` as the class doc says)."""
        m, s = plan.mesh, plan.scheduler
        seqs = min(s.max_seqs, s.max_batch_tokens)
        notes = []
        if seqs < s.max_seqs:
            notes.append(f"max_seqs {s.max_seqs} capped at max_batch_tokens {s.max_batch_tokens}")
        dims = plan.dims()  # validates; owns the threshold fallback
        threshold = dims.threshold_of()
        return SimConfig(
            dp=m.dp, pp=m.pp, tp=m.tp, sp=m.sp, lanes=max(m.pp, s.microbatches) if m.pp > 1 else 1,
            microbatches=s.microbatches if m.pp == 1 else 1,
            max_batch_tokens=s.max_batch_tokens, max_seqs=seqs, block_size=s.block_size,
            kv_tokens=max(1, int(plan.memory_gb.kv_tokens)), shift=bool(plan.shift.enabled),
            threshold=int(threshold or 0),
            stage_thresholds=tuple(dims.threshold_of(s) for s in range(m.pp)) if plan.shift.enabled else (),
            placement=plan.vision.placement,
            dedicated_gpus=plan.vision.dedicated_gpus, gpus_per_node=plan.hardware.gpus_per_node,
            lookahead=plan.engine == "shiftplan" and m.pp == 1 and s.microbatches <= 1, notes=tuple(notes),
        )
