"""Execution backends of a stage: eager, torch.compile, TensorRT (optional extra)."""

from __future__ import annotations

from typing import Any

from plans.errors import UserError

BACKENDS = ("eager", "compile", "tensorrt")


def apply_backend(model: Any, backend: str) -> None:
    """Swap the decoder layers' forward for the backend's version, in place.

    ``compile``: ``torch.compile(dynamic=True)`` per layer forward (inductor; token counts vary per
    step, so shapes are marked dynamic). ``tensorrt``: the same through torch-tensorrt's dynamo
    backend when it is importable.
    """
    if backend == "eager":
        return
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    import torch

    if backend == "tensorrt":
        require_tensorrt()
        kw: dict[str, Any] = {"backend": "tensorrt", "dynamic": True}
    else:
        kw = {"dynamic": True}
    import functools

    if not model.layers:
        return
    cls = type(model.layers[0])
    fn = torch.compile(cls.forward, **kw)  # one compiled function shared by every layer
    for layer in model.layers:
        layer.forward = functools.partial(fn, layer)


def require_tensorrt() -> None:
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        raise UserError(
            "backend 'tensorrt' needs torch-tensorrt, which is not installed; install the extra: "
            "pip install 'shiftplan[tensorrt]' (or choose backend eager/compile)"
        ) from None
