"""Cost model: collectives, per-op costs under (tp, sp), blocks/steps/stages, profiles, crossover."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from costmodels import collectives as C
from costmodels.fit import decode_attention_bytes, fit_profile
from costmodels.interp import LogGrid
from costmodels.model import Breakdown, CostModel
from costmodels.opcost import ROOFLINE_COMPUTE_EFF, ROOFLINE_MEM_EFF, Rates, op_rec, op_time
from costmodels.profile import load_profile
from costmodels.synthetic import build_graph
from graph.hf_config import load_config
from graph.opgraph import StepShape
from plans.errors import UserError


@pytest.fixture(scope="module")
def g8():
    return build_graph(load_config("llama-3.1-8b"))


@pytest.fixture(scope="module")
def g70():
    return build_graph(load_config("llama-3.1-70b"))


@pytest.fixture(scope="module")
def gvl():
    return build_graph(load_config("qwen2-vl-7b"))


@pytest.fixture(scope="module")
def h100():
    prof = load_profile("h100")
    assert prof is not None, "the committed H100 profile is missing"
    return prof


# ----------------------------------------------------------------------------- collectives

LINK = C.Link(gbps=100.0, alpha_us=0.0, alpha0_us=0.0)


def test_ring_all_reduce_bandwidth_term():
    S, n = 1e9, 8
    assert C.all_reduce_ms(S, n, LINK) == pytest.approx(2 * (n - 1) / n * S / 100e9 * 1e3)
    assert C.all_reduce_ms(S, 1, LINK) == 0.0


def test_gather_scatter_all_to_all_p2p():
    S, n = 4e8, 4
    half = (n - 1) / n * S / 100e9 * 1e3
    assert C.all_gather_ms(S, n, LINK) == pytest.approx(half)
    assert C.reduce_scatter_ms(S, n, LINK) == pytest.approx(half)
    assert C.all_to_all_ms(S, n, LINK) == pytest.approx(half)
    assert C.p2p_ms(S, LINK) == pytest.approx(S / 100e9 * 1e3)


def test_alpha_terms_count_ring_steps():
    link = C.Link(gbps=1e9, alpha_us=2.0, alpha0_us=5.0)  # bandwidth term ~0
    assert C.all_reduce_ms(1.0, 8, link) == pytest.approx((5 + 2 * 7 * 2) * 1e-3, rel=1e-6)
    assert C.all_gather_ms(1.0, 8, link) == pytest.approx((5 + 7 * 2) * 1e-3, rel=1e-6)


def test_groups_spanning_nodes_use_inter_node_link():
    from costmodels.hardware import get_gpu

    links = C.default_links(get_gpu("h100"), gpus_per_node=8)
    assert links.for_group(8) is links.intra
    assert links.for_group(16) is links.inter
    assert links.for_group(4, stride=4) is links.inter  # tp group of an sp=4 mesh spans 16 ranks
    assert links.inter.gbps < links.intra.gbps


def test_an_all_reduce_over_a_whole_node_reads_its_published_bus_bandwidth():
    """On an NVSwitch node whose 8-GPU NCCL all-reduce bandwidth is published
    (``hardware.NODE_ALL_REDUCE_GBPS``), an all-reduce over all its GPUs runs at it; smaller groups,
    other collectives, groups across nodes and GPUs without the figure keep the fitted link."""
    from costmodels.hardware import NODE_ALL_REDUCE_GBPS, get_gpu

    fit = {"bus_gbps": 300.0, "alpha_us": 1.0, "alpha0_us": 11.0}
    links = C.default_links(get_gpu("h200"), 8, fit)
    big = 256 << 20
    assert links.ms("all_reduce", big, 8) == pytest.approx(
        C.all_reduce_ms(big, 8, C.Link(NODE_ALL_REDUCE_GBPS["h200"], 1.0, 11.0)))
    assert links.ms("all_reduce", big, 8) < 0.7 * C.all_reduce_ms(big, 8, links.intra)
    assert links.ms("all_reduce", big, 4) == C.all_reduce_ms(big, 4, links.intra)
    assert links.ms("all_gather", big, 8) == C.all_gather_ms(big, 8, links.intra)
    assert links.ms("all_reduce", big, 8, stride=2) == C.all_reduce_ms(big, 8, links.inter)  # spans two nodes
    a100 = C.default_links(get_gpu("a100"), 8, fit)
    assert "a100" not in NODE_ALL_REDUCE_GBPS and a100.ms("all_reduce", big, 8) == C.all_reduce_ms(big, 8, a100.intra)


# ----------------------------------------------------------------------------- per-op costs

RATES = Rates(peak_flops=1000e12, attn_flops=1000e12, bw=3e12, w_bytes=2, a_bytes=2, kv_bytes=2)


def _op(g, suffix):
    name = next(n for n in g.graph.nodes if n.endswith(suffix) and n.startswith("layers.0."))
    return op_rec(g.op(name), "text")


def test_matmul_compute_bound_roofline(g8):
    r = _op(g8, "mlp.gate_proj")
    s = StepShape.prefill([8192])
    c, m, o = op_time(r, s, 1, 1, RATES, None)
    assert c > m
    assert c == pytest.approx(2 * 8192 * 4096 * 14336 / (1000e12 * ROOFLINE_COMPUTE_EFF) * 1e3)
    # column sharding over t and SP over s both divide the FLOPs
    c4, _, _ = op_time(r, s, 4, 1, RATES, None)
    c22, _, _ = op_time(r, s, 2, 2, RATES, None)
    assert c4 == pytest.approx(c / 4) and c22 == pytest.approx(c / 4)


def test_matmul_memory_bound_reads_weights_once(g8):
    r = _op(g8, "mlp.down_proj")
    c, m, _ = op_time(r, StepShape.decode([100]), 1, 1, RATES, None)
    assert m > c
    w = 14336 * 4096 * 2
    assert m == pytest.approx((w + (14336 + 4096) * 2) / (3e12 * ROOFLINE_MEM_EFF) * 1e3)
    # row sharding divides the weight bytes by t; SP does not (each SP rank holds W/t)
    _, m_tp, _ = op_time(r, StepShape.decode([100]), 4, 1, RATES, None)
    _, m_sp, _ = op_time(r, StepShape.decode([100]), 1, 4, RATES, None)
    assert m_tp == pytest.approx(m / 4, rel=0.01)
    assert m_sp == pytest.approx(m, rel=0.01)


def test_attention_split_over_heads_and_kv_replication(g70):
    r = _op(g70, "attn")
    s = StepShape.decode([4096] * 32)
    _, m1, _ = op_time(r, s, 1, 1, RATES, None)
    _, m8, _ = op_time(r, s, 8, 1, RATES, None)
    _, m16, _ = op_time(r, s, 8, 2, RATES, None)
    assert m8 == pytest.approx(m1 / 8, rel=0.02)  # 8 KV heads over 8 GPUs: one each
    kv16 = r.kv_read(s) / 8 * 2  # 16 GPUs > 8 KV heads: still one KV head per GPU (replicated)
    assert m16 > m8 * 0.9 and m16 * 3e12 * ROOFLINE_MEM_EFF / 1e3 >= kv16


# ----------------------------------------------------------------------------- blocks and steps


def test_breakdown_adds_up_and_tp_pays_all_reduces(g8):
    cm = CostModel(g8, "h100")
    s = StepShape.prefill([2048])
    b1 = cm.block_time(cm.decoders[0], s, tp=1)
    b4 = cm.block_time(cm.decoders[0], s, tp=4)
    for b in (b1, b4):
        assert b.total_ms == pytest.approx(b.compute_ms + b.memory_ms + b.comm_ms + b.overhead_ms)
    assert b1.comm_ms == 0.0 and b4.comm_ms > 0.0
    # two all-reduces of T x hidden per layer (o_proj, down_proj)
    link = cm.links.intra
    assert b4.comm_ms == pytest.approx(2 * C.all_reduce_ms(2048 * 4096 * 2, 4, link))


def test_ulysses_all_to_alls_only_in_sp_tp_mode(g8):
    cm = CostModel(g8, "h100")
    s = StepShape.prefill([4096])
    sp = cm.block_time(cm.decoders[0], s, tp=2, sp=4, mode="sp_tp")
    shifted = cm.block_time(cm.decoders[0], s, tp=2, sp=4, mode="tp")
    assert shifted == cm.block_time(cm.decoders[0], s, tp=8, sp=1)
    link = cm.links.intra
    tokens = 4096 / 4
    qkv = tokens * (32 + 2 * 8) * 128 / 2 * 2  # this GPU's tokens of its h/t heads, bf16
    out = tokens * 32 * 128 / 2 * 2
    ar = 2 * C.all_reduce_ms(tokens * 4096 * 2, 2, link)
    assert sp.comm_ms == pytest.approx(ar + C.all_to_all_ms(qkv, 4, link) + C.all_to_all_ms(out, 4, link))


def test_layers_time_is_layer_count_times_one_layer(g70):
    cm = CostModel(g70, "h200")
    s = StepShape.decode([2048] * 8)
    one = cm.block_time(cm.decoders[0], s, tp=4)
    assert cm.layers_time(0, 79, s, tp=4).total_ms == pytest.approx(80 * one.total_ms)
    assert cm.layers_time(10, 19, s, tp=4).total_ms == pytest.approx(10 * one.total_ms)
    with pytest.raises(UserError):
        cm.layers_time(0, 80, s, tp=4)


def test_step_time_pipeline(g70):
    cm = CostModel(g70, "h200")
    s = StepShape.prefill([1024] * 4)
    one = cm.step_time(s, pp=1, tp=4)
    two = cm.step_time(s, pp=2, tp=4)
    assert len(two.stages) == 2 and len(two.p2p_ms) == 1
    assert two.total_ms == pytest.approx(sum(b.total_ms for b in two.stages) + sum(two.p2p_ms))
    assert two.bottleneck_ms < two.total_ms
    assert two.total_ms >= one.total_ms  # same work plus a send
    assert two.bottleneck_ms < 0.6 * one.total_ms
    custom = cm.step_time(s, pp=2, tp=4, stages=[(0, 29), (30, 79)])
    assert custom.stages[1].total_ms > custom.stages[0].total_ms


def test_costs_grow_with_work(g8):
    cm = CostModel(g8, "h100", profile=load_profile("h100"))
    d = [cm.block_time(cm.decoders[0], StepShape.decode([c] * 64)).total_ms for c in (256, 1024, 4096, 16384)]
    p = [cm.block_time(cm.decoders[0], StepShape.prefill([n])).total_ms for n in (128, 1024, 8192, 32768)]
    assert d == sorted(d) and d[-1] > 2 * d[0]
    assert p == sorted(p) and p[-1] > 50 * p[0]


def test_memo_and_mode_errors(g8):
    cm = CostModel(g8, "h100")
    s = StepShape.decode([100] * 4)
    assert cm.block_time(cm.decoders[0], s, tp=2) is cm.block_time(cm.decoders[5], s, tp=2)
    with pytest.raises(UserError, match="unknown step mode"):
        cm.step_time(s, mode="fast")


def test_vision_time_dp_and_tp(gvl, g8):
    cm = CostModel(gvl, "h100", profile=load_profile("h100"))
    imgs = [4096, 4096, 1024, 1024]
    one = cm.vision_time(imgs)
    dp2 = cm.vision_time(imgs, dp=2)
    tp2 = cm.vision_time(imgs, tp=2)
    assert dp2.total_ms < 0.7 * one.total_ms
    assert tp2.total_ms < one.total_ms and tp2.comm_ms > 0
    assert cm.vision_time([]).total_ms == 0.0
    with pytest.raises(UserError, match="no vision tower"):
        CostModel(g8, "h100").vision_time([1024])


# ----------------------------------------------------------------------------- profiles


def test_profile_is_used_and_named(g8, h100):
    cm = CostModel(g8, "h100", profile=h100)
    assert not cm.roofline and cm.profile_id.startswith("h100-")
    rl = CostModel(g8, "h100")
    assert rl.roofline and rl.profile_id == "roofline:h100"
    s = StepShape.prefill([2048])
    assert cm.block_time(cm.decoders[0], s).total_ms != rl.block_time(rl.decoders[0], s).total_ms


def test_profile_tables_refit_from_raw_points(h100):
    again = fit_profile(h100.raw, gpu="h100", profile_id=h100.id, device_name=h100.device_name, meta=h100.meta)
    for m, n, k in [(1, 768, 768), (300, 5000, 2000), (4096, 14336, 4096), (20000, 24576, 768)]:
        assert again.gemm(m, n, k) == pytest.approx(h100.gemm(m, n, k))
    assert again.attn_decode(64, 4096) == pytest.approx(h100.attn_decode(64, 4096))


def test_bias_fit_weights_out_long_gemm_noise():
    from costmodels.fit import fit_gemm_bias

    # one (M, N) at three K: the long GEMM's timing difference is noise far above the epilogue
    pts = [{"m": 16384, "n": 4608, "k": 1152, "ms": 0.2620, "ms_nobias": 0.2531},
           {"m": 16384, "n": 4608, "k": 4608, "ms": 0.9584, "ms_nobias": 0.9412},
           {"m": 16384, "n": 4608, "k": 18432, "ms": 3.9494, "ms_nobias": 3.6002},
           {"m": 1024, "n": 4608, "k": 1152, "ms": 0.0200, "ms_nobias": 0.0210},
           {"m": 1024, "n": 4608, "k": 4608, "ms": 0.0600, "ms_nobias": 0.0610}]
    g = fit_gemm_bias(pts)
    assert 8.9 < g(16384, 4608) < 12.0  # near the short GEMMs' 8.9 and 17 us, not the mean 125 us
    assert g(1024, 4608) == 0.0  # faster with the bias: clamped after averaging, not before


def _full_attn_raw(h100, heads: list[int]) -> dict:
    """The H100 raw points with full attention at ``heads`` (times scaled as if per head,
    plus one fixed tile-time for the smaller counts, so efficiency depends on heads)."""
    raw = dict(h100.raw)
    pts = []
    for h in heads:
        for p in h100.raw["attn_full"]:
            if p["heads"] == 20:
                pts.append({**p, "heads": h, "kv_heads": h, "ms": p["ms"] * h / 20 + (0.01 if h < 20 else 0.0)})
    raw["attn_full"] = pts
    return raw


def test_full_attention_heads_axis(h100, gvl):
    prof = fit_profile(_full_attn_raw(h100, [6, 12, 20]), gpu="h100", profile_id="t", device_name="x", meta={})
    assert len(prof.attn_full.axes) == 3 and prof.attn_full.axes[2] == [6.0, 12.0, 20.0]
    assert prof.attn_full(1728, 1, 6) < prof.attn_full(1728, 1, 12) < prof.attn_full(1728, 1, 20)
    assert prof.attn_full(1728, 1, 20) == pytest.approx(h100.attn_full(1728, 1))
    blk = gvl.blocks_of("vision_block")[0]
    rec = next(op_rec(gvl.op(n), "vision") for n in blk.ops if gvl.op(n).kind == "attention")
    cm = CostModel(gvl, "h100", profile=prof)
    s = StepShape.vision([1728])
    eff = rec.flops(s) / (cm.rates.attn_flops * op_time(rec, s, 1, 1, cm.rates, prof)[0] * 1e-3)
    assert eff == pytest.approx(prof.attn_full(1728, 1, 16))  # the model's 16 heads
    eff2 = rec.flops(s) / 2 / (cm.rates.attn_flops * op_time(rec, s, 2, 1, cm.rates, prof)[0] * 1e-3)
    assert eff2 == pytest.approx(prof.attn_full(1728, 1, 8))  # tp=2: 8 heads per GPU
    one = fit_profile(_full_attn_raw(h100, [20]), gpu="h100", profile_id="t", device_name="x", meta={})
    assert len(one.attn_full.axes) == 2  # one head count: the old e(L, B) table


def test_profile_gemm_table_reproduces_measured_points(h100):
    peak = 989.4e12
    for p in h100.raw["gemm"][::97]:
        net = max(p["ms"] * 1e-3 - h100.overhead_us * 1e-6, p["ms"] * 1e-3 * 0.05)
        assert h100.gemm(p["m"], p["n"], p["k"]) == pytest.approx(2 * p["m"] * p["n"] * p["k"] / (net * peak))


def test_profile_has_device_metadata(h100):
    assert "H100" in h100.device_name
    for key in ("driver", "torch", "date"):
        assert h100.meta.get(key)
    for table in ("rmsnorm", "rope", "silu_mul", "add", "layernorm", "quick_gelu", "rope_vision"):
        assert table in h100.memops
    assert 600 < h100.raw["matmul_tflops"] < 990  # measured bf16 GEMM below the datasheet peak


def test_decode_bytes_formula():
    b = decode_attention_bytes(2, 100, 32, 8, 128)
    assert b == (2 * 8 * 128 * 2 * 100 + 2 * 8 * 128 * 2) * 2 + ((32 + 16) * 128 * 2 + 32 * 128 * 2) * 2


def test_log_grid_interpolation():
    g = LogGrid([[1, 4, 16]], [1.0, 2.0, 3.0])
    assert g(4) == 2.0 and g(2) == pytest.approx(1.5) and g(0.1) == 1.0 and g(100) == 3.0
    power = LogGrid([[1, 8]], [10.0, 80.0], log_values=True)
    assert power(2) == pytest.approx(20.0) and power(4) == pytest.approx(40.0)
    g2 = LogGrid([[1, 2], [1, 2]], [[0.0, 1.0], [2.0, 3.0]])
    assert g2(math.sqrt(2), math.sqrt(2)) == pytest.approx(1.5)
    assert LogGrid.from_json(json.loads(json.dumps(power.to_json())))(4) == pytest.approx(40.0)


# ----------------------------------------------------------------------------- crossover, graph, imports


def test_shift_crossover_separates_the_two_modes(g70):
    cm = CostModel(g70, "h100", profile=load_profile("h100"))
    cross, curve = cm.shift_crossover(tp=2, sp=4)
    assert cross is not None and 16 < cross < 65536
    small = [c for c in curve if c[0] <= 32]
    large = [c for c in curve if c[0] >= 8192]
    assert small and all(a > b for _, a, b in small)  # TP of degree 8 wins small steps
    assert large and all(a < b for _, a, b in large)  # SP x TP wins large ones
    assert cm.shift_crossover(tp=8, sp=1) == (None, [])


def test_synthetic_graph_matches_the_traced_graph():
    pytest.importorskip("graph.cache")
    from costmodels.build import graph_for_config

    cfg = load_config("llama-3.1-8b")
    traced, synth = graph_for_config(cfg), build_graph(cfg)
    assert traced.total_params == synth.total_params
    a, b = CostModel(traced, "h100"), CostModel(synth, "h100")
    for s in (StepShape.prefill([1000, 3000]), StepShape.decode([2048] * 32)):
        ta = a.step_time(s, tp=2).total_ms
        tb = b.step_time(s, tp=2).total_ms
        assert ta == pytest.approx(tb, rel=0.05)  # the traced graph lists the gating multiply apart


def test_cost_model_does_not_import_torch():
    code = ("import sys, costmodels.model, costmodels.build, costmodels.estimate, costmodels.profile; "
            "from costmodels.profile import load_profile; load_profile('h100'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_breakdown_arithmetic():
    a = Breakdown.of(1, 2, 3, 4)
    assert a.total_ms == 10 and (a + a).total_ms == 20 and a.scale(0.5).comm_ms == 1.5


def test_collective_benchmark_and_fit_on_gloo():
    """The calibration's own measurement code on 2 CPU processes (gloo: eager only, no graphs),
    fitted into a profile's collectives, read back by the cost model's links."""
    from costmodels.calib_collectives import ALL_OPS, bench_collectives
    from costmodels.fit import profile_collectives
    from costmodels.hardware import get_gpu

    sizes = [4096, 1 << 20, 1 << 22]
    errors: list[dict] = []
    pts = bench_collectives(2, sizes, backend="gloo", reps=2, ops=ALL_OPS, errors=errors)
    assert errors == []
    assert {p["op"] for p in pts} == set(ALL_OPS) and len(pts) == 15
    assert all(p["ms"] > 0 and p["n"] == 2 and p["mode"] == "eager" for p in pts)
    assert sorted(p["bytes"] for p in pts if p["op"] == "all_reduce") == sizes
    coll = profile_collectives(pts, {"device_name": "cpu"})
    assert coll["bus_gbps"] > 0 and coll["alpha_us"] > 0 and coll["n"] == 2
    assert coll["meta"]["group_sizes"] == [2] and set(coll["tables"]) == {"eager"}
    links = C.default_links(get_gpu("cpu"), 8, coll)
    assert links.intra.gbps == coll["bus_gbps"] and links.intra.alpha_us == coll["alpha_us"]
    for p in pts:  # the measured points come back exactly, graph or not (no graph table on gloo)
        for graph in (False, True):
            assert links.ms(p["op"], p["bytes"], 2, graph=graph) == pytest.approx(p["ms"], rel=1e-3, abs=1e-6)
    assert links.ms("all_reduce", 1 << 20, 4) == C.all_reduce_ms(1 << 20, 4, links.intra)  # 4 not measured


def test_fit_collectives_recovers_alpha_beta():
    from costmodels.fit import fit_collectives

    n, bus, c_us = 8, 300.0, 20.0
    pts = [{"op": "all_reduce", "bytes": s, "n": n, "ms": (c_us * 1e-6 + 2 * (n - 1) / n * s / (bus * 1e9)) * 1e3}
           for s in (4096, 65536, 1 << 24, 1 << 28)]
    fit = fit_collectives(pts)
    assert fit["bus_gbps"] == pytest.approx(bus, rel=0.01)
    assert fit["alpha0_us"] + 2 * (n - 1) * fit["alpha_us"] == pytest.approx(c_us + 2 * (n - 1) / n * 4096 / 300e3, rel=0.01)


# ----------------------------------------------------------------------------- measured accuracy

RESULTS = __import__("pathlib").Path(__file__).resolve().parent.parent / "bench" / "results"


def test_committed_accuracy_results_have_the_contract():
    d = json.loads((RESULTS / "cost_accuracy.json").read_text())
    for kind in ("prefill", "decode", "vision"):
        r = d[kind]
        assert set(r) >= {"median_abs_pct", "p90_abs_pct", "points"} and len(r["points"]) >= 9
        errs = [abs(p["err_pct"]) for p in r["points"]]
        assert r["median_abs_pct"] == pytest.approx(statistics.median(errs), abs=0.02)
        assert r["p90_abs_pct"] >= r["median_abs_pct"]
    assert "H100" in d["meta"]["device"] and d["meta"]["command"].startswith("python bench/cost_accuracy.py report")
    md = (RESULTS / "cost_accuracy.md").read_text()
    assert "| prefill |" in md and "Command:" in md and "H100" in md


def test_model_still_predicts_the_measured_h100_steps():
    """Recompute predictions for the committed H100 timings with today's cost model: a
    change to the model or the tracer that breaks accuracy fails here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cost_accuracy", RESULTS.parent / "cost_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    raw = json.loads((RESULTS / "cost_accuracy.raw.json").read_text())
    pts, pid, _ = mod.predict(raw["points"], RESULTS.parent.parent / "costmodels" / "profiles" / "h100.json")
    assert pid.startswith("h100-") and len(pts) == len(raw["points"])
    for kind, (med, p90) in {"prefill": (6, 12), "decode": (6, 12), "vision": (8, 14)}.items():
        errs = [abs(p["err_pct"]) for p in pts if p["kind"] == kind]
        assert mod._pct(errs, 0.5) <= med and mod._pct(errs, 0.9) <= p90, (kind, mod._pct(errs, 0.5), mod._pct(errs, 0.9))


def test_windowed_vision_blocks_attend_within_windows():
    from costmodels.build import graph_for_config

    g = graph_for_config(load_config("qwen2.5-vl-7b"))
    cm = CostModel(g, "h100")
    blocks = g.blocks_of("vision_block")
    windowed = [b for b in blocks if b.name in cm._window]
    assert len(windowed) == 28 and cm._window[windowed[0].name] == 64  # 4 of 32 blocks attend fully
    big = [16384]
    as_full = cm.blocks_time([b for b in g.blocks if b.tower == "vision"], StepShape.vision(big)).total_ms
    tower = cm.vision_time(big).total_ms
    assert tower < 0.8 * as_full
    # a windowed block's attention work: 16384 patches x 64 per window, not 16384^2
    full_b = next(b for b in blocks if b.name not in cm._window)
    assert cm.block_time(windowed[0], StepShape(16384, 16384 * 64, 16384, 256)).total_ms < \
        cm.block_time(full_b, StepShape.vision(big)).total_ms


@pytest.mark.parametrize("gpu,profiled", [("h100", True), ("h200", False)])
def test_mixed_step_costs_each_attention_regime_on_its_own(g70, gpu, profiled):
    """A continuous-batching step (a prefill chunk + many decodes) costs at least its larger part
    and at most the sum of its parts: its attention is costed per regime, not at the averaged
    tokens-per-sequence of the mix (which once made a 2238 + 256-decode step 20x too slow)."""
    from costmodels.hardware import get_gpu

    cm = CostModel(g70, get_gpu(gpu), profile=load_profile(gpu) if profiled else None)
    prefill, decode = StepShape.prefill([2238]), StepShape.decode([1500] * 256)
    mixed = prefill + decode
    assert mixed.mixed and mixed.split() == (prefill, decode)
    t_p, t_d = (cm.step_time(x, tp=8).total_ms for x in (prefill, decode))
    t_m = cm.step_time(mixed, tp=8).total_ms
    assert max(t_p, t_d) <= t_m <= t_p + t_d


def test_calibration_dry_run_times_every_kernel_class_and_fits():
    """The calibration micro-benchmarks run end to end on CPU (tiny grid) and their raw points fit
    into a profile the cost model reads: every kernel class timed, every time positive."""
    from costmodels.calibrate import Grids, run_calibration

    raw = run_calibration(Grids.cpu_dry_run(), cpu_dry_run=True, log=lambda _m: None)
    for key in ("gemm", "gemm_bias", "attn_causal", "attn_full", "attn_decode"):
        assert raw[key] and all(p["ms"] > 0 for p in raw[key]), key
    assert all(p["heads"] == p["kv_heads"] for p in raw["attn_full"])  # full attention: no GQA
    prof = fit_profile(raw, gpu="cpu", profile_id="cpu-dry-run", device_name="cpu", meta={})
    assert prof.gemm(256, 256, 256) > 0
