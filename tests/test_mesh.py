"""plans.mesh: the parallel arithmetic every layer asks (ranks, head splits, modes, nodes, encoder)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from plans.errors import UserError
from plans.mesh import (HeadSplit, ParallelDims, even_layers, even_range, heads_problem, kv_heads_per_gpu,
                        mesh_label)
from plans.schema import load_plan

ROOT = Path(__file__).parents[1]
SHIPPED = sorted((ROOT / "plans").glob("*.plan.yaml"))


def test_rank_is_row_major_and_coords_invert_it():
    d = ParallelDims(dp=2, pp=3, tp=2, sp=2)
    seen = set()
    for dp, pp, tp, sp in itertools.product(range(2), range(3), range(2), range(2)):
        r = d.rank(dp, pp, tp, sp)
        assert r == ((dp * 3 + pp) * 2 + tp) * 2 + sp
        assert tuple(d.coords(r)) == (dp, pp, tp, sp)
        seen.add(r)
    assert seen == set(range(d.size)) and d.size == 24
    with pytest.raises(UserError, match="rank 24 is outside the mesh of 24 GPUs"):
        d.coords(24)


def test_other_axis_orders_are_bijections_too():
    d = ParallelDims(dp=2, pp=2, tp=3, sp=2, axis_order=("pp", "dp", "sp", "tp"))
    assert sorted(d.rank(*d.coords(r)) for r in range(d.size)) == list(range(d.size))
    assert d.rank(dp=1) == 3 * 2  # dp is now inside pp: one step of dp skips sp*tp ranks
    with pytest.raises(UserError, match="must order each of dp, pp, tp, sp once"):
        ParallelDims(axis_order=("dp", "pp", "tp", "tp"))


def test_stage_ranks_are_in_shift_rank_order():
    d = ParallelDims(dp=2, pp=2, tp=2, sp=4)
    ranks = d.stage_ranks(1, 1)
    assert len(ranks) == d.P == 8
    for r in ranks:
        c = d.coords(r)
        assert (c.dp, c.pp) == (1, 1)
        assert ranks.index(r) == d.shift_rank(c.tp, c.sp) == c.tp * 4 + c.sp
    assert d.replica_ranks(1) == d.stage_ranks(1, 0) + d.stage_ranks(1, 1)
    assert d.replica_ranks(0, [1]) == d.stage_ranks(0, 1)


@pytest.mark.parametrize("heads, kv, tp, sp", [(8, 8, 2, 2), (8, 2, 2, 2), (8, 2, 1, 8), (12, 2, 2, 3), (4, 1, 2, 2)])
def test_sp_tp_heads_are_the_tp_heads_of_the_same_gpus(heads, kv, tp, sp):
    """After the Ulysses all-to-all, sp rank j of tp group t holds shift rank t*sp + j's TP block:
    the same query and KV heads, so one KV cache serves both modes."""
    hs = HeadSplit(heads, kv, tp * sp)
    for t in range(tp):
        blocks = [hs.q_heads(t * sp + j) for j in range(sp)]
        assert hs.q_heads_sptp(t, sp) == [h for b in blocks for h in b]
        assert hs.kv_heads_sptp(t, sp) == [h for j in range(sp) for h in hs.kv_heads_of(t * sp + j)]
    every = sorted(h for r in range(tp * sp) for h in hs.q_heads(r))
    assert every == list(range(heads))  # each query head on exactly one GPU
    assert all(len(hs.kv_heads_of(r)) == kv_heads_per_gpu(kv, tp * sp) for r in range(tp * sp))


def test_head_problems_name_the_arithmetic():
    assert heads_problem(64, 8, 4, 2) is None and heads_problem(64, 2, 4, 2) is None  # 2 KV heads replicated 4x
    assert heads_problem(64, 8, 3) == "64 query heads are not divisible by tp*sp = 3 (64 % 3 = 1)"
    assert heads_problem(48, 12, 8) == "12 KV heads are not divisible by tp*sp = 8 (12 % 8 = 4)"
    assert heads_problem(24, 3, 2, 2).startswith("tp*sp = 2*2 = 4 is not a multiple of the 3 KV heads (4 % 3 = 1)")
    with pytest.raises(UserError, match=r"plan x: 4 query heads are not divisible by tp\*sp = 4\*2 = 8"):
        ParallelDims(tp=4, sp=2, name="plan x").check_heads(4, 4)
    with pytest.raises(UserError, match=r"intermediate_size = 36 is not divisible by tp\*sp = 8"):
        ParallelDims(tp=2, sp=4, shift=True, threshold=10).check_model(8, 8, 36)
    ParallelDims(tp=2, sp=4).check_model(8, 8, 36)  # no shift: only the W/tp layout, 36 % 2 == 0


def test_layouts_follow_shift():
    assert ParallelDims(tp=4).layouts() == ("tp",)
    assert ParallelDims(tp=2, sp=2).layouts() == ("sp_tp",)
    assert ParallelDims(tp=2, sp=2, shift=True, threshold=8).layouts() == ("sp_tp", "tp")


def test_even_splits():
    assert even_layers(80, 3) == ((0, 26), (27, 53), (54, 79))
    assert even_layers(5, 5) == tuple((i, i) for i in range(5))
    with pytest.raises(UserError, match="pp = 6 needs 1 <= pp <= 5 decoder layers"):
        even_layers(5, 6)
    assert even_range(96, 4, 3, "intermediate_size / tp") == (72, 96)
    with pytest.raises(UserError, match=r"intermediate_size / tp = 10 is not divisible by 4 \(10 = 2 x 4 \+ 2\)"):
        even_range(10, 4, 0, "intermediate_size / tp")


def test_construction_checks_with_arithmetic():
    with pytest.raises(UserError, match=r"dp\*pp\*tp\*sp = 2\*1\*8\*1 = 16 GPUs > 8 per node x 1 nodes = 8"):
        ParallelDims(dp=2, tp=8, gpus_per_node=8, nodes=1)
    with pytest.raises(UserError, match=r"= 8 \+ 1 encoder GPUs = 9 GPUs > 8 per node"):
        ParallelDims(tp=8, gpus_per_node=8, nodes=1, placement="dedicated", dedicated_gpus=1)
    with pytest.raises(UserError, match="tp = 0; every parallel degree must be >= 1"):
        ParallelDims(tp=0)
    with pytest.raises(UserError, match=r"shift is enabled but sp = 1 \(needs sp >= 2\)"):
        ParallelDims(tp=4, shift=True, threshold=8)
    with pytest.raises(UserError, match="neither shift.threshold_tokens nor stage 0's"):
        ParallelDims(pp=2, sp=2, shift=True, stage_thresholds=(None, None))
    with pytest.raises(UserError, match="'dedicated' needs dedicated_gpus >= 1, got 0"):
        ParallelDims(placement="dedicated")
    with pytest.raises(UserError, match="placement 'stage1' is not one of none, stage0_tp"):
        ParallelDims(placement="stage1")


def test_mode_for_and_the_threshold_fallback():
    d = ParallelDims(pp=3, tp=2, sp=2, shift=True, threshold=100, stage_thresholds=(None, 50, None))
    assert [d.threshold_of(s) for s in range(3)] == [100, 50, 100]  # own, else the plan's
    assert d.stage_modes(100) == ("tp", "sp_tp", "tp") and d.stage_modes(101) == ("sp_tp",) * 3
    assert d.stage_modes(50) == ("tp",) * 3
    only_stage0 = ParallelDims(pp=2, sp=2, shift=True, stage_thresholds=(30, 60))
    assert only_stage0.threshold_of() == 30 and only_stage0.mode_for(45) == "sp_tp"  # plan-wide: stage 0's own
    assert only_stage0.mode_for(45, 1) == "tp"
    assert ParallelDims(tp=2, sp=2).mode_for(1) == "sp_tp"  # shift off: always SP x TP
    assert ParallelDims(tp=8).mode_for(10**6) == "tp"  # sp = 1: plain TP whatever the size


def test_node_crossings_follow_each_gpus_peer():
    assert [ParallelDims(pp=2, tp=8, gpus_per_node=8).crosses_nodes(0)] == [True]
    assert [ParallelDims(pp=4, tp=4, gpus_per_node=8).crosses_nodes(b) for b in range(3)] == [False, True, False]
    assert not ParallelDims(pp=2, tp=2, sp=2, gpus_per_node=16).crosses_nodes(0)
    assert ParallelDims(dp=2, pp=2, tp=2, gpus_per_node=4).crosses_nodes(0, replica=1) is False
    # cross-node TP (P = 12 on 8-GPU nodes): GPU 0 sends to GPU 12 on the next node
    assert ParallelDims(pp=2, tp=12, gpus_per_node=8).crosses_nodes(0)
    assert not ParallelDims(pp=2, tp=8).crosses_nodes(0)  # no hardware given: one node


def test_encoder_stages_per_placement():
    vl = dict(dp=2, pp=3, tp=2, sp=2, vision=True)
    assert ParallelDims(**vl, placement="stage0_tp").encoder() == ((0,), 4, 1)
    assert ParallelDims(**vl, placement="stage0_tp").encoder(vision_heads=6).tp == 1  # 6 heads over 4 GPUs: whole
    assert ParallelDims(**vl, placement="none").encoder() == ((0,), 4, 1)
    assert ParallelDims(**vl, placement="stage0_dp").encoder() == ((0,), 1, 4)
    assert ParallelDims(**vl, placement="all_dp").encoder() == ((0, 1, 2), 1, 12)
    assert ParallelDims(**vl, placement="dedicated", dedicated_gpus=2).encoder() == ((), 1, 2)
    assert ParallelDims(pp=2, placement="all_dp").encoder_stages() == ()  # text model: nothing to encode
    assert ParallelDims(tp=4, placement="dedicated", dedicated_gpus=2).gpus == 6
    assert ParallelDims(tp=4, placement="stage0_dp", dedicated_gpus=2).encoder_gpus == 0  # only "dedicated" has them


def test_labels():
    assert mesh_label(2, 1, 4, 2) == "dp2xtp4xsp2" and mesh_label() == "single"
    assert ParallelDims(pp=2, sp=4).label() == "pp2xsp4"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_plans_agree_with_the_simulators_reading(path):
    """The simulator reads a plan through the same ParallelDims: same modes per stage, same hops."""
    from costmodels.simulator import SimConfig

    plan = load_plan(path)
    d, c = plan.dims(), SimConfig.from_plan(plan)
    for tokens in (1, 64, 256, 400, 575, 1024, 8192):
        modes = c.stage_modes(tokens) or (c.mode(tokens),) * c.pp
        assert modes == d.stage_modes(tokens)
    assert [c.inter_node(b) for b in range(c.pp - 1)] == [d.crosses_nodes(b) for b in range(d.pp - 1)]
    assert [i for i, s in enumerate(plan.stages) if s.vision] == list(d.encoder_stages())


def test_a_plan_whose_stage_vision_contradicts_the_placement_is_refused():
    plan = load_plan(ROOT / "plans" / "qwen2.5-vl-72b-8xh200.plan.yaml")
    assert plan.vision.placement == "stage0_dp" and plan.stages[0].vision
    bad = plan.model_copy(update={"stages": [s.model_copy(update={"vision": False}) for s in plan.stages]})
    with pytest.raises(UserError, match=r"stages \[\] have vision: true; vision.placement stage0_dp .* runs the encoder "
                                        r"on stages \[0\]"):
        bad.check()
