"""Which heads / rows each rank holds, in both layouts of shift parallelism.

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

from dataclasses import dataclass

from plans.errors import UserError


@dataclass(frozen=True)
class HeadSplit:
    heads: int
    kv_heads: int
    degree: int  # P

    def __post_init__(self) -> None:
        if self.heads % self.degree:
            raise UserError(f"{self.heads} query heads are not divisible by tp*sp = {self.degree}")
        if self.kv_heads % self.degree and self.degree % self.kv_heads:
            raise UserError(
                f"{self.kv_heads} KV heads vs tp*sp = {self.degree}: one must divide the other "
                "(KV heads are split when KV >= P, replicated when KV < P)"
            )

    @property
    def q_per_rank(self) -> int:
        return self.heads // self.degree

    @property
    def kv_per_rank(self) -> int:
        return max(1, self.kv_heads // self.degree)

    def q_heads(self, r: int) -> list[int]:
        n = self.q_per_rank
        return list(range(r * n, (r + 1) * n))

    def kv_heads_of(self, r: int) -> list[int]:
        """KV heads read by shift rank r's query heads: ``q // g`` for its heads, deduplicated."""
        g = self.heads // self.kv_heads
        out: list[int] = []
        for q in self.q_heads(r):
            if q // g not in out:
                out.append(q // g)
        return out

    def q_heads_sptp(self, tp_i: int, sp: int) -> list[int]:
        return [h for j in range(sp) for h in self.q_heads(tp_i * sp + j)]

    def kv_heads_sptp(self, tp_i: int, sp: int) -> list[int]:
        return [h for j in range(sp) for h in self.kv_heads_of(tp_i * sp + j)]


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


def even_range(n: int, parts: int, i: int, what: str) -> tuple[int, int]:
    """``[i*n/parts, (i+1)*n/parts)``; UserError when ``n`` is not divisible."""
    if n % parts:
        raise UserError(f"{what} = {n} is not divisible by {parts}")
    k = n // parts
    return i * k, (i + 1) * k
