"""The compile pipeline: spec -> graph -> cost model -> candidates -> ILP -> scoring -> Plan.

Each stage is a function with typed input and output, so any of them can be run, cached
and tested alone::

    spec = load(path)                                   # planner.spec.Spec
    model = build_model(spec)                           # Model: HF config, OpGraph (cached trace), CostModel
    mix = token_mix(spec, model)                        # TokenMix: the workload's reference steps
    cset, facts, space = candidate_set(spec, model, mix)                       # rules + memory bound
    costed = [cost_candidate(c, model, mix, spec, facts, space) for c in cset.candidates]
    costed, pruned = prune_dominated(costed)            # drop candidates another beats on every bound
    solved = [solve_candidate(x) for x in costed]       # one ILP per candidate (stage split, encoder)
    scored = [static_score(s, spec, mix) for s in solved if s.ok]   # then simulate_score on the shortlist
    plan = build_plan(best, spec, model, mix, runners, notes)       # plans.schema.Plan

The stages live in modules of their own:

    stages 1-3   planner.inputs      spec, Model (HF config, OpGraph, CostModel), TokenMix
    stages 4-5b  planner.costing     candidate meshes, costs per candidate (StageProblem), dominance pruning
    stages 6-7   planner.scoring     the ILP per candidate, static score, simulator on the shortlist, ranking
    stage 8      planner.plan_build  per-stage shift thresholds, memory per GPU, the Plan

``compile_spec`` runs them all. SLOs are used twice: as hard bounds in the ILP on what no load
can improve (``planner.costing``) and, under load, as the first ranking key on the simulator's
p90s (``planner.scoring``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from planner.costing import candidate_set, cost_candidate, prune_dominated
from planner.ilp import StageProblem
from planner.inputs import build_model, check_pins, token_mix
from planner.plan_build import build_plan
from planner.scoring import (RANKING, SIM_REQUESTS, confirm_predicted, plan_coster, shortlist, shortlist_workload, simulate_score,
                             simulator_available, solve_candidate, static_score, with_headroom)
from planner.spec import Spec

Progress = Callable[[str], None]


# ------------------------------------------------------------------ the whole pipeline


@dataclass
class CompileResult:
    plan: Any  # plans.schema.Plan
    candidates: int
    rejected: int
    solved: int
    infeasible: int
    simulated: int
    notes: list[str] = field(default_factory=list)
    pruned: int = 0  # dominated candidates dropped before the ILP
    problem: StageProblem | None = None  # the chosen mesh's ILP input (``planner.ilp.lp_text`` shows it)


def compile_spec(spec: Spec, progress: Progress | None = None, check_hints: bool = True) -> CompileResult:
    """Every stage above in order; raises UserError (with the binding arithmetic) when no
    candidate is feasible. The fixes such an error suggests are each compiled first and printed
    only if they work (``check_hints=False`` for those compiles themselves)."""
    from planner.infeasible import explain, verified

    def infeasible(err):
        if not check_hints:
            return err
        say("checking the fixes to suggest")
        return verified(err, spec, lambda s: compile_spec(s, check_hints=False).plan)

    say = progress or (lambda _msg: None)
    model = build_model(spec, say)
    check_pins(spec, model)
    say("reading the workload")
    mix = token_mix(spec, model)
    say("enumerating candidate meshes")
    cset, facts, space = candidate_set(spec, model, mix)
    if not cset.candidates:
        raise infeasible(explain(spec, facts, space, cset, []))
    say(f"costing {len(cset.candidates)} candidates")
    costed = [cost_candidate(c, model, mix, spec, facts, space) for c in cset.candidates]
    costed, pruned = prune_dominated(costed)
    say(f"solving {len(costed)} ILPs ({pruned} dominated candidates dropped)")
    solved = [solve_candidate(x) for x in costed]
    ok = [s for s in solved if s.ok]
    if not ok:
        raise infeasible(explain(spec, facts, space, cset, solved))
    scored = sorted((static_score(s, spec, mix) for s in ok), key=lambda x: (x.key, x.label))
    notes = []
    if model.cost.roofline:
        notes.append(f"no calibration profile for {model.cost.gpu.name}: costs are datasheet rooflines")
    simulated = 0
    if simulator_available():
        short = shortlist(scored, mix)
        say(f"simulating the shortlist ({len(short)} plans)")
        short_plans = [build_plan(x, spec, model, mix) for x in short]
        wl = shortlist_workload(spec, model)
        costers = [plan_coster(p, model) for p in short_plans]
        resim = [simulate_score(x, p, model, spec, mix, wl, c) for x, p, c in zip(short, short_plans, costers)]
        if spec.objective == "max_throughput":
            resim = with_headroom(resim, short_plans, model, spec, wl, costers)
        simulated = len(resim)
        scored = sorted(resim, key=lambda x: (x.key, x.label)) + [x for x in scored if x not in short]
    else:
        notes.append("predicted metrics are static estimates (unloaded TTFT, TPOT at the operating batch)")
    best, runners = scored[0], scored[1:1 + 4]
    notes.append(f"chosen for {spec.objective} among {len(ok)} feasible meshes ({simulated} simulated on "
                 f"{min(spec.workload.requests, SIM_REQUESTS)} requests of the workload): {RANKING[spec.objective]}")
    if simulated:
        notes.extend(wl.notes)  # caps the workload hits (images resized to max_pixels, ...)
        notes.append(f"predicted: the simulator on the spec's {spec.workload.requests} requests at "
                     f"{mix.rate:g} req/s, as `plan simulate` reports")
    say("writing the plan")
    if spec.engine != "shiftplan":
        from planner.export.engines import INFO

        info = INFO[spec.engine]
        notes.append(f"searched only meshes and encoder placements {info.title} {info.version} runs (spec engine: "
                     f"{spec.engine}); `plan export` writes its launch")
    plan = build_plan(best, spec, model, mix, runners, notes)
    if simulated:
        say(f"confirming the prediction on the spec's {spec.workload.requests} requests")
        plan = confirm_predicted(plan, spec, model)
    return CompileResult(plan, len(cset.candidates), len(cset.rejected), len(ok), len(solved) - len(ok), simulated,
                         notes, pruned, best.solved.costed.problem)
