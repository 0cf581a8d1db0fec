"""Why a spec has no feasible plan: the binding constraint with its arithmetic.

Three layers, checked in order:

1. the world: one copy of the weights must fit in all GPUs together
   ("weights need 810 GB in bf16; 8 x 80 GB = 640 GB; try fp8 or more GPUs");
2. the candidate rules: every mesh was rejected (heads, node locality, search limits, the
   per-GPU memory bound) -- the message gives the closest mesh's own arithmetic;
3. the ILP: meshes exist but none meets memory per stage or the SLOs -- the message names the
   constraint the least-violating candidate misses by the smallest margin, with figures.

Everything returns a ``UserError``; the caller raises it (exit code 2 from the CLI).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from planner.candidates import CandidateSet, ModelFacts, SearchSpace, weights_fit_message
from planner.ilp import Evaluation, StageProblem, all_splits, evaluate
from plans.errors import UserError
from plans.mesh import even_layers


class InfeasibleSpec(UserError):
    """No plan satisfies the spec; the message names the binding constraint."""


def explain(spec: Any, facts: ModelFacts, space: SearchSpace, cset: CandidateSet,
            solved: Sequence[Any]) -> InfeasibleSpec:
    name = getattr(spec, "name", "spec")
    world = weights_fit_message(facts, space)
    if world:
        return InfeasibleSpec(f"{name}: no feasible plan: {world}")
    if not cset.candidates:
        return InfeasibleSpec(f"{name}: no feasible plan: {_search_limits(space, facts) or _rejections(cset)}")
    best = _closest(solved)
    if best is None:
        return InfeasibleSpec(f"{name}: no feasible plan among {len(solved)} candidate meshes")
    label, ev = best
    v = min(ev.violations, key=lambda x: x.value / x.limit if x.limit else float("inf"))
    hint = _hint(v.label)
    return InfeasibleSpec(f"{name}: no feasible plan: the closest mesh, {label}, misses {v.label}: {v.text}"
                          + (f"; {hint}" if hint else "") + f" ({len(solved)} meshes tried)")


def _rejections(cset: CandidateSet) -> str:
    """The commonest reason, and the arithmetic of the closest memory rejection."""
    mem = [r for r in cset.rejected if "GB per GPU" in r.reason]
    if mem:
        r = min(mem, key=lambda r: _need(r.reason))
        return (f"every mesh runs out of memory; the closest, {r.label}: {r.reason}; try a smaller weights dtype "
                "(fp8), fewer KV tokens (smaller input/output max), or more GPUs")
    counts = Counter(r.reason for r in cset.rejected)
    top = "; ".join(f"{r} ({n} meshes)" if n > 1 else r for r, n in counts.most_common(3))
    return f"all {len(cset.rejected)} meshes are ruled out: {top}"


def _search_limits(space: SearchSpace, facts: ModelFacts) -> str | None:
    """A search limit no mesh can meet: none of its values divides the GPUs."""
    if facts.has_vision and "dedicated" in space.placements:
        return None  # dedicated encoder GPUs change the count
    for axis in ("dp", "pp", "tp", "sp"):
        allowed = getattr(space, axis)
        if allowed and not space.allow_fewer_gpus and all(space.gpus % v for v in allowed):
            return (f"search.{axis} = {list(allowed)}, but {axis} must divide the {space.gpus} GPUs "
                    f"(dp*pp*tp*sp = {space.gpus})")
    return None


def _need(reason: str) -> float:
    try:
        return float(reason.split(" = ")[-1].split(" GB")[0])
    except ValueError:
        return float("inf")


def _closest(solved: Sequence[Any]) -> tuple[str, Evaluation] | None:
    """The candidate whose best split violates its constraints by the least (relative)."""
    best: tuple[float, str, Evaluation] | None = None
    for s in solved:
        p: StageProblem = s.costed.problem
        for ev in _best_effort(p):
            worst = max((x.value / x.limit if x.limit else float("inf")) for x in ev.violations) \
                if ev.violations else 0.0
            if best is None or worst < best[0]:
                best = (worst, s.cand.label, ev)
    return None if best is None or not best[2].violations else (best[1], best[2])


def _best_effort(p: StageProblem) -> list[Evaluation]:
    """Per placement, the split with the smallest peak memory (min-max over contiguous splits)."""
    placements = [v.placement for v in p.vision] or [None]
    splits = [p.pinned] if p.pinned else [min_memory_split(p)]
    return [evaluate(p, st, v) for st in splits for v in placements]


def min_memory_split(p: StageProblem) -> tuple[tuple[int, int], ...]:
    """Contiguous split minimising the largest stage memory (exact for small cases by
    enumeration; the uniform split otherwise, which is optimal for identical layers up to
    the embedding/lm_head offsets)."""
    L, S = len(p.layers), p.stages
    if S == 1:
        return ((0, L - 1),)
    if L <= 24:
        return min(all_splits(L, S), key=lambda st: max(evaluate(p, st, None).stage_mem_gb))
    return even_layers(L, S)


def _hint(label: str) -> str:
    if label.startswith("mem_"):
        return "try fp8 weights / KV, shorter max lengths, or more GPUs"
    if label == "slo_ttft":
        return "relax slo.ttft_p90_ms, shorten prompts, or add GPUs"
    if label == "slo_tpot":
        return "relax slo.tpot_p90_ms or use more tensor parallelism"
    if label == "rate":
        return "lower workload.arrival_rate or allow more GPUs"
    return ""
