"""Plans pinned by hand (a mesh, even stages, a vision placement), costed with the cost model's
memory model: the comparison points of ``bench/research_report.py`` and the simulator tests.

The planner builds its own plans (``planner.pipeline``); this is the "pin a plan by hand and skip
the optimiser" path: no ILP, no search, just the arithmetic a plan file needs, assembled by the
same ``plans.build.assemble_plan``.
"""

from __future__ import annotations

from costmodels.memory import MemoryBreakdown
from costmodels.model import CostModel
from planner.spec import Spec
from plans.build import assemble_plan
from plans.errors import UserError
from plans.mesh import ParallelDims, even_layers
from plans.schema import Hardware, MemoryPerGPU, ModelRef, Plan, Provenance, Scheduler


def pinned_plan(spec: Spec, cost: CostModel, *, dp: int = 1, pp: int = 1, tp: int = 1, sp: int = 1, shift: bool = False,
                threshold: int | None = None, placement: str | None = None, dedicated_gpus: int = 0,
                max_seqs: int | None = None, max_batch_tokens: int | None = None, name: str | None = None) -> Plan:
    """A ``Plan`` for ``spec`` with the given mesh, even PP stages and vision placement.

    KV capacity per replica = min over stages of the cost model's ``memory(stage_layers=...)``.
    Without shift the second (TP-P) weight copy is not held, so its bytes go to the KV cache:
    kv_tokens += shift_copy_gb * 1e9 / kv_bytes_per_token. ``threshold``: default the cost
    model's SP x TP vs TP crossover - 1 (steps of at most that many tokens run shifted).
    Placement default: ``stage0_tp`` for a vision model, ``none`` otherwise. ``max_seqs``: running
    requests per replica (default the spec's ``search.max_seqs``); ``max_batch_tokens``: token budget of one
    micro-batch (default the spec's).
    """
    info = cost.info
    hw = spec.hardware
    has_vision = bool(info.vision)
    placement = placement or ("stage0_tp" if has_vision else "none")
    layout = ParallelDims(dp=dp, pp=pp, tp=tp, sp=sp, gpus_per_node=hw.gpus_per_node, nodes=hw.nodes,
                          placement=placement, dedicated_gpus=dedicated_gpus, vision=has_vision,
                          name=f"mesh dp{dp} x pp{pp} x tp{tp} x sp{sp}")
    if shift and sp < 2:  # before the crossover search; the plan's ParallelDims checks it again
        raise UserError(f"shift needs sp >= 2, got sp = {sp}")
    ranges = even_layers(info.layers, pp)
    encoding = layout.encoder_stages()
    mbt = max_batch_tokens or spec.search.max_batch_tokens
    mems = [cost.memory(pp=pp, tp=tp, sp=sp, dp=dp, stage_layers=rng, with_embedding=i == 0,
                        with_lm_head=i == len(ranges) - 1, with_vision=i in encoding, max_batch_tokens=mbt)
            for i, rng in enumerate(ranges)]

    def kv_tokens(m: MemoryBreakdown) -> int:
        extra = 0 if shift else m.shift_copy_gb * 1e9 / m.kv_bytes_per_token
        return int(m.kv_tokens + extra)

    worst = min(mems, key=kv_tokens)
    kvt = kv_tokens(worst)
    if kvt <= 0:
        raise UserError(f"mesh {layout.label()}: weights + activations "
                        f"{worst.weights_gb + worst.activations_gb:.1f} GB exceed "
                        f"{worst.capacity_gb:.0f} GB x 0.9 per GPU")
    shift_copy = worst.shift_copy_gb if shift else 0.0
    kv_gb = kvt * worst.kv_bytes_per_token / 1e9
    curve: list[tuple[int, float, float]] = []
    if shift:
        cross, full = cost.shift_crossover(tp=tp, sp=sp, pp=pp)
        if threshold is None:
            threshold = (cross - 1) if cross else 1 << 30
        curve = full[::4]
    dims = ParallelDims(dp=dp, pp=pp, tp=tp, sp=sp, gpus_per_node=hw.gpus_per_node, nodes=hw.nodes,
                        placement=placement if has_vision else "none", dedicated_gpus=dedicated_gpus,
                        vision=has_vision, shift=shift, threshold=threshold if shift else None)
    return assemble_plan(
        name=name or f"{spec.name}-{dims.label()}" + ("-shift" if shift else ""),
        provenance=Provenance(spec_sha256=spec.sha256 or "", model_config_sha256=cost.graph.config_sha256,
                              cost_profile=cost.profile_id, shiftplan_version="pinned"),
        model=ModelRef(name=spec.model.preset or str(spec.model.config), preset=spec.model.preset,
                       config=spec.model.config, architecture=info.architecture,
                       weights_dtype=spec.model.weights_dtype, kv_dtype=spec.model.kv_dtype,
                       num_layers=info.layers, vision_blocks=int((info.vision or {}).get("depth", 0))),
        hardware=Hardware(gpu=hw.gpu if isinstance(hw.gpu, str) else hw.gpu.name, gpus_per_node=hw.gpus_per_node,
                          nodes=hw.nodes),
        objective=spec.objective, dims=dims, layers=ranges, curves=curve,
        memory=MemoryPerGPU(weights=worst.weights_gb, shift_copy=shift_copy, kv=kv_gb,
                            activations=worst.activations_gb,
                            total=worst.weights_gb + shift_copy + worst.activations_gb + kv_gb,
                            capacity=worst.capacity_gb, kv_tokens=kvt),
        scheduler=Scheduler(max_batch_tokens=mbt, max_seqs=max_seqs or spec.search.max_seqs, microbatches=pp),
        backend=spec.runtime.backend,
        notes=["pinned by hand: even stages, no optimiser"],
    )
