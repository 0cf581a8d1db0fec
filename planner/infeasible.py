"""Why a spec has no feasible plan: the binding constraint with its arithmetic.

Three layers, checked in order:

1. the world: one copy of the weights must fit in all GPUs together
   ("weights need 810 GB in bf16; 8 x 80 GB = 640 GB"), with fixes to try;
2. the candidate rules: every mesh was rejected (heads, node locality, search limits, the
   per-GPU memory bound) -- the message gives the closest mesh's own arithmetic;
3. the ILP: meshes exist but none meets memory per stage or the SLOs -- the message names the
   constraint the least-violating candidate misses by the smallest margin, with figures.

Everything returns a ``UserError``; the caller raises it (exit code 2 from the CLI).

Suggested fixes ("try fp8 weights", "at least N GPUs") are ``Fix`` es: a change to the spec. The
message keeps only those ``verified`` to compile (each is compiled once, without checking hints
of its own), naming the mesh it gives; when none does, it says which were tried.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from planner.candidates import CandidateSet, ModelFacts, SearchSpace, weights_fit_message
from planner.ilp import Evaluation, StageProblem, all_splits, evaluate
from plans.errors import UserError
from plans.mesh import even_layers


@dataclass(frozen=True)
class Fix:
    """A change to the spec that may make it feasible: ``text`` says it ("weights_dtype fp8")."""

    text: str
    apply: Callable[[Any], Any]  # Spec -> Spec


class InfeasibleSpec(UserError):
    """No plan satisfies the spec; the message names the binding constraint."""

    def __init__(self, message: str, fixes: Sequence[Fix] = (), *, exit_code: int = 2):
        super().__init__(message, exit_code=exit_code)
        self.fixes = list(fixes)


def explain(spec: Any, facts: ModelFacts, space: SearchSpace, cset: CandidateSet,
            solved: Sequence[Any]) -> InfeasibleSpec:
    """The binding constraint with its arithmetic; ``fixes`` are unverified (see ``verified``)."""
    name = getattr(spec, "name", "spec")
    world = weights_fit_message(facts, space)
    if world:
        need = math.ceil((facts.text_weights_gb + facts.vision_gb) / space.capacity_gb)
        return InfeasibleSpec(f"{name}: no feasible plan: {world.split('; try ')[0]}",
                              [*_smaller_dtype(spec), *_more_gpus(spec, need)])
    if not cset.candidates:
        limits = _search_limits(space, facts)
        if limits:
            return InfeasibleSpec(f"{name}: no feasible plan: {limits}")
        text, mem = _rejections(cset)
        return InfeasibleSpec(f"{name}: no feasible plan: {text}",
                              [*_smaller_dtype(spec), *_shorter(spec), *_more_gpus(spec)] if mem else [])
    best = _closest(solved)
    if best is None:
        return InfeasibleSpec(f"{name}: no feasible plan among {len(solved)} candidate meshes")
    label, ev = best
    v = min(ev.violations, key=lambda x: x.value / x.limit if x.limit else float("inf"))
    return InfeasibleSpec(f"{name}: no feasible plan: the closest mesh, {label}, misses {v.label}: {v.text} "
                          f"({len(solved)} meshes tried)", _fixes(spec, v))


def verified(err: InfeasibleSpec, spec: Any, compile_fn: Callable[[Any], Any]) -> InfeasibleSpec:
    """``err`` with only the fixes that compile (``compile_fn(spec)`` returns a plan or raises a
    UserError), each naming the mesh it gives; or the fixes tried, when none does."""
    if not err.fixes:
        return err
    good, tried = [], []
    for fix in err.fixes:
        tried.append(fix.text)
        try:
            plan = compile_fn(fix.apply(spec))
        except UserError:
            continue
        good.append(f"{fix.text} (checked: compiles to {plan.mesh.label()})")
    msg = str(err)
    if good:
        msg += "; try " + " or ".join(good)
    else:
        msg += f"; no single change among these makes it feasible: {', '.join(tried)}"
    return InfeasibleSpec(msg)


def _section(spec: Any, name: str, **update: Any) -> Any:
    return spec.model_copy(update={name: getattr(spec, name).model_copy(update=update)})


def _smaller_dtype(spec: Any) -> list[Fix]:
    nxt = {"fp32": "bf16", "bf16": "fp8", "fp16": "fp8", "fp8": "int4"}.get(spec.model.weights_dtype)
    if nxt is None:
        return []
    return [Fix(f"weights_dtype {nxt}", lambda s: _section(s, "model", weights_dtype=nxt))]


def _more_gpus(spec: Any, at_least: int | None = None) -> list[Fix]:
    """The smallest world of the spec's node shape with at least ``at_least`` GPUs (default: twice
    the spec's): more GPUs per node up to 8, then more nodes."""
    hw = spec.hardware
    world = hw.gpus_per_node * hw.nodes
    want = max(at_least or 0, world * 2) if at_least is None or at_least <= world else at_least
    per, nodes = hw.gpus_per_node, hw.nodes
    while per * nodes < want:
        if per < 8:
            per *= 2
        else:
            nodes += 1
    if (per, nodes) == (hw.gpus_per_node, hw.nodes):
        return []
    text = f"{per * nodes} GPUs (" + (f"{nodes} nodes x {per}" if nodes > 1 else f"gpus_per_node {per}") + ")"
    return [Fix(text, lambda s: _section(s, "hardware", gpus_per_node=per, nodes=nodes))]


def _shorter(spec: Any) -> list[Fix]:
    """Half the input and output maxima (fewer KV tokens per sequence)."""
    w = spec.workload
    if w.trace is not None or w.input_tokens.max is None:
        return []

    def half(d: Any) -> Any:
        if d.max is None:
            return d
        top = max(d.min, d.max // 2)
        return d.model_copy(update={"max": top, "mean": min(d.mean, top)})

    i, o = half(w.input_tokens), half(w.output_tokens)
    return [Fix(f"input_tokens max {i.max}" + (f", output_tokens max {o.max}" if o.max is not None else ""),
                lambda s: _section(s, "workload", input_tokens=i, output_tokens=o))]


def _fixes(spec: Any, v: Any) -> list[Fix]:
    """Fixes of an ILP violation: memory, SLOs, arrival rate."""
    if v.label.startswith("mem_"):
        return [*_smaller_dtype(spec), *_shorter(spec), *_more_gpus(spec)]
    if v.label in ("slo_ttft", "slo_tpot"):
        key = "ttft_p90_ms" if v.label == "slo_ttft" else "tpot_p90_ms"
        relaxed = float(math.ceil(v.value * 1.1))
        return [Fix(f"slo.{key} {relaxed:g}", lambda s: _section(s, "slo", **{key: relaxed})), *_more_gpus(spec)]
    if v.label == "rate" and spec.workload.arrival_rate:
        lower = round(spec.workload.arrival_rate * 0.9 * (v.limit / v.value if v.value else 0.5), 3)
        return [*([Fix(f"workload.arrival_rate {lower:g}", lambda s: _section(s, "workload", arrival_rate=lower))]
                  if lower > 0 else []), *_more_gpus(spec)]
    return []


def _rejections(cset: CandidateSet) -> tuple[str, bool]:
    """The commonest reason, and the arithmetic of the closest memory rejection; True when memory binds."""
    mem = [r for r in cset.rejected if "GB per GPU" in r.reason]
    if mem:
        r = min(mem, key=lambda r: _need(r.reason))
        return f"every mesh runs out of memory; the closest, {r.label}: {r.reason}", True
    counts = Counter(r.reason for r in cset.rejected)
    top = "; ".join(f"{r} ({n} meshes)" if n > 1 else r for r, n in counts.most_common(3))
    return f"all {len(cset.rejected)} meshes are ruled out: {top}", False


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
