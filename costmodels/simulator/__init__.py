"""Discrete-event serving simulator: a plan + a workload -> TTFT / TPOT / throughput / goodput.

Modules: ``config`` (what a plan means to the simulator), ``coster`` (step times, memoised),
``state`` / ``scheduler`` (continuous batching, chunked prefill, KV and preemption), ``vision``
(encoder placement), ``engine`` (the event loop), ``metrics`` (the result), ``api`` (entry points).
"""

from costmodels.simulator.api import cost_model_for_plan, coster_for, simulate, simulate_config
from costmodels.simulator.config import SimConfig
from costmodels.simulator.coster import Coster, LogGrid, ModelCoster, SyntheticCoster
from costmodels.simulator.metrics import SimResult, SloTargets

__all__ = ["simulate", "simulate_config", "coster_for", "cost_model_for_plan", "SimConfig", "Coster", "LogGrid",
           "ModelCoster", "SyntheticCoster", "SimResult", "SloTargets"]
