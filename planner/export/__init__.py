"""``plan export``: a compiled plan as the launch of a serving engine people already run.

    export_plan(plan, "vllm" | "arctic" | "sglang", model=None, downgrade=True) -> Export
    render(export, "cmd" | "yaml" | "json", explain=False) -> str

One module per engine (``vllm``, ``arctic``, ``sglang``); ``engines`` holds each engine's limits
(shared with the planner's search), ``flags`` every flag the exports may emit with where the
engine defines it. The export reads only the plan schema.
"""

from __future__ import annotations

from planner.export import arctic, sglang, vllm
from planner.export.common import Decision, Export, Format, fit, layout_of, model_path, refuse, render
from planner.export.engines import ENGINES, INFO
from plans.errors import UserError
from plans.schema import Plan

__all__ = ["ENGINES", "INFO", "Export", "Format", "export_plan", "render"]

_BUILDERS = {"vllm": vllm.export, "arctic": arctic.export, "sglang": sglang.export}


def export_plan(plan: Plan, engine: str, model: str | None = None, downgrade: bool = True) -> Export:
    """The launches that realise ``plan`` on ``engine`` as closely as it allows.

    Raises UserError for an unknown engine, or (``downgrade=False``) when the engine cannot run
    the plan as planned; the message names each limit."""
    if engine not in _BUILDERS:
        raise UserError(f"unknown engine '{engine}'; plan export knows: {', '.join(ENGINES)}")
    t, decisions = fit(plan, engine)
    if not downgrade and any(d.kind == "downgrade" for d in decisions):
        raise refuse(plan, engine, [d.text for d in decisions if d.kind == "downgrade"])
    if plan.engine not in ("shiftplan", engine):
        decisions.insert(0, Decision("note", f"the plan was searched for {INFO[plan.engine].title}; exporting for "
                                             f"{INFO[engine].title}"))
    path, d = model_path(plan, model)
    decisions.append(d)
    launches = _BUILDERS[engine](plan, t, layout_of(plan, t), path, decisions)
    x = Export(engine, plan.name, t, launches, decisions, planned_for_engine=plan.engine == engine)
    if not downgrade and x.downgrades:  # limits found while building (e.g. a KV dtype)
        raise refuse(plan, engine, x.downgrades)
    return x
