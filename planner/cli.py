"""The `plan` command line. Each group of subcommands lives in its own ``planner.cmd_*``
module exposing ``register(app)``; modules import heavy libraries (torch, transformers)
inside their commands, so `plan show` / `plan diff` / a cached `plan graph` start fast.

User errors (``plans.errors.UserError``) print one clean message and exit with its code
(2 by convention); they never end in a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from plans.errors import UserError

COMMAND_MODULES = [
    "planner.cmd_graph",      # plan graph
    "planner.cmd_estimate",   # plan estimate, plan calibrate
    "planner.cmd_compile",    # plan compile, plan show, plan diff
    "planner.cmd_simulate",   # plan simulate
    "planner.cmd_run",        # plan run, plan bench, plan export-onnx
    "planner.cmd_export",     # plan export (vLLM, Arctic Inference, SGLang launches)
]

app = typer.Typer(
    name="plan",
    help="Plan and run parallel LLM inference: compile a model.yaml into a reviewable parallel plan.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Plan and run parallel LLM inference."""


@app.command("version")
def version() -> None:
    """Print the shiftplan version."""
    from planner import __version__

    typer.echo(f"shiftplan {__version__}")


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)

err_console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `plan` console script; with ``argv`` given, returns the exit code."""
    try:
        app(args=argv, prog_name="plan")  # standalone mode: usage errors print and raise SystemExit
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        code = e.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        code = 130
    if argv is None:
        sys.exit(code)
    return code
