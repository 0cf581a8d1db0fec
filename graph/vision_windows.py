"""Attention pairs of the Qwen2-VL / Qwen2.5-VL vision tower for given image grids (pure Python).

An image (or video) of ``grid = (t, h, w)`` patches (h, w multiples of ``spatial_merge_size``)
gives ``t*h*w`` vision tokens. Full-attention blocks attend within each temporal frame:
pairs = t * (h*w)^2. Qwen2.5-VL's windowed blocks attend within windows of
``window_size / (spatial_merge_size * patch_size)`` merged tokens per side (8x8 = 64 patches for
the published 112 px windows); windows tile the merged grid from the top-left and the last row /
column of windows is cut short, as in HF ``get_window_index``:
pairs = t * sum over windows of (rows_w * cols_w * m^2)^2.
"""

from __future__ import annotations

from collections.abc import Iterable


def full_pairs(grids: Iterable[tuple[int, int, int]]) -> float:
    """Pairs of a full-attention vision block over images of ``(t, h, w)`` patches."""
    return float(sum(t * (h * w) ** 2 for t, h, w in grids))


def window_pairs(grids: Iterable[tuple[int, int, int]], window_size: int, patch_size: int,
                 spatial_merge_size: int) -> float:
    """Pairs of a windowed (Qwen2.5-VL) vision block over images of ``(t, h, w)`` patches."""
    m = spatial_merge_size
    vw = window_size // m // patch_size  # merged tokens per window side
    total = 0
    for t, h, w in grids:
        hm, wm = h // m, w // m
        for r0 in range(0, hm, vw):
            rows = min(vw, hm - r0)
            for c0 in range(0, wm, vw):
                cols = min(vw, wm - c0)
                total += t * (rows * cols * m * m) ** 2
    return float(total)


def tokens(grids: Iterable[tuple[int, int, int]]) -> float:
    """Vision tokens (patches) of the images: sum of t*h*w."""
    return float(sum(t * h * w for t, h, w in grids))


def approx_window_pairs(patches_per_image: Iterable[int], window_patches: int) -> float:
    """Windowed pairs when only patch counts are known: sum of p * min(p, window_patches).

    Exact when every window is full (image sides multiples of the window side); otherwise the
    cut-short edge windows make the true count (``window_pairs``) a little smaller.
    """
    return float(sum(p * min(p, window_patches) for p in patches_per_image))


def attention_pairs(shape: dict, grids: list[tuple[int, int, int]], vision: dict) -> float:
    """Pairs for one vision attention op (``OpNode.shape``) over images of ``(t, h, w)`` patches.

    ``vision`` is ``ModelInfo.vision``; windowed ops (``shape["window"]``) use its window_size.
    """
    if shape.get("window"):
        return window_pairs(grids, vision["window_size"], vision["patch_size"], vision["spatial_merge_size"])
    return full_pairs(grids)
