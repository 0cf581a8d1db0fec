"""Build the cost model of a spec: resolve the config, get its op graph, pick the profile.

    cost_model_for(spec) -> (CostModel, OpGraph)

The graph comes from the tracer's cache (``graph.cache.get_graph``) when the tracer is
installed, else from the analytic builder (``costmodels.synthetic``). The profile is the
committed calibration of the spec's GPU (``costmodels/profiles/<gpu>.json``); an inline GPU
or a GPU without one runs on the datasheet roofline (``profile_id = "roofline:<gpu>"``).
"""

from __future__ import annotations

from typing import Any

from costmodels.hardware import get_gpu
from costmodels.model import CostModel
from costmodels.profile import load_profile
from graph.hf_config import load_config
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


def cost_model_for(spec: Any, *, use_profile: bool = True, graph: OpGraph | None = None) -> tuple[CostModel, OpGraph]:
    """(CostModel, OpGraph) for a ``planner.spec.Spec``."""
    m = spec.model
    cfg = load_config(m.preset, spec.resolve(m.config) if m.config else None)
    g = graph if graph is not None else graph_for_config(cfg)
    gpu = get_gpu(spec.hardware.gpu)
    inline = not isinstance(spec.hardware.gpu, str)
    prof = load_profile(gpu.name) if use_profile and not inline else None
    cm = CostModel(g, gpu, weights_dtype=m.weights_dtype, kv_dtype=m.kv_dtype,
                   gpus_per_node=spec.hardware.gpus_per_node, profile=prof)
    return cm, g
