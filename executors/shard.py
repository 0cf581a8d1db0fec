"""Which heads / rows each rank holds, in both layouts of shift parallelism (``HeadSplit`` and
``even_range`` are ``plans.mesh``'s; this module adds the weight rows of a list of heads).

Notation: ``H`` query heads, ``KV`` key/value heads, ``g = H / KV`` (GQA group), ``P = tp * sp``.
The GPU at ``(tp_i, sp_i)`` of a stage takes shift rank ``r = tp_i * sp + sp_i``.

* TP layout (degree P, rank r): query heads ``[r*H/P, (r+1)*H/P)`` and the KV heads those
  query heads read, ``kv_heads(r)``. When ``KV < P`` a KV head is replicated on ``P/KV`` ranks.
* SP x TP layout (degree tp, rank tp_i): the concatenation over ``j < sp`` of the TP-layout
  blocks of shift ranks ``tp_i*sp + j``. After the Ulysses all-to-all, sp rank j holds exactly
  the TP-layout block of shift rank ``tp_i*sp + j`` -- the same KV heads, so one KV cache
  serves both modes.
"""

from __future__ import annotations

from plans.mesh import HeadSplit, even_range

__all__ = ["HeadSplit", "even_range", "head_rows"]  # the split arithmetic lives in plans.mesh


def head_rows(heads: list[int], head_dim: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, end)`` of a projection weight for a list of heads, runs merged."""
    runs: list[tuple[int, int]] = []
    for h in heads:
        s, e = h * head_dim, (h + 1) * head_dim
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((s, e))
    return runs
