"""The engine's on/off switches, read once from the environment: each kernel or path the engine
chose by measurement can be turned off for an A/B run (``bench/``'s variants) or a workaround,
without a code change. ``0`` turns a switch off, ``1`` on; unset keeps the default; any other value
warns and keeps the default.

| variable | default | what it turns on (off: the fallback) |
|---|---|---|
| ``SHIFTPLAN_GEMV`` | on | bf16 products of few rows (and their bias) through the Triton GEMV (off: cuBLAS) |
| ``SHIFTPLAN_PDL`` | on | programmatic dependent launch of the decode kernels (Hopper+) |
| ``SHIFTPLAN_FP8_GEMM`` | on | FP8 products of few rows through the Triton FP8 kernels (off: ``_scaled_mm``) |
| ``SHIFTPLAN_FP8_W8A8`` | on | the Triton W8A8 kernel above the W8A16 rows (off: ``_scaled_mm``) |
| ``SHIFTPLAN_FUSED_ADD_NORM`` | on | all-reduce + residual add + RMSNorm in one kernel (off: three) |
| ``SHIFTPLAN_REDUCE_LL`` | on | that kernel's LL protocol for bf16 (off: the flag protocol) |
| ``SHIFTPLAN_GRAPH_DECODES`` | on | a captured prefill or mixed step's decodes through the paged decode kernel (off: the paged prefill kernel, with its chunks) |
| ``SHIFTPLAN_A2A_LL`` | on | Ulysses' all-to-all through the LL kernel on GPUs of one host, so SP x TP steps are captured in CUDA graphs (off: NCCL's all-to-all, SP x TP steps eager) |

``SHIFTPLAN_PAGED_PREFILL`` (``auto`` / ``0`` / ``1``) is read by ``executors.paged_prefill``.
"""

from __future__ import annotations

import os
import warnings

DEFAULTS = {
    "SHIFTPLAN_GEMV": True,
    "SHIFTPLAN_PDL": True,
    "SHIFTPLAN_FP8_GEMM": True,
    "SHIFTPLAN_FP8_W8A8": True,
    "SHIFTPLAN_FUSED_ADD_NORM": True,
    "SHIFTPLAN_REDUCE_LL": True,
    "SHIFTPLAN_A2A_LL": True,
    "SHIFTPLAN_GRAPH_DECODES": True,
}


def switch(name: str) -> bool:
    """The switch ``name`` (one of ``DEFAULTS``) as the environment sets it (module doc)."""
    default = DEFAULTS[name]
    value = os.environ.get(name)
    if value is None or value in ("0", "1"):
        return default if value is None else value == "1"
    warnings.warn(f"{name}={value!r} is not 0 or 1; using the default ({'1' if default else '0'})", stacklevel=2)
    return default
