"""Multilinear interpolation on rectilinear grids in log2 space, clamped at the edges.

Pure Python (no numpy): the cost model evaluates a handful of points per op, and the
simulator calls it very often, so a 2^d-corner loop beats array set-up costs.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Sequence


def _bracket(axis: Sequence[float], x: float) -> tuple[int, int, float]:
    """Indices (i, j) around x on a sorted axis and the weight of j, clamped to the ends."""
    n = len(axis)
    if n == 1 or x <= axis[0]:
        return 0, 0, 0.0
    if x >= axis[-1]:
        return n - 1, n - 1, 0.0
    j = bisect.bisect_right(axis, x)
    i = j - 1
    span = axis[j] - axis[i]
    return i, j, (x - axis[i]) / span if span > 0 else 0.0


def _get(values: Any, idx: tuple[int, ...]) -> float:
    v = values
    for i in idx:
        v = v[i]
    return float(v)


class LogGrid:
    """A fitted table: ``axes`` (sorted positive coordinates) and nested ``values``.

    With ``log_values`` the values are interpolated in log2 too (log-log), which is exact
    for power laws such as a memory-bound op's time vs its size.

    Precomputes log2 of the axes so a lookup costs d bisections plus 2^d products."""

    __slots__ = ("axes", "values", "log_values", "_log_axes", "_vals")

    def __init__(self, axes: Sequence[Sequence[float]], values: Any, log_values: bool = False):
        self.axes = [list(map(float, a)) for a in axes]
        self.values = values
        self.log_values = log_values
        self._log_axes = [[math.log2(a) for a in axis] for axis in self.axes]
        self._vals = _map(values, lambda v: math.log2(max(v, 1e-12))) if log_values else values

    def __call__(self, *point: float) -> float:
        v = self._vals
        la = self._log_axes
        if len(la) == 1:
            i, j, f = _bracket(la[0], math.log2(max(point[0], 1e-30)))
            r = v[i] + (v[j] - v[i]) * f
        elif len(la) == 2:
            i, j, f = _bracket(la[0], math.log2(max(point[0], 1e-30)))
            k, l, g = _bracket(la[1], math.log2(max(point[1], 1e-30)))
            a, b = v[i], v[j]
            lo = a[k] + (a[l] - a[k]) * g
            hi = b[k] + (b[l] - b[k]) * g
            r = lo + (hi - lo) * f
        elif len(la) == 3:
            i, j, f = _bracket(la[0], math.log2(max(point[0], 1e-30)))
            k, l, g = _bracket(la[1], math.log2(max(point[1], 1e-30)))
            m, n, h = _bracket(la[2], math.log2(max(point[2], 1e-30)))
            a, b = v[i], v[j]
            a0, a1, b0, b1 = a[k], a[l], b[k], b[l]
            lo = (a0[m] + (a0[n] - a0[m]) * h) * (1 - g) + (a1[m] + (a1[n] - a1[m]) * h) * g
            hi = (b0[m] + (b0[n] - b0[m]) * h) * (1 - g) + (b1[m] + (b1[n] - b1[m]) * h) * g
            r = lo + (hi - lo) * f
        else:
            r = self._general(point)
        return 2.0 ** r if self.log_values else r

    def _general(self, point: tuple[float, ...]) -> float:
        brackets = [_bracket(la, math.log2(max(x, 1e-30))) for la, x in zip(self._log_axes, point)]
        total = 0.0
        for corner in range(1 << len(brackets)):
            w = 1.0
            idx = []
            for k, (i, j, f) in enumerate(brackets):
                if corner >> k & 1:
                    w *= f
                    idx.append(j)
                else:
                    w *= 1.0 - f
                    idx.append(i)
            if w:
                total += w * _get(self._vals, tuple(idx))
        return total

    def to_json(self) -> dict[str, Any]:
        return {"axes": self.axes, "values": self.values, **({"log_values": True} if self.log_values else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LogGrid":
        return cls(d["axes"], d["values"], bool(d.get("log_values", False)))


def _map(values: Any, f) -> Any:
    return [_map(v, f) for v in values] if isinstance(values, list) else f(float(values))
