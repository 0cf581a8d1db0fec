"""Shift threshold: the step size at which SP x TP starts to beat plain TP on the same GPUs.

Given a stage's step time in both modes as functions of the step's token count T,
``sp_tp(T)`` (tokens split over sp, weights over tp, Ulysses all-to-alls) and ``tp(T)``
(plain TP of degree P = tp*sp, shift's small-step mode), the crossover is

    c = min { T in [1, T_max] : sp_tp(T') < tp(T') for every ladder point T' >= T }

found on a doubling ladder 1, 2, 4, ..., T_max and refined by bisection between the last
ladder point where TP still wins and the first where SP x TP wins from then on. Steps with at
most ``threshold = c - 1`` tokens run plain TP (Arctic's "at or below the threshold"
convention). When SP x TP never wins up to T_max the threshold is T_max (always TP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

TimeFn = Callable[[int], float]
CURVE_TOKENS = (16, 64, 256, 1024, 4096)


@dataclass(frozen=True)
class Crossover:
    threshold_tokens: int  # steps of at most this many tokens run plain TP
    crossover_tokens: int | None  # smallest T where SP x TP wins; None if it never does up to T_max
    curve: tuple[tuple[int, float, float], ...]  # (tokens, sp_tp_ms, tp_ms)


def ladder(t_max: int) -> list[int]:
    out, t = [], 1
    while t < t_max:
        out.append(t)
        t *= 2
    return out + [t_max]


def crossover(sp_tp: TimeFn, tp: TimeFn, t_max: int, curve_tokens: tuple[int, ...] = CURVE_TOKENS) -> Crossover:
    """The crossover of two step-time curves (see the module doc) and the curve points."""
    pts = ladder(t_max)
    wins = [sp_tp(t) < tp(t) for t in pts]
    curve_at = sorted({t for t in curve_tokens if t < t_max} | {t_max})
    curve = tuple((t, sp_tp(t), tp(t)) for t in curve_at)
    if not wins[-1]:
        return Crossover(t_max, None, curve)
    i = len(pts) - 1
    while i > 0 and wins[i - 1]:
        i -= 1
    if i == 0:
        return Crossover(0, 1, curve)
    lo, hi = pts[i - 1], pts[i]  # TP wins at lo, SP x TP wins at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sp_tp(mid) < tp(mid):
            hi = mid
        else:
            lo = mid
    return Crossover(hi - 1, hi, curve)
