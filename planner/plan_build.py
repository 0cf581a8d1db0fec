"""Stage 8 of the compile pipeline: the chosen candidate as a ``plans.schema.Plan``.

Each stage gets its own shift threshold: the crossover of its own blocks' step time (decoder
layers, plus the embedding on the first stage and final norm / lm_head on the last), SP x TP vs
TP(tp*sp), on steps of the workload's mix, each with its host side where the engine launches it
eagerly (``CostModel.stage_wall_ms``). KV tokens per GPU on a stage are
``(KV budget - encoder weights on that stage) / KV bytes per token``; the plan's memory and KV
capacity are those of the stage with the fewest. The plan's threshold is stage 0's own crossover
unless ``search.shift_threshold`` pins it.
"""

from __future__ import annotations

from graph.opgraph import StepShape
from planner.costing import Costed, blocks_ms
from planner.inputs import Model, TokenMix, mixed_ms
from planner.scoring import Scored, Solved, why_lost
from planner.spec import Spec
from planner.threshold import Crossover, crossover
from plans.build import assemble_plan
from plans.mesh import ParallelDims
from plans.schema import Hardware, MemoryPerGPU, ModelRef, Plan, Provenance, RunnerUp, Scheduler


# ------------------------------------------------------------------ stage 8: the plan


def stage_thresholds(model: Model, s: Solved, mix: TokenMix) -> list[Crossover | None]:
    """Per-stage crossover over the stage's own blocks (embedding / lm_head included)."""
    c, e = s.cand, s.solution.best
    if c.sp < 2 or e is None:
        return [None] * c.pp
    out = []
    for i, (a, b) in enumerate(e.stages):
        def t(tokens: int, mode: str, a: int = a, b: int = b, i: int = i) -> float:
            def f(sh: StepShape) -> float:
                ms = model.cost.layers_time(a, b, sh, tp=c.tp, sp=c.sp, mode=mode).total_ms
                if i == 0:
                    ms += blocks_ms(model, c, ("embedding",), sh, mode)
                if i == c.pp - 1:
                    ms += blocks_ms(model, c, ("final_norm", "lm_head"), sh, mode)
                return ms
            gpu = mixed_ms(f, *mix.step_of(tokens, mix.max_seqs))
            return model.cost.stage_wall_ms(gpu, b - a + 1, tokens, sp=c.sp, mode=mode)
        out.append(crossover(lambda n: t(n, "sp_tp"), lambda n: t(n, "tp"), mix.max_batch_tokens))
    return out


def build_plan(sc: Scored, spec: Spec, model: Model, mix: TokenMix, runners: list[Scored] | None = None,
               notes: list[str] | None = None) -> Plan:
    from planner import __version__

    s = sc.solved
    c, e = s.cand, s.solution.best
    assert e is not None
    cm, info = model.cost, model.graph.info
    crosses = stage_thresholds(model, s, mix)
    pinned = spec.search.shift_threshold  # pins every stage's threshold and the plan's
    own = tuple((pinned if pinned is not None else x.threshold_tokens) if x else None for x in crosses)
    dims = ParallelDims(dp=c.dp, pp=c.pp, tp=c.tp, sp=c.sp, gpus_per_node=spec.hardware.gpus_per_node,
                        nodes=spec.hardware.nodes, placement=e.vision or "none", dedicated_gpus=c.dedicated_gpus,
                        vision=model.has_vision, shift=c.sp > 1, threshold=own[0], stage_thresholds=own)
    pf = mix.prefill_step()
    step_ms = [cm.stage_wall_ms(cm.layers_time(a, b, pf, tp=c.tp, sp=c.sp, mode="sp_tp").total_ms, b - a + 1,
                                pf.tokens, sp=c.sp, mode="sp_tp") for a, b in e.stages]
    mems = [model.memory(pp=1, tp=c.tp, sp=c.sp, stage_layers=(a, b), with_embedding=i == 0,
                      with_lm_head=i == c.pp - 1, with_vision=False, max_batch_tokens=mix.max_batch_tokens)
            for i, (a, b) in enumerate(e.stages)]
    vis_gb = [_vision_gb(e.vision, i, s.costed) for i in range(c.pp)]
    tokens = []
    for m, vg in zip(mems, vis_gb):
        free = m.kv_gb - vg
        tokens.append(int(max(free, 0.0) * 1e9 // m.kv_bytes_per_token) if m.kv_bytes_per_token else 0)
    worst = min(range(c.pp), key=lambda i: tokens[i])
    mw = mems[worst]
    kv_gb = tokens[worst] * mw.kv_bytes_per_token / 1e9
    memory = MemoryPerGPU(weights=mw.weights_gb + vis_gb[worst], shift_copy=mw.shift_copy_gb, kv=kv_gb,
                          activations=mw.activations_gb,
                          total=mw.weights_gb + vis_gb[worst] + mw.shift_copy_gb + mw.activations_gb + kv_gb,
                          capacity=mw.capacity_gb, kv_tokens=tokens[worst])
    m = spec.model
    plan = assemble_plan(
        name=spec.name,
        provenance=Provenance(spec_sha256=spec.sha256, model_config_sha256=model.config_sha256,
                              cost_profile=cm.profile_id, shiftplan_version=__version__),
        model=ModelRef(name=model.name, preset=m.preset, config=m.config, architecture=info.architecture,
                       weights_dtype=m.weights_dtype, kv_dtype=m.kv_dtype, num_layers=info.layers,
                       vision_blocks=len([b for b in model.graph.blocks if b.kind == "vision_block"])),
        hardware=Hardware(gpu=cm.gpu.name, gpus_per_node=spec.hardware.gpus_per_node, nodes=spec.hardware.nodes,
                          gpu_spec=None if isinstance(spec.hardware.gpu, str) else spec.hardware.gpu),
        objective=spec.objective, dims=dims, layers=e.stages, memory=memory,
        scheduler=Scheduler(max_batch_tokens=mix.max_batch_tokens, max_seqs=mix.max_seqs, microbatches=c.pp),
        backend=spec.runtime.backend, curves=crosses[0].curve if crosses[0] else (), step_ms=step_ms,
        predicted=sc.predicted,
        runners_up=[RunnerUp(mesh=r.solved.cand.label, vision=r.solved.solution.best.vision or "none",
                             score=r.capacity_rps, reason=why_lost(r, sc, spec)) for r in (runners or [])],
        notes=list(notes or []), engine=spec.engine,
    )
    plan._spec_file = spec.path or None  # save_plan records it relative to the plan file
    return plan


def _vision_gb(placement: str | None, stage: int, x: Costed) -> float:
    """Encoder weights per GPU on ``stage`` under ``placement`` (0 for dedicated GPUs)."""
    opt = next((v for v in x.problem.vision if v.placement == placement), None)
    if opt is None:
        return 0.0
    return opt.every_mem + (opt.stage0_mem if stage == 0 else 0.0)
