"""The one plan builder: a mesh, its layer ranges and the numbers a planner worked out -> a checked
``Plan``. The planner (``planner.plan_build``), hand-pinned plans (``planner.pinned``) and the test
plans all assemble through it, so the stage flags follow one rule:

* stage ``i`` covers ``layers[i]`` (inclusive); stage 0 holds the embedding, the last the lm_head;
* ``Stage.vision`` on the stages ``ParallelDims.encoder_stages()`` names for the placement;
* ``vision.dedicated_gpus`` only with the ``dedicated`` placement; ``shift`` from the dims' shift
  flag and threshold (each stage's own threshold from ``dims.stage_thresholds``).
"""

from __future__ import annotations

from collections.abc import Sequence

from plans.mesh import ParallelDims
from plans.schema import (Backend, CurvePoint, Engine, Hardware, MemoryPerGPU, Mesh, ModelRef, Plan, Predicted, Provenance,
                          RunnerUp, Scheduler, Shift, Stage, Vision)


def assemble_plan(*, name: str, provenance: Provenance, model: ModelRef, hardware: Hardware, objective: str,
                  dims: ParallelDims, layers: Sequence[tuple[int, int]], memory: MemoryPerGPU, scheduler: Scheduler,
                  backend: Backend = "eager", curves: Sequence[tuple[int, float, float]] = (),
                  step_ms: Sequence[float] | None = None, predicted: Predicted | None = None,
                  runners_up: Sequence[RunnerUp] = (), notes: Sequence[str] = (), engine: Engine = "shiftplan") -> Plan:
    """A checked plan (UserError naming what does not add up, with ``hardware``'s world size).
    ``curves``: (tokens, SP x TP ms, TP ms) points of the shift crossover; ``step_ms``: each
    stage's predicted reference step."""
    if len(layers) != dims.pp:
        raise ValueError(f"{len(layers)} layer ranges for pp = {dims.pp}")
    encoding = dims.encoder_stages()
    own = dims.stage_thresholds or (None,) * dims.pp
    stages = [Stage(index=i, first_layer=a, last_layer=b, embedding=i == 0, lm_head=i == dims.pp - 1,
                    vision=i in encoding, step_ms=step_ms[i] if step_ms is not None else None,
                    shift_threshold_tokens=own[i]) for i, (a, b) in enumerate(layers)]
    return Plan(
        name=name, provenance=provenance, model=model, hardware=hardware, objective=objective, engine=engine,
        mesh=Mesh(dp=dims.dp, pp=dims.pp, tp=dims.tp, sp=dims.sp, axis_order=list(dims.axis_order)),
        stages=stages,
        vision=Vision(placement=dims.placement, dedicated_gpus=dims.encoder_gpus),
        shift=Shift(enabled=dims.shift, threshold_tokens=dims.threshold if dims.shift else None,
                    curves=[CurvePoint(tokens=t, sp_tp_ms=a, tp_ms=b) for t, a, b in curves]),
        memory_gb=memory, scheduler=scheduler, backend=backend, predicted=predicted or Predicted(),
        runners_up=list(runners_up), notes=list(notes),
    ).check()
