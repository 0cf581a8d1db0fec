"""The ILP is optimal: on random small cases (layers, per-layer costs, memory limits, SLOs,
vision placements) it reaches the same objective value as enumerating every contiguous split
and every placement with the same cost arithmetic (``ilp.evaluate``). 110 seeded cases: about 60
have an optimum (compared by objective value), the rest are infeasible for both."""

from __future__ import annotations

import random

import pytest

from planner.ilp import ItemCost, StageProblem, VisionOption, Weights, all_splits, evaluate, solve

CASES = 110


def _brute(p: StageProblem):
    best = None
    placements = [v.placement for v in p.vision] or [None]
    for split in all_splits(len(p.layers), p.stages):
        for v in placements:
            e = evaluate(p, split, v)
            if e.feasible and (best is None or e.objective < best.objective):
                best = e
    return best


def _case(seed: int) -> StageProblem:
    rng = random.Random(seed)
    L = rng.randint(2, 9)
    S = rng.randint(1, min(4, L))
    uniform = rng.random() < 0.4
    if uniform:
        one = ItemCost(thr=rng.uniform(0.5, 3), ttft=rng.uniform(1, 5), tpot=rng.uniform(0.1, 1), mem=rng.uniform(1, 5))
        layers = tuple([one] * L)
    else:
        layers = tuple(ItemCost(thr=rng.uniform(0.5, 3), ttft=rng.uniform(1, 5), tpot=rng.uniform(0.1, 1),
                                mem=rng.uniform(1, 5)) for _ in range(L))
    vision = ()
    if rng.random() < 0.6:
        vision = tuple(VisionOption(name, stage0_thr=rng.uniform(0, 4) if name.startswith("stage0") else 0.0,
                                    every_thr=rng.uniform(0, 1.5) if name == "all_dp" else 0.0,
                                    separate_thr=rng.uniform(0, 6) if name == "dedicated" else 0.0,
                                    stage0_mem=rng.uniform(0, 4) if name.startswith("stage0") else 0.0,
                                    every_mem=rng.uniform(0, 2) if name == "all_dp" else 0.0,
                                    ttft=rng.uniform(1, 10))
                       for name in rng.sample(["stage0_tp", "stage0_dp", "all_dp", "dedicated"], rng.randint(1, 4)))
    total_mem = sum(x.mem for x in layers)
    cap = rng.uniform(0.9, 2.0) * (total_mem / S + 2)
    lat_ttft = sum(x.ttft for x in layers)
    return StageProblem(
        layers=layers, stages=S,
        first=ItemCost(thr=rng.uniform(0, 2), ttft=0.5, tpot=0.1, mem=rng.uniform(0, 3)),
        last=ItemCost(thr=rng.uniform(0, 2), ttft=0.5, tpot=0.1, mem=rng.uniform(0, 3)),
        stage_mem=rng.uniform(0, 1), capacity_gb=cap, p2p_ttft_ms=0.2, p2p_tpot_ms=0.05,
        vision=vision, output_tokens=rng.choice([1, 50, 200]),
        weights=rng.choice([Weights(1.0, 1e-3), Weights(1e-3, 1.0), Weights(0.3, 0.02)]),
        max_ttft_ms=lat_ttft + rng.uniform(0, 12) if rng.random() < 0.4 else None,
        max_thr_ms=rng.uniform(3, 12) if rng.random() < 0.3 else None,
    )


@pytest.mark.parametrize("seed", range(CASES))
def test_ilp_matches_brute_force(seed: int):
    p = _case(seed)
    sol = solve(p)
    ref = _brute(p)
    if ref is None:
        assert sol.status == "infeasible"
        return
    assert sol.status == "optimal", f"brute force found {ref.stages} {ref.vision} obj {ref.objective}"
    assert sol.best is not None and sol.best.feasible
    assert sol.best.objective == pytest.approx(ref.objective, rel=1e-6, abs=1e-6)


def test_cases_cover_both_formulations_and_infeasible_ones():
    formulations, infeasible = set(), 0
    for seed in range(CASES):
        p = _case(seed)
        sol = solve(p)
        formulations.add(sol.formulation)
        infeasible += sol.status == "infeasible"
    assert {"boundaries", "cumulative", "single-stage"} <= formulations
    assert 0 < infeasible < CASES // 2
