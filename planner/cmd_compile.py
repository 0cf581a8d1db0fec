"""`plan compile`, `plan show`, `plan diff` (registered by planner.cli).

Heavy parts (the pipeline, PuLP, the cost model) import inside the commands; none of these
commands imports torch when the graph cache is warm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def compile_cmd(
    spec: Path = typer.Argument(..., help="model.yaml spec"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write the plan here (default: stdout); "
                                                                       "the plan records the spec's path relative "
                                                                       "to this file (on stdout: to the current "
                                                                       "folder)"),
    check: Optional[Path] = typer.Option(None, "--check", help="compare with this committed plan; exit 1 and print "
                                                              "the diff when it is stale"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="no progress or summary"),
    lp: Optional[Path] = typer.Option(None, "--lp", help="also write the chosen mesh's ILP (LP format, labelled "
                                                         "constraints) to this file"),
    engine: Optional[str] = typer.Option(None, "--engine", help="plan for this engine (shiftplan | vllm | arctic | "
                                                                "sglang), overriding the spec's `engine`"),
) -> None:
    """Compile a spec into a parallel plan (mesh, stages, encoder placement, shift threshold)."""
    import time

    from rich.console import Console
    from rich.markup import escape

    from planner.api import compile_result
    from planner.diff import diff_plans, render
    from planner.paths import writable, write_text
    from planner.spec import load_spec
    from plans.errors import UserError
    from plans.schema import dump_plan, load_plan

    if check is not None and (output is not None or lp is not None):
        raise UserError("--check compares with a committed plan and writes nothing; drop -o / --lp or --check")
    err = Console(stderr=True)
    s = load_spec(spec)
    if engine is not None:
        s = with_engine(s, engine)
    committed = load_plan(check) if check else None
    for path, opt in ((output, "-o"), (lp, "--lp")):
        if path is not None:
            writable(path, opt)
    t0 = time.perf_counter()
    if quiet:
        res = compile_result(s)
    else:
        with err.status(f"compiling {escape(str(spec))}") as status:
            res = compile_result(s, progress=lambda msg: status.update(f"{escape(spec.name)}: {escape(msg)}"))
    seconds = time.perf_counter() - t0
    plan = res.plan
    if not quiet:
        err.print(summary(res, seconds), highlight=False, soft_wrap=True)
    if lp is not None and res.problem is not None:
        from planner.ilp import lp_text

        write_text(lp, lp_text(res.problem), "--lp")
    if committed is not None:
        changes = diff_plans(committed, plan)
        if changes:
            typer.echo(f"{check} is stale; `plan compile {spec} -o {check}` gives:")
            typer.echo(render(changes, "text"), nl=False)
            raise typer.Exit(1)
        typer.echo(f"{check} is up to date")
        return
    if output is None:  # the spec's path is recorded relative to the current folder
        typer.echo(dump_plan(plan.located(Path("plan.yaml"), s.path)), nl=False)
    else:
        write_text(output, dump_plan(plan.located(output, s.path)), "-o")
        if not quiet:
            err.print(f"wrote {escape(str(output))}", highlight=False)


def with_engine(spec, engine: str):
    """The spec planning for ``engine`` (``plan compile --engine``)."""
    from typing import get_args

    from plans.errors import UserError
    from plans.schema import Engine

    if engine not in get_args(Engine):
        raise UserError(f"--engine must be one of {', '.join(get_args(Engine))}, got '{engine}'")
    return spec.model_copy(update={"engine": engine})


def summary(res, seconds: float) -> str:
    """A few lines (rich markup; user text escaped): the choice, its predicted metrics, what was searched."""
    from rich.markup import escape

    p = res.plan
    m = p.mesh
    lines = [f"[bold]{escape(p.name)}[/]: {m.label()}" + (f", vision {p.vision.placement}" if p.vision.placement != "none"
                                                    else "")
             + (f", shift threshold {p.shift.threshold_tokens} tokens" if p.shift.enabled else "")
             + f", stages {', '.join(f'{s.first_layer}-{s.last_layer}' for s in p.stages)}"]
    pr = p.predicted
    if pr.ttft_ms and pr.tpot_ms:
        lines.append(f"  predicted ({pr.source}): TTFT p90 {pr.ttft_ms.p90:.0f} ms, TPOT p90 {pr.tpot_ms.p90:.1f} ms, "
                     f"{pr.combined_tok_s or 0:.0f} tok/s, goodput {pr.goodput_rps or 0:.2f} req/s, "
                     + {True: "meets SLO", False: "misses SLO", None: "no SLO set"}[pr.meets_slo])
    lines.append(f"  searched {res.candidates} meshes ({res.rejected} ruled out, {res.pruned} dominated), "
                 f"{res.solved} ILPs feasible, "
                 f"{res.simulated} simulated; {seconds:.2f} s; cost profile {escape(p.provenance.cost_profile)}")
    return "\n".join(lines)


def show_cmd(plan: Path = typer.Argument(..., help="plan file")) -> None:
    """Show a plan: mesh, stages, placement, shift threshold, memory per GPU, predicted metrics."""
    from planner.show import render_plan
    from plans.schema import load_plan

    typer.echo(render_plan(load_plan(plan)), nl=False)


def diff_cmd(
    a: Path = typer.Argument(..., help="old plan"),
    b: Path = typer.Argument(..., help="new plan"),
    fmt: str = typer.Option("text", "--format", help="text (one change per line) or markdown (a table for a "
                                                      "review comment)"),
) -> None:
    """Semantic diff of two plans; exit 0 when equal, 1 when they differ."""
    from planner.diff import diff_plans, render
    from plans.errors import UserError
    from plans.schema import load_plan

    if fmt not in ("text", "markdown"):
        raise UserError(f"--format must be text or markdown, got '{fmt}'")
    pa, pb = load_plan(a), load_plan(b)
    changes = diff_plans(pa, pb)
    typer.echo(render(changes, fmt, str(a), str(b)), nl=False)  # type: ignore[arg-type]
    if changes:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `plan` app."""
    app.command("compile")(compile_cmd)
    app.command("show")(show_cmd)
    app.command("diff")(diff_cmd)
