"""The stage ILP's semantics on hand-made cases: contiguity, embedding/lm_head offsets,
per-stage memory, vision placement, SLO and rate constraints, pinned stages, labelled
constraints, and the result object."""

from __future__ import annotations

import pytest

from planner.ilp import ItemCost, StageProblem, VisionOption, Weights, evaluate, objective_weights, solve
from plans.mesh import even_layers

LAYER = ItemCost(thr=1.0, ttft=2.0, tpot=0.1, mem=1.0)


def _p(**kw) -> StageProblem:
    base = dict(layers=(LAYER,) * 8, stages=2)
    base.update(kw)
    return StageProblem(**base)


def test_equal_layers_split_evenly_and_contiguously():
    sol = solve(_p())
    assert sol.status == "optimal" and sol.formulation == "boundaries" and sol.solver in ("cbc", "highs")
    assert sol.best.stages == ((0, 3), (4, 7))
    assert sol.best.bottleneck_ms == pytest.approx(4.0)


def test_heavy_lm_head_moves_layers_to_the_first_stage():
    # lm_head costs 2 layers: the optimum puts 5 layers on stage 0 and 3 on stage 1
    sol = solve(_p(last=ItemCost(thr=2.0)))
    assert sol.best.stages == ((0, 4), (5, 7))
    assert sol.best.bottleneck_ms == pytest.approx(5.0)
    assert "bottleneck_stage0" in sol.binding and "bottleneck_stage1" in sol.binding


def test_memory_binds_the_split():
    # stage 1 carries a 3 GB lm_head; capacity 6 GB per GPU allows at most 3 layers there
    sol = solve(_p(last=ItemCost(mem=3.0), capacity_gb=6.0, layers=(ItemCost(thr=1.0, mem=1.0),) * 8,
                   stages=2, first=ItemCost(thr=0.0)))
    assert sol.status == "optimal"
    assert sol.best.stage_mem_gb[1] <= 6.0 + 1e-9
    assert sol.best.stages[1][1] - sol.best.stages[1][0] + 1 <= 3
    assert "mem_stage1" in sol.binding


def test_memory_infeasible_reports_status_not_exception():
    sol = solve(_p(capacity_gb=3.0))  # 8 GB of layers over 2 stages cannot fit 3 GB each
    assert sol.status == "infeasible" and sol.best is None
    ev = evaluate(_p(capacity_gb=3.0), even_layers(8, 2), None)
    assert not ev.feasible and ev.violations[0].label == "mem_stage0"
    assert "needs 4.0 GB per GPU; capacity 3.0 GB" in ev.violations[0].text


def test_heterogeneous_layers_use_the_cumulative_formulation():
    layers = tuple(ItemCost(thr=float(i + 1), mem=1.0) for i in range(6))  # 1..6, total 21
    sol = solve(_p(layers=layers, stages=3))
    assert sol.formulation == "cumulative"
    # best 3-way contiguous split of 1..6 minimising the max sum: (1,2,3 | 4,5 | 6) -> 6, 9, 6
    assert sol.best.bottleneck_ms == pytest.approx(9.0)
    assert sol.best.stages == ((0, 2), (3, 4), (5, 5))


def test_vision_placement_is_chosen_by_cost_and_memory():
    opts = (VisionOption("stage0_tp", stage0_thr=3.0, stage0_mem=0.5, ttft=5.0),
            VisionOption("all_dp", every_thr=0.5, every_mem=2.0, ttft=3.0),
            VisionOption("dedicated", separate_thr=5.0, ttft=6.0))
    sol = solve(_p(vision=opts))
    # all_dp: 4 + 0.5 = 4.5 per stage; stage0_tp: best 3/5 split gives 6; dedicated: its own stage 5
    assert sol.best.vision == "all_dp" and sol.best.bottleneck_ms == pytest.approx(4.5)
    # 4.6 GB per GPU: all_dp needs 4 + 2 GB; stage0_tp fits 4/4 but its stage 0 takes 7; dedicated: 5
    tight = solve(_p(vision=opts, capacity_gb=4.6))
    assert tight.best.vision == "dedicated" and tight.best.bottleneck_ms == pytest.approx(5.0)
    assert all(m <= 4.6 + 1e-9 for m in tight.best.stage_mem_gb)


def test_slo_constraints_are_labelled_and_enforced():
    opts = (VisionOption("stage0_tp", stage0_thr=0.0, ttft=50.0), VisionOption("all_dp", every_thr=1.0, ttft=1.0))
    # latency-blind objective would pick stage0_tp (no throughput cost); the TTFT SLO forces all_dp
    p = _p(vision=opts, max_ttft_ms=8 * 2.0 + 10.0, weights=Weights(1.0, 0.0))
    sol = solve(p)
    assert sol.best.vision == "all_dp" and sol.best.ttft_ms <= p.max_ttft_ms
    assert solve(_p(max_tpot_ms=0.5)).status == "infeasible"  # 8 x 0.1 ms > 0.5 ms whatever the split


def test_rate_floor_for_min_gpus():
    assert solve(_p(max_thr_ms=4.0)).status == "optimal"
    assert solve(_p(max_thr_ms=3.9)).status == "infeasible"


def test_pinned_stages_are_kept():
    sol = solve(_p(pinned=((0, 1), (2, 7))))
    assert sol.formulation == "pinned" and sol.best.stages == ((0, 1), (2, 7))
    assert sol.best.bottleneck_ms == pytest.approx(6.0)


def test_single_stage_and_objective_weights():
    sol = solve(_p(stages=1))
    assert sol.formulation == "single-stage" and sol.best.stages == ((0, 7),)
    assert objective_weights("min_latency").latency > objective_weights("min_latency").throughput
    assert objective_weights("max_throughput").throughput > objective_weights("max_throughput").latency
    w = objective_weights("balanced", z_ref=4.0, lat_ref=200.0)
    assert w.throughput * 4.0 == pytest.approx(w.latency * 200.0)


def test_min_latency_objective_prefers_the_faster_placement():
    opts = (VisionOption("stage0_tp", stage0_thr=0.1, ttft=20.0), VisionOption("all_dp", every_thr=1.0, ttft=2.0))
    thr = solve(_p(vision=opts, weights=objective_weights("max_throughput")))
    lat = solve(_p(vision=opts, weights=objective_weights("min_latency")))
    assert thr.best.vision == "stage0_tp" and lat.best.vision == "all_dp"


def test_bad_stage_count_is_a_value_error():
    with pytest.raises(ValueError):
        solve(_p(stages=9))


# ------------------------------------------------------------------ shift threshold (planner.threshold)

from planner.threshold import crossover, ladder  # noqa: E402


def test_crossover_is_exact_on_linear_curves():
    # TP: 10 + 0.02 T ms; SP x TP: 14 + 0.01 T ms -> equal at T = 400; SP x TP wins from 401
    c = crossover(lambda t: 14 + 0.01 * t, lambda t: 10 + 0.02 * t, 8192)
    assert c.crossover_tokens == 401 and c.threshold_tokens == 400
    for tokens, sp_ms, tp_ms in c.curve:
        assert (tokens <= c.threshold_tokens) == (tp_ms <= sp_ms)
    assert [t for t, _, _ in c.curve] == [16, 64, 256, 1024, 4096, 8192]


def test_crossover_edges():
    never = crossover(lambda t: 2.0 * t, lambda t: 1.0 * t, 4096)
    assert never.crossover_tokens is None and never.threshold_tokens == 4096  # always TP
    always = crossover(lambda t: 0.5 * t, lambda t: 1.0 * t, 4096)
    assert always.crossover_tokens == 1 and always.threshold_tokens == 0  # always SP x TP
    assert ladder(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_mixed_step_costs_attention_per_part():
    from graph.opgraph import StepShape
    from planner.inputs import mixed_ms

    d, p = StepShape.decode([1000] * 4), StepShape.prefill([64])

    def affine(x: StepShape) -> float:  # linear in every number: parts or whole give the same
        return 1.0 + 2.0 * x.tokens + 0.001 * x.pairs + 0.01 * x.kv

    assert mixed_ms(affine, d, p) == pytest.approx(affine(d + p))
    assert mixed_ms(affine, d, None) == affine(d)

    def regime(x: StepShape) -> float:  # attention priced by tokens per sequence, like a kernel table
        q = x.tokens / x.seqs
        return x.tokens + (x.kv * 0.01 if q < 1.5 else x.pairs * 0.1)

    expect = regime(d + p) - (regime(d + p) - (d + p).tokens) + (regime(d) - d.tokens) + (regime(p) - p.tokens)
    assert mixed_ms(regime, d, p) == pytest.approx(expect)
    assert mixed_ms(regime, d, p) == pytest.approx((d + p).tokens + d.kv * 0.01 + p.pairs * 0.1)
