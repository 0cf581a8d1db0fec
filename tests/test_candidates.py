"""Candidate meshes: head divisibility, KV replication, node locality, memory, search limits."""

from __future__ import annotations

from planner.candidates import (Candidate, ModelFacts, SearchSpace, enumerate_candidates, heads_ok,
                                kv_heads_per_gpu, min_memory_per_gpu, pareto, weights_fit_message)

# Llama-3.1-70B-like: 80 layers, 64 heads, 8 KV heads, ~0.86 GB per layer in bf16
LLAMA70 = ModelFacts(layers=80, heads=64, kv_heads=8, layer_weights_gb=1.712, embed_gb=1.05, head_gb=1.05,
                     kv_gb_per_token_head=2 * 128 * 2 / 1e9)
VL = ModelFacts(layers=80, heads=64, kv_heads=8, layer_weights_gb=1.712, embed_gb=1.05, head_gb=1.05,
                kv_gb_per_token_head=2 * 128 * 2 / 1e9, vision_gb=1.35, vision_heads=16)


def _space(**kw) -> SearchSpace:
    base = dict(gpus=8, gpus_per_node=8, capacity_gb=140.0, activations_gb=4.0, min_kv_tokens=16384)
    base.update(kw)
    return SearchSpace(**base)


def test_every_candidate_uses_all_gpus_and_splits_heads():
    cs = enumerate_candidates(LLAMA70, _space())
    assert cs.candidates
    for c in cs.candidates:
        assert c.dp * c.pp * c.tp * c.sp == 8
        assert 64 % (c.tp * c.sp) == 0
    labels = {c.label for c in cs.candidates}
    # 70B bf16 (139 GB) does not fit one 140 GB GPU with KV, so no dp8 / single-GPU replicas
    assert "dp8" not in labels and "tp8" in labels and "tp2xsp4" in labels and "pp2xtp4" in labels
    assert any("dp8" == r.label and "GB per GPU" in r.reason for r in cs.rejected)


def test_kv_heads_replicated_when_fewer_than_p():
    facts = ModelFacts(layers=4, heads=16, kv_heads=2, layer_weights_gb=0.1, embed_gb=0.1, head_gb=0.1,
                       kv_gb_per_token_head=1e-6)
    assert heads_ok(facts, 4, 2) is None  # P = 8, 2 KV heads each replicated 4x
    assert kv_heads_per_gpu(2, 8) == 1 and kv_heads_per_gpu(8, 2) == 4
    assert "not divisible" in heads_ok(ModelFacts(4, 12, 4, 0.1, 0.1, 0.1, 1e-6), 8, 1)
    assert "multiple of the 3 KV heads" in heads_ok(ModelFacts(4, 24, 3, 0.1, 0.1, 0.1, 1e-6), 4, 1)


def test_tp_stays_inside_a_node_unless_allowed():
    space = _space(gpus=16, gpus_per_node=8)
    cs = enumerate_candidates(LLAMA70, space)
    assert all(c.tp * c.sp <= 8 for c in cs.candidates)
    assert any("inside a node" in r.reason for r in cs.rejected if r.label in ("tp16", "tp8xsp2"))
    wide = enumerate_candidates(LLAMA70, _space(gpus=16, gpus_per_node=8, allow_cross_node_tp=True))
    assert any(c.tp * c.sp == 16 for c in wide.candidates)


def test_shift_copy_counts_against_memory():
    # on 80 GB GPUs, tp8 fits 70B but tp2xsp4 holds W/2 + W/8 per GPU and must not
    space = _space(capacity_gb=76.0, min_kv_tokens=8192)
    cs = enumerate_candidates(LLAMA70, space)
    labels = {c.label for c in cs.candidates}
    assert "tp8" in labels and "tp2xsp4" not in labels
    need, text = min_memory_per_gpu(LLAMA70, space, Candidate(1, 1, 2, 4))
    assert need > 76.0 and "shift copy" in text


def test_search_limits_pin_the_mesh():
    cs = enumerate_candidates(LLAMA70, _space(tp=(2,), sp=(4,)))
    assert [c.label for c in cs.candidates] == ["tp2xsp4"]
    assert any("search.tp" in r.reason for r in cs.rejected)


def test_vision_placements_and_dedicated_gpus():
    cs = enumerate_candidates(VL, _space())
    shared = [c for c in cs.candidates if not c.dedicated_gpus]
    dedicated = [c for c in cs.candidates if c.dedicated_gpus]
    assert shared and dedicated
    assert all(c.placements == ("dedicated",) and c.llm_gpus + c.dedicated_gpus == 8 for c in dedicated)
    # 16 encoder heads do not split over P = 32? (never here) but do over 8: stage0_tp kept for tp8
    tp8 = next(c for c in shared if c.label == "tp8")
    assert "stage0_tp" in tp8.placements
    odd = ModelFacts(**{**VL.__dict__, "vision_heads": 12})
    tp8_odd = next(c for c in enumerate_candidates(odd, _space()).candidates if c.label == "tp8")
    assert tp8_odd.placements == ("stage0_dp",)  # no stage0_tp (12 heads over 8); all_dp = stage0_dp at pp1
    pp2 = next(c for c in shared if c.label == "pp2xtp4")
    assert pp2.placements == ("stage0_tp", "stage0_dp", "all_dp")


def test_min_gpus_allows_smaller_meshes():
    cs = enumerate_candidates(LLAMA70, _space(allow_fewer_gpus=True))
    assert {c.llm_gpus for c in cs.candidates} >= {2, 4, 8}


def test_weights_fit_message_has_the_arithmetic():
    big = ModelFacts(layers=126, heads=128, kv_heads=8, layer_weights_gb=6.3, embed_gb=2.1, head_gb=2.1,
                     kv_gb_per_token_head=5e-7)
    msg = weights_fit_message(big, _space(capacity_gb=80.0))
    assert msg is not None and "weights need 798 GB in bf16; 8 x 80 GB = 640 GB" in msg and "fp8" in msg
    assert weights_fit_message(LLAMA70, _space()) is None


def test_pareto_drops_dominated():
    items = ["a", "b", "c", "d"]
    m = {"a": (1, 5), "b": (2, 2), "c": (2, 3), "d": (1, 5)}
    assert pareto(items, lambda x: m[x]) == ["a", "b", "d"]


def test_dominance_pruning_never_changes_the_plan(monkeypatch):
    """Pruning only drops meshes that cannot win: compiling without it gives the same plan (the
    runners-up may differ: a dominated mesh can still be fifth best). Every candidate is simulated
    in both compiles, so the shortlist (which the dominated meshes would crowd) does not decide."""
    import functools
    from pathlib import Path

    import planner.pipeline as pipeline
    from planner import scoring
    from planner.api import compile_result, dump_plan

    monkeypatch.setattr(pipeline, "shortlist", functools.partial(scoring.shortlist, k=10_000))

    spec = Path(__file__).parents[1] / "examples" / "qwen2.5-vl-72b-8xh200.yaml"
    pruned = compile_result(spec)
    assert pruned.pruned > 0
    # patched where compile_spec looks it up: planner.pipeline imports it from planner.costing
    monkeypatch.setattr(pipeline, "prune_dominated", lambda costed: (list(costed), 0))
    full = compile_result(spec)
    assert full.pruned == 0 and full.solved + full.infeasible > pruned.solved + pruned.infeasible
    a = pruned.plan.model_copy(update={"runners_up": [], "notes": []})
    b = full.plan.model_copy(update={"runners_up": [], "notes": []})
    assert dump_plan(a) == dump_plan(b)
    assert pruned.plan.runners_up[0] == full.plan.runners_up[0]
