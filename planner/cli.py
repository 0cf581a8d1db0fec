"""The `plan` command line. Each group of subcommands lives in its own ``planner.cmd_*``
module exposing ``register(app)``; modules import heavy libraries (torch, transformers)
inside their commands, so `plan show` / `plan diff` / a cached `plan graph` start fast.

User errors (``plans.errors.UserError``) print one clean message and exit with its code
(2 by convention); they never end in a traceback. User text in messages (names, paths) is
printed as text, never as rich markup.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

import typer
from rich.console import Console
from rich.markup import escape

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
    help="Plan and run parallel LLM inference: compile a model.yaml into a reviewable parallel plan.\n\n"
         "Exit codes: 0 success; 1 only when `plan diff` or `plan compile --check` finds a change; 2 for every user "
         "error (a bad spec, plan, trace, option or path); 130 interrupted, 143 terminated (SIGTERM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _version(value: bool) -> None:
    if value:
        from planner import __version__

        typer.echo(f"shiftplan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the shiftplan version and exit"),
) -> None:
    """Plan and run parallel LLM inference (the app's help text, with the exit codes, is above)."""


@app.command("version")
def version() -> None:
    """Print the shiftplan version."""
    from planner import __version__

    typer.echo(f"shiftplan {__version__}")


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)

err_console = Console(stderr=True)


def error(message: str) -> None:
    """Print a user error; the message is text, never markup (a name like ``[x]`` prints as is)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _tell_torchrun_ranks(message: str) -> None:
    """Under torchrun (``plan run`` on several nodes), the other ranks may be waiting for this one to
    join: they stop with this error too (``executors.liveness.announce_failure``)."""
    if "MASTER_ADDR" in os.environ:  # only then import torch to ask
        from executors.liveness import announce_failure
        from executors.torchrun import under_torchrun

        if under_torchrun():
            announce_failure(message)


TERM_GRACE_S = 25.0  # the polite shutdown takes up to ~1 + 5 + 3 s a rank; job schedulers wait 30 s (Kubernetes)


class Terminated(BaseException):
    """SIGTERM (a job scheduler cancelling the run), raised where the main thread is, so that the
    engine's ``with`` block stops its ranks as on Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    """Unwind (the ranks are stopped politely), but exit with 143 after ``TERM_GRACE_S`` whatever
    still waits; spawned ranks see their driver gone and exit by themselves
    (``executors.worker.exit_if_driver_gone``)."""
    def _now() -> None:
        sys.stderr.write(f"terminated (the run did not end within {TERM_GRACE_S:g} s of SIGTERM)\n")
        sys.stderr.flush()
        os._exit(143)

    timer = threading.Timer(TERM_GRACE_S, _now)
    timer.daemon = True
    timer.start()
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `plan` console script; with ``argv`` given, returns the exit code.

    Exit codes: 0 success, 1 a change found by `diff` / `compile --check`, 2 a user error (usage
    errors from the option parser included), 130 interrupted, 143 terminated (SIGTERM)."""
    if argv is None:  # the console script: its own process, the signal is ours to take
        signal.signal(signal.SIGTERM, _terminate)
    try:
        app(args=argv, prog_name="plan")  # standalone mode: usage errors print and raise SystemExit
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except UserError as e:
        error(str(e))
        code = e.exit_code
        _tell_torchrun_ranks(str(e))
    except OSError as e:  # a file the checks could not foresee (permissions, a full disk, a vanished folder)
        where = f"{e.filename}: " if e.filename else ""
        error(f"{where}{e.strerror or e}")
        code = 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        code = 130
    except Terminated:
        err_console.print("terminated")
        code = 143
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
