"""Number types for the spec, the plan file and inline GPUs.

YAML reads ``true`` as a boolean and pydantic's lax mode would take it as 1: these types refuse
booleans where numbers belong, and keep lax parsing otherwise (PyYAML reads ``1e3`` as the string
"1e3"; it must still be 1000.0). With ``allow_inf_nan=False`` on the models, NaN and infinity
are refused too.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()}")
    return v


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]
