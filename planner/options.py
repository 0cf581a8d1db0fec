"""Shared checks of command-line values that the option parser lets through.

click's ``FloatRange`` compares with ``<`` and ``>``, so ``nan`` passes any range; every float
option of the ``plan`` commands takes ``callback=finite``.
"""

from __future__ import annotations

import math

import typer


def finite(ctx: typer.Context, param: typer.CallbackParam, value: float | None) -> float | None:
    """Refuse NaN and infinity (a usage error: exit code 2, naming the option)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value
