"""Build the cost model of a model config on a GPU: get its op graph, pick the profile.

    cost_model_for(cfg, gpu, weights_dtype=..., kv_dtype=..., gpus_per_node=...) -> (CostModel, OpGraph)

The graph comes from the tracer's cache (``graph.cache.get_graph``) when the tracer is
installed, else from the analytic builder (``costmodels.synthetic``). The profile is the
committed calibration of the GPU (``costmodels/profiles/<gpu>.json``); an inline GPU
or a GPU without one runs on the datasheet roofline (``profile_id = "roofline:<gpu>"``).
"""

from __future__ import annotations

from typing import Any

from costmodels.gpu import GPU
from costmodels.hardware import get_gpu
from costmodels.model import CostModel, fp8_kernels_for
from costmodels.profile import load_profile
from costmodels.steps import launch_for
from graph.opgraph import OpGraph


def graph_for_config(cfg: dict[str, Any]) -> OpGraph:
    """The traced (cached) op graph of a config, or the analytic one without the tracer."""
    try:
        from graph.cache import get_graph  # noqa: PLC0415 (the tracer may not be installed)
    except ImportError:
        get_graph = None
    if get_graph is not None:
        return get_graph(cfg)
    from costmodels.synthetic import build_graph

    return build_graph(cfg)


def cost_model_for(cfg: dict[str, Any], gpu: GPU | str, *, weights_dtype: str, kv_dtype: str, gpus_per_node: int,
                   use_profile: bool = True, graph: OpGraph | None = None,
                   fused_elementwise: bool = False, engine: str | None = None,
                   backend: str | None = None) -> tuple[CostModel, OpGraph]:
    """(CostModel, OpGraph) of an HF config on a catalog GPU (its calibration profile unless
    ``use_profile`` is off) or an inline ``GPU`` (datasheet roofline). ``fused_elementwise``: the
    engine fuses memory-bound ops (a runtime backend that is not eager; ``CostModel``).
    ``engine`` and ``backend`` (the plan's runtime) pick the profile's measured step terms
    (``costmodels.steps.launch_for``: this repo's engine with eager or compiled layers); None: none."""
    g = graph if graph is not None else graph_for_config(cfg)
    prof = load_profile(get_gpu(gpu).name) if use_profile and isinstance(gpu, str) else None
    cm = CostModel(g, get_gpu(gpu), weights_dtype=weights_dtype, kv_dtype=kv_dtype, gpus_per_node=gpus_per_node,
                   profile=prof, fused_elementwise=fused_elementwise, launch=launch_for(prof, engine, backend),
                   fp8_kernels=fp8_kernels_for(backend))
    return cm, g
