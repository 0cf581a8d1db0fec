"""`plan compile` subcommands (registered by planner.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `plan` app."""
