"""The simulator's entry points.

    simulate(plan, cost, workload, *, slo=None, seed=0) -> SimResult
    coster_for(plan, cost) -> ModelCoster            (reuse it across rates: its cache is the speed)
    cost_model_for_plan(plan, base_dir=".") -> CostModel
"""

from __future__ import annotations

from pathlib import Path

from costmodels.model import CostModel, fp8_kernels_for
from costmodels.simulator.config import SimConfig
from costmodels.simulator.coster import Coster, LogGrid, ModelCoster
from costmodels.simulator.engine import run
from costmodels.simulator.metrics import SimResult, SloTargets, summarize
from costmodels.workload import Workload
from plans.schema import Plan


def coster_for(plan: Plan, cost: CostModel, *, grid: LogGrid | None = None, exact: bool = False) -> ModelCoster:
    """A memoising ``ModelCoster`` of ``plan``'s replica (mesh, stage ranges) on ``cost``."""
    cfg = SimConfig.from_plan(plan)
    return ModelCoster(cost, stages=[(s.first_layer, s.last_layer) for s in plan.stages], tp=cfg.tp, sp=cfg.sp,
                       hidden=int(cost.info.hidden), act_bytes=float(cost.rates.a_bytes),
                       inter_node=[cfg.inter_node(b) for b in range(cfg.pp - 1)], grid=grid, exact=exact,
                       max_seqs=cfg.max_seqs)


def cost_model_for_plan(plan: Plan, base_dir: str | Path = ".") -> CostModel:
    """The ``CostModel`` a plan was made with: its model config (preset or path relative to
    ``base_dir``), GPU, dtypes and calibration profile (none for a ``roofline:`` provenance)."""
    from costmodels.build import graph_for_config
    from costmodels.hardware import get_gpu
    from costmodels.profile import load_profile
    from costmodels.steps import launch_for
    from graph.hf_config import load_config

    m = plan.model
    cfg = load_config(m.preset, None if m.preset else Path(base_dir) / (m.config or ""))
    hw = plan.hardware
    gpu = hw.gpu_spec if hw.gpu_spec is not None else get_gpu(hw.gpu)
    prof = None if plan.provenance.cost_profile.startswith("roofline") else load_profile(gpu.name)
    return CostModel(graph_for_config(cfg), gpu, weights_dtype=m.weights_dtype, kv_dtype=m.kv_dtype,
                     gpus_per_node=plan.hardware.gpus_per_node, profile=prof,
                     fused_elementwise=plan.backend != "eager", launch=launch_for(prof, plan.engine, plan.backend),
                     fp8_kernels=fp8_kernels_for(plan.backend))


def simulate_config(cfg: SimConfig, coster: Coster, workload: Workload, *, slo: SloTargets | None = None, seed: int = 0,
                    gpu_memory_gb: float | None = None) -> SimResult:
    """Simulate ``workload`` (sampled with ``seed``) on the deployment ``cfg``."""
    log = run(cfg, coster, workload.sample(seed))
    res = summarize(log, slo=slo, gpu_memory_gb=gpu_memory_gb,
                    encoder_gpus=cfg.dims.encoder_gpus, replicas=cfg.dp, offered_rps=workload.rate)
    res.notes.extend(workload.notes)
    return res


def simulate(plan: Plan, cost: CostModel | None, workload: Workload, *, slo: SloTargets | None = None, seed: int = 0,
             coster: Coster | None = None) -> SimResult:
    """What ``plan`` delivers on ``workload``: TTFT/TPOT/e2e percentiles, throughput, goodput.

    ``cost``: the ``CostModel`` (ignored when a ``coster`` is given, e.g. one from ``coster_for``
    reused across calls); ``slo``: the p90 targets for goodput and ``meets_slo``.
    ``SimResult.to_predicted()`` fills the plan's ``predicted`` block.
    """
    cfg = SimConfig.from_plan(plan)
    coster = coster if coster is not None else coster_for(plan, cost)
    return simulate_config(cfg, coster, workload, slo=slo, seed=seed, gpu_memory_gb=plan.memory_gb.total)
