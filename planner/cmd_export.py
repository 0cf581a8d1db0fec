"""`plan export` (registered by planner.cli): a plan as the launch of vLLM, Arctic Inference or
SGLang. The export itself lives in ``planner.export`` (one module per engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export_cmd(
    plan: Path = typer.Argument(..., help="plan file"),
    engine: Optional[str] = typer.Option(None, "--engine", help="vllm | arctic | sglang (default: the plan's own "
                                                                "engine, when it was compiled for one)"),
    fmt: str = typer.Option("cmd", "--format", help="cmd (a shell script, one command per node) | yaml | json"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write here (default: stdout)"),
    explain: bool = typer.Option(False, "--explain", help="list every mapping decision (plan field -> engine flag)"),
    no_downgrade: bool = typer.Option(False, "--no-downgrade", help="refuse (exit 2) instead of exporting the nearest "
                                                                    "plan the engine runs"),
    model: Optional[str] = typer.Option(None, "--model", help="checkpoint the engine loads (default: the preset's "
                                                              "Hugging Face id)"),
) -> None:
    """Write the engine launch (command or config; one per node) that realises a plan."""
    from rich.console import Console
    from rich.markup import escape

    from planner.paths import writable

    from planner.export import ENGINES, INFO, export_plan, render
    from plans.errors import UserError
    from plans.schema import load_plan

    if fmt not in ("cmd", "yaml", "json"):
        raise UserError(f"--format must be cmd, yaml or json, got '{fmt}'")
    if engine is not None and engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}'; plan export knows: {', '.join(ENGINES)}")
    if model is not None and not model.strip():
        raise UserError("--model is empty; give the checkpoint the engine loads, or leave --model out for the "
                        "preset's Hugging Face id")
    if output is not None:
        writable(output, "-o")
    p = load_plan(plan)
    if engine is None:
        if p.engine == "shiftplan":
            raise UserError(f"{plan}: give --engine ({' | '.join(ENGINES)}); the plan was compiled for shiftplan's "
                            "own executors")
        engine = p.engine
    x = export_plan(p, engine, model=model, downgrade=not no_downgrade)
    text = render(x, fmt, explain)  # type: ignore[arg-type]
    err = Console(stderr=True)
    for d in x.downgrades:
        err.print(f"[yellow]downgraded:[/] {escape(d)}", highlight=False, soft_wrap=True)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text)
    except OSError as e:
        raise UserError(f"-o {output}: cannot write: {e.strerror or e}") from None
    info = INFO[engine]
    err.print(f"wrote {escape(str(output))} ({info.title} {info.version}, {len(x.launches)} launch"
              f"{'es' if len(x.launches) != 1 else ''})", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's command to the `plan` app."""
    app.command("export")(export_cmd)
