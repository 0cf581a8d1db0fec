"""The planner from Python.

    from planner.api import compile_spec, load_plan, save_plan, diff_plans

    plan = compile_spec("examples/llama-3.1-70b-8xh200.yaml")   # a plans.schema.Plan
    save_plan(plan, "plans/llama-3.1-70b-8xh200.plan.yaml")       # canonical YAML
    old = load_plan("plans/llama-3.1-70b-8xh200.plan.yaml")
    for change in diff_plans(old, plan):                          # [] when equal
        print(change.text())
    print(export_launch(plan, "arctic"))                          # the Arctic Inference launch (shell)
"""

from __future__ import annotations

from pathlib import Path

from planner.diff import Change, diff_plans, render
from planner.spec import Spec, load_spec
from plans.schema import Plan, dump_plan, load_plan, save_plan

__all__ = ["compile_spec", "compile_result", "load_plan", "save_plan", "dump_plan", "diff_plans", "render_diff",
           "export_launch", "Plan", "Change"]


def compile_result(spec: Spec | str | Path, progress=None):
    """The full ``planner.pipeline.CompileResult`` (plan plus counts of candidates, ILPs, simulations)."""
    from planner.pipeline import compile_spec as _compile

    s = spec if isinstance(spec, Spec) else load_spec(spec)
    return _compile(s, progress)


def compile_spec(spec: Spec | str | Path) -> Plan:
    """Compile a spec (a path to a model.yaml, or a loaded ``Spec``) into a plan."""
    return compile_result(spec).plan


def render_diff(a: Plan, b: Plan, fmt: str = "text") -> str:
    """The diff of two plans as text (one change per line) or a markdown table."""
    return render(diff_plans(a, b), fmt)  # type: ignore[arg-type]


def export_launch(plan: Plan, engine: str, fmt: str = "cmd", explain: bool = False, model: str | None = None,
                  downgrade: bool = True) -> str:
    """``plan export``: the launch of ``plan`` on vllm | arctic | sglang (shell script, YAML or JSON)."""
    from planner.export import export_plan, render as render_export

    x = export_plan(plan, engine, model=model, downgrade=downgrade)
    return render_export(x, fmt, explain)  # type: ignore[arg-type]
