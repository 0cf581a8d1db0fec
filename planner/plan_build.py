"""Stage 8 of the compile pipeline: the chosen candidate as a ``plans.schema.Plan``.

Each stage gets its own shift threshold: the crossover of its own blocks' step time (decoder
layers, plus the embedding on the first stage and final norm / lm_head on the last), SP x TP vs
TP(tp*sp), on steps of the workload's mix. KV tokens per GPU on a stage are
``(KV budget - encoder weights on that stage) / KV bytes per token``; the plan's memory and KV
capacity are those of the stage with the fewest. The plan's threshold is stage 0's own crossover
unless ``search.shift_threshold`` pins it.
"""

from __future__ import annotations

from typing import Any

from graph.opgraph import StepShape
from planner.costing import Costed, blocks_ms
from planner.inputs import Model, TokenMix, mixed_ms
from planner.scoring import Scored, Solved, why_lost
from planner.spec import Spec
from planner.threshold import Crossover, crossover
from plans.mesh import ParallelDims


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
            return mixed_ms(f, *mix.step_of(tokens, mix.max_seqs))
        out.append(crossover(lambda n: t(n, "sp_tp"), lambda n: t(n, "tp"), mix.max_batch_tokens))
    return out


def build_plan(sc: Scored, spec: Spec, model: Model, mix: TokenMix, runners: list[Scored] | None = None,
               notes: list[str] | None = None) -> Any:
    from planner import __version__
    from plans.schema import (CurvePoint, Hardware, MemoryPerGPU, Mesh, ModelRef, Plan, Provenance, RunnerUp,
                              Scheduler, Shift, Stage, Vision)

    s = sc.solved
    c, e = s.cand, s.solution.best
    assert e is not None
    cm, info = model.cost, model.graph.info
    has_vision = model.has_vision
    crosses = stage_thresholds(model, s, mix)
    pf = mix.prefill_step()
    placement = e.vision or "none"
    encoding = ParallelDims(dp=c.dp, pp=c.pp, tp=c.tp, sp=c.sp, placement=placement, vision=has_vision,
                            dedicated_gpus=c.dedicated_gpus).encoder_stages()
    stages = []
    for i, (a, b) in enumerate(e.stages):
        ms = cm.layers_time(a, b, pf, tp=c.tp, sp=c.sp, mode="sp_tp").total_ms
        st = Stage(index=i, first_layer=a, last_layer=b, embedding=i == 0, lm_head=i == c.pp - 1,
                   vision=i in encoding, step_ms=ms, shift_threshold_tokens=(spec.search.shift_threshold if spec.search.shift_threshold
                                                       is not None else crosses[i].threshold_tokens)
                   if crosses[i] else None)
        stages.append(st)
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
    # the plan's threshold: stage 0's own crossover (each stage records its own), unless pinned
    pinned = spec.search.shift_threshold
    thr = None if c.sp < 2 else (pinned if pinned is not None else crosses[0].threshold_tokens)
    curve = crosses[0].curve if crosses[0] else ()
    shift = Shift(enabled=c.sp > 1, threshold_tokens=thr,
                  curves=[CurvePoint(tokens=t, sp_tp_ms=a, tp_ms=b) for t, a, b in curve])
    m = spec.model
    plan = Plan(
        name=spec.name,
        provenance=Provenance(spec_sha256=spec.sha256, model_config_sha256=model.config_sha256,
                              cost_profile=cm.profile_id, shiftplan_version=__version__),
        model=ModelRef(name=model.name, preset=m.preset, config=m.config, architecture=info.architecture,
                       weights_dtype=m.weights_dtype, kv_dtype=m.kv_dtype, num_layers=info.layers,
                       vision_blocks=len([b for b in model.graph.blocks if b.kind == "vision_block"])),
        hardware=Hardware(gpu=cm.gpu.name, gpus_per_node=spec.hardware.gpus_per_node, nodes=spec.hardware.nodes),
        objective=spec.objective,
        mesh=Mesh(dp=c.dp, pp=c.pp, tp=c.tp, sp=c.sp),
        stages=stages,
        vision=Vision(placement=placement, dedicated_gpus=c.dedicated_gpus if placement == "dedicated" else 0),
        shift=shift,
        memory_gb=memory,
        scheduler=Scheduler(max_batch_tokens=mix.max_batch_tokens, max_seqs=mix.max_seqs, microbatches=c.pp),
        backend=spec.runtime.backend,
        predicted=sc.predicted,
        runners_up=[RunnerUp(mesh=r.solved.cand.label, vision=r.solved.solution.best.vision or "none",
                             score=r.capacity_rps, reason=why_lost(r, sc, spec)) for r in (runners or [])],
        notes=list(notes or []),
    )
    return plan.check()


def _vision_gb(placement: str | None, stage: int, x: Costed) -> float:
    """Encoder weights per GPU on ``stage`` under ``placement`` (0 for dedicated GPUs)."""
    opt = next((v for v in x.problem.vision if v.placement == placement), None)
    if opt is None:
        return 0.0
    return opt.every_mem + (opt.stage0_mem if stage == 0 else 0.0)
