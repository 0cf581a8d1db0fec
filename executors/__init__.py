"""Materialise a plan into torch.distributed workers and run it. Reads only ``plans.schema``.

    with executors.load(plan) as engine:
        results = engine.generate([Request(tokens=[1, 2, 3])], max_new_tokens=16)
"""

from __future__ import annotations

from typing import Any

__all__ = ["load", "Engine", "Request", "Sampling", "Result", "ImageInput", "WorkerError"]


def __getattr__(name: str) -> Any:  # lazy: importing executors does not import torch
    if name in ("load", "Engine", "WorkerError"):
        from executors import engine

        return getattr(engine, name)
    if name in ("Request", "Sampling", "Result"):
        from executors import requests

        return getattr(requests, name)
    if name == "ImageInput":
        from executors.images import ImageInput

        return ImageInput
    raise AttributeError(name)
