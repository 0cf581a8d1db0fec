"""Execution backends of a stage: eager, torch.compile, TensorRT (optional extra)."""

from __future__ import annotations

from typing import Any

from plans.errors import UserError

BACKENDS = ("eager", "compile", "tensorrt")


def check_backend(backend: str) -> str:
    """``backend`` when it is one of ``BACKENDS``, else UserError naming them (checked before any
    worker builds a model)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    return backend


def apply_backend(model: Any, backend: str) -> None:
    """Swap the decoder layers' forward (and the vision tower's block halves) for the backend's
    version, in place.

    ``compile``: ``torch.compile(dynamic=True)`` per layer forward (inductor; token counts vary per
    step, so shapes are marked dynamic). ``tensorrt``: the same through torch-tensorrt's dynamo
    backend when it is importable. A vision tower (``model.vision``) gets its blocks' ``pre`` and
    ``post`` compiled the same way (patch counts vary per step); their attention between them stays
    eager, as its span list is Python data (``executors.vision.VisionBlock``).
    """
    if backend == "eager":
        return
    compile_methods(list(model.layers), ("forward",), compile_kw(backend))
    tower = getattr(model, "vision", None)
    if tower is not None:
        compile_tower(tower, backend)


def compile_kw(backend: str) -> dict[str, Any]:
    """``torch.compile``'s arguments for a non-eager backend (UserError for an unknown one)."""
    if check_backend(backend) == "eager":
        raise ValueError("the eager backend compiles nothing")
    if backend == "tensorrt":
        require_tensorrt()
        return {"backend": "tensorrt", "dynamic": True}
    return {"dynamic": True}


def compile_tower(tower: Any, backend: str) -> None:
    """A vision tower's blocks' ``pre`` and ``post`` compiled for ``backend`` (eager: unchanged)."""
    if backend != "eager":
        compile_methods(list(tower.blocks), ("pre", "post"), compile_kw(backend))


def compile_methods(modules: list[Any], names: tuple[str, ...], kw: dict[str, Any]) -> None:
    """Each method ``names`` of ``modules`` (all of one class) replaced by one ``torch.compile``-d
    function shared by every module (one compilation, not one per layer)."""
    import functools

    import torch

    if not modules:
        return
    cls = type(modules[0])
    for name in names:
        fn = torch.compile(getattr(cls, name), **kw)
        for m in modules:
            setattr(m, name, functools.partial(fn, m))


def require_tensorrt() -> None:
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        raise UserError(
            "backend 'tensorrt' needs torch-tensorrt, which is not installed; install the extra: "
            "pip install 'shiftplan[tensorrt]' (or choose backend eager/compile)"
        ) from None
