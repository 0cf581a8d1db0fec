"""The engine's step terms in the cost model (``costmodels.steps``): the host side of a step
applies to eagerly launched steps only (SP x TP, and plain TP past the largest graph bucket), as
max(host, GPU); the Ulysses exchange's extra applies to SP x TP layers only; both only for this
repo's engine with the backends the profile measured; and the profile's values are what the
fits give on the committed measurement."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from costmodels.build import cost_model_for
from costmodels.profile import load_profile
from costmodels.steps import Launch, fit_steps, launch_for, step_shape
from graph.hf_config import load_config
from graph.opgraph import StepShape
from plans.mesh import GRAPH_TOKEN_BUCKETS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    return load_config(preset="llama-3.1-8b")


def model(cfg, backend="compile", engine="shiftplan"):
    return cost_model_for(cfg, "h200", weights_dtype="bf16", kv_dtype="bf16", gpus_per_node=2,
                          fused_elementwise=backend != "eager", engine=engine, backend=backend)[0]


def test_graphed_steps_are_plain_tp_up_to_the_largest_bucket():
    """Without the LL all-to-all (``Launch.all_to_all`` None) only plain-TP steps are graphed."""
    lu = Launch(host_ms_per_layer=1.0)
    top = GRAPH_TOKEN_BUCKETS[-1]
    assert lu.graphed(top, 2, "tp") and not lu.graphed(top + 1, 2, "tp")
    assert not lu.graphed(16, 2, "sp_tp") and lu.graphed(16, 1, "sp_tp")  # sp = 1 runs plain TP
    assert lu.wall_ms(5.0, 32, 16, 2, "tp") == 5.0  # graphed: no host side
    assert lu.wall_ms(5.0, 32, 16, 2, "sp_tp") == 32.0  # eager, host-bound: max, not sum
    assert lu.wall_ms(50.0, 32, top + 1, 2, "tp") == 50.0  # eager, GPU-bound


def eager_sp(cm):
    """``cm`` with SP x TP steps launched eagerly, as without the LL all-to-all's measurement."""
    import copy
    from dataclasses import replace

    c = copy.copy(cm)
    c.launch, c._cache = replace(cm.launch, all_to_all=None), {}
    return c


def test_host_side_only_on_eager_steps(cfg):
    cm = eager_sp(model(cfg))
    h, L = cm.launch.host_ms_per_layer, len(cm.decoders)
    small, big, dec = StepShape.prefill([256]), StepShape.prefill([4096]), StepShape.decode([512] * 32)
    for sh in (small, dec):  # graphed TP steps: GPU time alone
        assert cm.step_wall_ms(sh, tp=1, sp=2, mode="tp") == pytest.approx(cm.step_time(sh, tp=1, sp=2, mode="tp").total_ms)
    gpu = cm.step_time(small, tp=1, sp=2, mode="sp_tp").total_ms
    assert gpu < L * h and cm.step_wall_ms(small, tp=1, sp=2, mode="sp_tp") == pytest.approx(L * h)
    for mode in ("tp", "sp_tp"):  # large eager steps are GPU-bound: max(host, GPU) = GPU
        g = cm.step_time(big, tp=1, sp=2, mode=mode).total_ms
        assert g > L * h and cm.step_wall_ms(big, tp=1, sp=2, mode=mode) == pytest.approx(g)
    # two stages: each pays its own layers' host time
    two = cm.step_wall_ms(small, pp=2, tp=1, sp=2, mode="sp_tp")
    assert two >= L * h


def test_without_launch_is_the_same_model_with_every_step_graphed(cfg):
    """``CostModel.without_launch`` (the research report's engine that graphs every step): no host
    side and no Ulysses extra, the original model untouched."""
    cm = eager_sp(model(cfg))
    sh = StepShape.prefill([256])
    eager = cm.step_wall_ms(sh, tp=1, sp=2, mode="sp_tp")
    ideal = cm.without_launch()
    assert ideal.launch is None and cm.launch is not None
    g = ideal.step_time(sh, tp=1, sp=2, mode="sp_tp").total_ms
    assert ideal.step_wall_ms(sh, tp=1, sp=2, mode="sp_tp") == pytest.approx(g) and g < eager
    assert g < cm.step_time(sh, tp=1, sp=2, mode="sp_tp").total_ms  # the exchange's extra is gone too
    assert cm.step_wall_ms(sh, tp=1, sp=2, mode="sp_tp") == pytest.approx(eager)


def test_terms_only_for_this_engine_and_measured_backends(cfg):
    prof = load_profile("h200")
    assert launch_for(prof, "shiftplan", "compile") is not None and launch_for(prof, "shiftplan", "eager") is not None
    for engine, backend in (("shiftplan", "tensorrt"), ("vllm", "compile"), ("arctic", "eager"), (None, "compile")):
        assert launch_for(prof, engine, backend) is None
    assert launch_for(None, "shiftplan", "compile") is None  # roofline: nothing measured
    sh = StepShape.prefill([64])
    trt = model(cfg, backend="tensorrt")
    assert trt.step_wall_ms(sh, tp=1, sp=2, mode="sp_tp") == trt.step_time(sh, tp=1, sp=2, mode="sp_tp").total_ms


def test_ulysses_extra_only_under_sp_tp(cfg):
    cm, bare = model(cfg), model(cfg, engine=None)
    sh = StepShape.prefill([8192])
    assert cm.step_time(sh, tp=1, sp=2, mode="tp").total_ms == pytest.approx(bare.step_time(sh, tp=1, sp=2, mode="tp").total_ms)
    extra = cm.step_time(sh, tp=1, sp=2, mode="sp_tp").total_ms - bare.step_time(sh, tp=1, sp=2, mode="sp_tp").total_ms
    nbytes = sum(cm.ulysses_bytes(b, sh, tp=1, sp=2) for b in cm.decoders)
    assert nbytes == pytest.approx(32 * 4096 * (6144 + 4096) * 2)  # T/sp x (QKV + output) x bf16, 32 layers
    assert extra == pytest.approx(nbytes * cm.launch.ulysses_ns_per_byte * 1e-6)


def test_profile_terms_are_the_fits_of_the_committed_measurement(cfg):
    report = json.loads((ROOT / "bench/results/shift_crossover.json").read_text())
    assert report["backend"] == "compile"
    fit = fit_steps(report, model(cfg, engine=None))
    steps = load_profile("h200").steps
    assert steps["host_ms_per_layer"]["compile"]["value"] == pytest.approx(fit["host_ms_per_layer"], abs=1e-4)
    assert steps["ulysses_ns_per_byte"]["value"] == pytest.approx(fit["ulysses_ns_per_byte"], rel=1e-3)
    assert fit["gpu_bound_steps"] >= 4


def test_mixed_step_shape_of_the_bench():
    sh = step_shape("mixed", 64, 8, 40)
    assert sh.tokens == 64 and sh.seqs == 9


# ------------------------------------------------------------------ decode GEMV and PP handoff


def test_gemv_rows_are_the_engines():
    """The cost model's GEMV row limit is the one ``executors.gemv`` routes products by."""
    from costmodels.steps import GEMV_MAX_ROWS
    from executors import gemv

    assert GEMV_MAX_ROWS == gemv.MAX_M


def test_profile_decode_terms_are_the_fits_of_the_committed_measurements(cfg):
    from costmodels.steps import fit_gemv, fit_pp_handoff_ms

    steps = load_profile("h200").steps
    speed = json.loads((ROOT / "bench/results/engine_speed.json").read_text())
    tp2 = json.loads((ROOT / "bench/results/mesh_speed.fused_no_pdl.json").read_text())
    gbps, call_us = fit_gemv(speed, tp2)
    assert steps["gemv_GBps"]["value"] == pytest.approx(gbps, rel=1e-4)
    assert steps["gemv_call_us"]["value"] == pytest.approx(call_us, rel=1e-3)
    # the fit reproduces both measurements: 7 x 32 modelled products of the projections whole, of half
    # their bytes as TP2 shards (the engine's 128 launches each)
    from costmodels.steps import PROJECTIONS_PER_LAYER, gemv_kernel_us

    b, layers = 2 * speed["model_figures"]["linear_params"], speed["model_figures"]["layers"]
    one = gemv_kernel_us(speed["variants"]["graphs+compile+lookahead"]["batch_1"]["graph_kernels"])[0]
    two = gemv_kernel_us(tp2["meshes"]["tp2"]["graph_profile"]["graph_kernels"])[0]
    assert two > one / 2  # half the bytes take more than half the time: the fixed time a product
    for nbytes, us in ((b, one), (b / 2, two)):
        assert PROJECTIONS_PER_LAYER * layers * call_us + nbytes / (gbps * 1e9) * 1e6 == pytest.approx(us, rel=1e-6)
    pp2 = json.loads((ROOT / "bench/results/mesh_speed.pp2.json").read_text())
    assert steps["pp_handoff_ms"]["value"] == pytest.approx(fit_pp_handoff_ms(pp2, model(cfg)), abs=1e-4)


def test_gemv_prices_small_decoder_products_only(cfg):
    """Decoder linears of at most ``GEMV_MAX_ROWS`` rows, with or without a bias, stream their weights
    at the GEMV's rate; one row more, the lm_head, FP8 weights and other engines keep the GEMM table."""
    from costmodels.opcost import op_time
    from costmodels.steps import GEMV_MAX_ROWS

    cm, bare = model(cfg), model(cfg, engine=None)
    fp8 = cost_model_for(cfg, "h200", weights_dtype="fp8", kv_dtype="bf16", gpus_per_node=2,
                         fused_elementwise=True, engine="shiftplan", backend="compile")[0]
    recs = {r.kind if r.kind == "lm_head" else (r.k, r.n): r for b in (cm.decoders[0], *cm._text_blocks("lm_head"))
            for r in cm._recs[b.name] if r.is_matmul}
    q = recs[(4096.0, 4096.0)]
    bw, call_s = cm.launch.gemv_GBps * 1e9, cm.launch.gemv_call_us * 1e-6
    assert call_s > 0
    for rows in sorted({1, GEMV_MAX_ROWS}):
        sh = StepShape.decode([576] * rows)
        c, m, _ = op_time(q, sh, 1, 1, cm.rates, cm.profile)
        assert c == 0 and m == pytest.approx((call_s + (4096 * 4096 + rows * 2 * 4096) * 2 / bw) * 1e3)
        assert op_time(q, sh, 1, 1, bare.rates, bare.profile)[:2] != (c, m)
        assert op_time(q, sh, 1, 1, fp8.rates, fp8.profile)[:2] != (c, m / 2)  # FP8: its GEMM table
        lm = recs["lm_head"]
        assert op_time(lm, sh, 1, 1, cm.rates, cm.profile) == op_time(lm, sh, 1, 1, bare.rates, bare.profile)
    more = StepShape.decode([576] * (GEMV_MAX_ROWS + 1))
    assert op_time(q, more, 1, 1, cm.rates, cm.profile) == op_time(q, more, 1, 1, bare.rates, bare.profile)
    assert fp8.rates.gemv_bw == 0 and bare.rates.gemv_bw == 0
    biased = replace(q, bias=True)  # Qwen's QKV: the kernel adds the bias in its epilogue, same price
    one = StepShape.decode([576])
    assert op_time(biased, one, 1, 1, cm.rates, cm.profile) == op_time(q, one, 1, 1, cm.rates, cm.profile)
    assert op_time(biased, one, 1, 1, bare.rates, bare.profile) != op_time(q, one, 1, 1, bare.rates, bare.profile)


def test_pp_steps_pay_the_handoff_per_boundary(cfg):
    cm, bare = model(cfg), model(cfg, engine=None)
    h = cm.launch.pp_handoff_ms
    assert h > 0 and cm.handoff_ms() == h and bare.handoff_ms() == 0
    sh = StepShape.decode([576])
    for pp in (2, 4):
        sc = cm.step_time(sh, pp=pp)
        gpu = sum(b.total_ms for b in sc.stages) + sum(sc.p2p_ms)
        assert cm.step_wall_ms(sh, pp=pp) == pytest.approx(gpu + (pp - 1) * h)
    assert cm.step_wall_ms(sh) == pytest.approx(cm.step_time(sh).total_ms)  # one stage: no handoff
    assert cm.hop_ms(8192, inter_node=False) == pytest.approx(cm.p2p_ms(8192, inter_node=False) + h)


@pytest.mark.parametrize("report", ["engine_speed.json", "engine_speed.current.json"])
def test_decode_steps_within_10pct_of_the_engines_measurement(cfg, report):
    """The predicted decode step at batch 1, 32 and 128 against ``bench/results/engine_speed.json``
    (one H200, compiled layers, the look-ahead the engine runs by default; the GEMV fit's source) and
    ``engine_speed.current.json`` (the current engine): each within 10%."""
    speed = json.loads((ROOT / "bench/results" / report).read_text())
    run = speed["variants"]["graphs+compile+lookahead"]
    context = speed["prompt_tokens"] + speed["new_tokens"] // 2
    cm = model(cfg)
    for batch in (1, 32, 128):
        measured = run[f"batch_{batch}"]["decode_step_ms"]
        predicted = cm.step_wall_ms(StepShape.decode([context] * batch))
        assert predicted == pytest.approx(measured, rel=0.10), (batch, predicted, measured)


def test_two_gpu_speedups_within_10pct_of_the_measured(cfg):
    """``bench/scaling_2gpu.py`` on the committed measurements, each mesh from the first report that has
    it (sp2 from the current engine's ``mesh_speed.a2a.json``, tp2 and shift-sp2 from ``mesh_speed.ll_shift.json``,
    pp2 from ``mesh_speed.pp2.json``): every predicted speedup over one GPU within 10% of the measured one."""
    from bench import scaling_2gpu as s

    files = [f.name for f in s.REPORTS]
    reports = [json.loads(f.read_text()) for f in s.REPORTS]
    assert all(r["backend"] == "compile" for r in reports)
    pred = s.predicted(model(cfg))
    rows: list[dict] = []
    for rep, f in zip(reports, files):
        rows += [r for r in s.compare(pred, s.measured(rep), f) if r["mesh"] not in {x["mesh"] for x in rows}]
    by = {(r["mesh"], r["step"]): r for r in rows}
    assert {m for m, _ in by} == {"tp2", "shift-sp2", "sp2", "pp2"}
    assert by["sp2", "decode"]["measured_from"] == files[0]
    assert by["tp2", "decode"]["measured_from"] == by["shift-sp2", "decode"]["measured_from"] == files[1]
    for r in by.values():
        assert abs(r["error"]) <= 0.10, r
    assert pred["shift-sp2"]["decode_ms"] == pred["tp2"]["decode_ms"]  # a decode runs the TP layout
    single = s.measured(reports[0])["single"]
    for step in ("decode_ms", "prefill_ms"):
        assert pred["single"][step] == pytest.approx(single[step], rel=0.10)


# ------------------------------------------------------------------ the LL all-to-all: SP x TP steps graphed


def test_profile_all_to_all_is_the_fit_of_the_committed_measurement():
    """With the engine's program count (``executors.all_to_all.PROGRAMS``), a column the report measured."""
    from costmodels.steps import fit_symm_all_to_all
    from executors.all_to_all import PROGRAMS

    report = json.loads((ROOT / "bench/results/all_to_all_latency.json").read_text())
    assert load_profile("h200").steps["symm_all_to_all_us"]["value"] == fit_symm_all_to_all(report, PROGRAMS)
    with pytest.raises(ValueError, match="no in-graph times with 7 programs"):
        fit_symm_all_to_all(report, 7)


def test_sp_steps_up_to_the_largest_bucket_are_graphed_with_the_ll_all_to_all(cfg):
    """On one host, an SP x TP step of at most 2,048 tokens is graphed (no host side) and its
    all-to-alls cost the LL kernel's measured times; larger steps, groups across hosts and a profile
    without the measurement keep the eager launch and NCCL's tables."""
    cm = model(cfg)
    a2a = cm.launch.all_to_all
    top = GRAPH_TOKEN_BUCKETS[-1]
    assert cm.launch.graphed(top, 2, "sp_tp") and not cm.launch.graphed(top + 1, 2, "sp_tp")
    assert not cm.launch.graphed(16, 2, "sp_tp", one_host=False)
    for sh in (StepShape.decode([512] * 2), StepShape.prefill([256]), StepShape.prefill([top])):
        gpu = cm.step_time(sh, tp=1, sp=2, mode="sp_tp").total_ms
        assert cm.step_wall_ms(sh, tp=1, sp=2, mode="sp_tp") == pytest.approx(gpu)
        assert cm.all_to_all_ms(1e6, 2, sh) == pytest.approx(a2a.ms(1e6, 2))
        assert cm.all_to_all_ms(1e6, 2, sh) < cm.links.ms("all_to_all", 1e6, 2)  # NCCL from Python: slower
    big = StepShape.prefill([top * 2])
    assert cm.all_to_all_ms(1e6, 2, big) == cm.links.ms("all_to_all", 1e6, 2)
    eager = eager_sp(cm)
    sh = StepShape.decode([512] * 2)
    assert eager.step_wall_ms(sh, tp=1, sp=2, mode="sp_tp") > 5 * cm.step_wall_ms(sh, tp=1, sp=2, mode="sp_tp")
    across = cost_model_for(cfg, "h200", weights_dtype="bf16", kv_dtype="bf16", gpus_per_node=1,
                            fused_elementwise=True, engine="shiftplan", backend="compile")[0]
    assert not across.sp_one_host(2)
    assert across.all_to_all_ms(1e6, 2, sh) == across.links.ms("all_to_all", 1e6, 2)
    assert across.step_wall_ms(sh, tp=1, sp=2, mode="sp_tp") >= len(cm.decoders) * cm.launch.host_ms_per_layer


def test_ll_all_to_all_table_reads_measured_sizes_and_scales_past_the_largest():
    from costmodels.interp import LogGrid
    from costmodels.steps import SymmAllToAll

    t = SymmAllToAll(2, LogGrid([[1e3, 1e6]], [2.0, 20.0], log_values=True))
    assert t.ms(1e3, 2) == pytest.approx(2e-3) and t.ms(1e6, 2) == pytest.approx(20e-3)
    assert t.ms(10, 2) == pytest.approx(2e-3)  # clamped below
    assert t.ms(4e6, 2) == pytest.approx(80e-3)  # linear in the bytes above
    assert t.ms(1e6, 4) is None and t.ms(0, 2) is None  # another group size: not measured


# ------------------------------------------------------------------ symmetric-memory all-reduce


def test_all_reduce_limits_are_the_engines():
    """The cost model's one-shot size limit and fused row limit are the ones the engine routes by."""
    from costmodels.steps import FUSED_MAX_ROWS, ONE_SHOT_MAX_BYTES
    from executors import parallel, reduce_norm

    assert ONE_SHOT_MAX_BYTES == parallel.ONE_SHOT_MAX_BYTES and FUSED_MAX_ROWS == reduce_norm.MAX_ROWS


def test_profile_all_reduce_is_the_fit_of_the_committed_measurement():
    from costmodels.steps import fit_symm_all_reduce

    report = json.loads((ROOT / "bench/results/allreduce_latency.json").read_text())
    assert load_profile("h200").steps["symm_all_reduce_us"]["value"] == fit_symm_all_reduce(report)


def test_fused_kernels_absorb_each_layers_adds_and_norms(cfg):
    """Llama's layer: o_proj's sum takes the residual add and the post-attention norm after it,
    down_proj's the add after it and the layer's input norm (the next layer's, in the engine)."""
    from costmodels.steps import fused_add_norm_ops

    cm = model(cfg)
    recs = cm._recs[cm.decoders[0].name]
    sums, absorbed = fused_add_norm_ops(recs)
    rows = sorted(i for i, r in enumerate(recs) if r.shard == "row")
    assert sums == frozenset(rows) and len(absorbed) == 4
    assert sorted(recs[i].kind for i in absorbed) == ["elementwise", "elementwise", "norm", "norm"]
    o, down = rows
    assert all(any(o < j < down and recs[j].kind == k for j in absorbed) for k in ("elementwise", "norm"))
    assert min(absorbed) == 0 and recs[0].kind == "norm"  # the input norm
    assert fused_add_norm_ops(tuple(r for r in recs if r.kind != "norm")) == (frozenset(), frozenset())


def test_decode_all_reduce_is_the_measured_symmetric_memory_kernel(cfg):
    """A TP2 decode layer's two sums: the fused kernel up to 32 rows (its add and norm cost nothing
    more), the one-shot kernel above (add and norm priced as ops), NCCL's graph table past 1 MB, for
    eager prefill steps, for other engines and for groups of another size than measured."""
    from costmodels.steps import FUSED_MAX_ROWS

    cm, bare = model(cfg), model(cfg, engine="vllm")
    # decode attention priced alike in both (the engine's own kernel's table: test_calib_tables)
    cm.rates = replace(cm.rates, engine_decode=False)
    symm = load_profile("h200").steps["symm_all_reduce_us"]["value"]
    layer = cm.decoders[0]
    us = dict(zip(symm["bytes"], symm["fused_add_norm"])), dict(zip(symm["bytes"], symm["one_shot"]))
    for rows in (1, 8, FUSED_MAX_ROWS):
        sh = StepShape.decode([576] * rows)
        assert cm.block_time(layer, sh, tp=2).comm_ms == pytest.approx(2 * us[0][rows * 8192] * 1e-3)
        # the fused kernel replaces the sum, two adds and two norms: the rest of the layer is unchanged
        saved = bare.block_time(layer, sh, tp=2).total_ms - cm.block_time(layer, sh, tp=2).total_ms
        assert saved > 0
    sh = StepShape.decode([576] * 128)  # 1 MB: the one-shot kernel, with the add and norm as ops
    assert cm.block_time(layer, sh, tp=2).comm_ms == pytest.approx(2 * us[1][128 * 8192] * 1e-3)
    assert (cm.block_time(layer, sh, tp=2).memory_ms + cm.block_time(layer, sh, tp=2).compute_ms
            == pytest.approx(bare.block_time(layer, sh, tp=2).memory_ms + bare.block_time(layer, sh, tp=2).compute_ms))
    node8 = cost_model_for(cfg, "h200", weights_dtype="bf16", kv_dtype="bf16", gpus_per_node=8,
                           fused_elementwise=True, engine="shiftplan", backend="compile")[0]
    # a graphed prefill step of few rows sums through the same kernels (the engine's graph holds them),
    # over the rows of its token bucket: 8 tokens run as 16
    assert cm.block_time(layer, StepShape.prefill([8]), tp=2).comm_ms == pytest.approx(
        2 * cm.launch.all_reduce.ms(16 * 8192, 2, 16, True))
    for c, sh, tp in ((cm, StepShape.decode([576] * 256), 2), (cm, StepShape.prefill([4096]), 2),
                      (node8, StepShape.decode([576]), 4), (bare, StepShape.decode([576]), 2)):
        nccl = c.links.ms("all_reduce", sh.tokens * 8192, tp, graph=sh.tokens <= sh.seqs)
        assert c.block_time(layer, sh, tp=tp).comm_ms == pytest.approx(2 * nccl), (sh, tp)


def test_fused_path_only_up_to_32_rows(cfg):
    """33 rows: one-shot sums with the add and norm priced as ops, which costs more than the fused
    kernel at 32 rows less the ops it absorbs."""
    cm = model(cfg)
    layer = cm.decoders[0]
    at32 = cm.block_time(layer, StepShape.decode([576] * 32), tp=2)
    at33 = cm.block_time(layer, StepShape.decode([576] * 33), tp=2)
    sums, absorbed = cm._fusion(layer, StepShape.decode([576] * 33), 2, 1, True)
    assert not sums and not absorbed
    assert cm._fusion(layer, StepShape.decode([576] * 32), 2, 1, True)[0]
    assert at33.overhead_ms > at32.overhead_ms  # four more kernels launched


def test_tp2_decode_without_the_symmetric_memory_kernels_is_slower(cfg):
    """NCCL's graph table in place of the symmetric-memory kernels (the speedup itself is checked
    against the measurement in ``test_two_gpu_speedups_within_10pct_of_the_measured``) makes the TP2
    batch-1 decode step slower by its 65 sums, and leaves one GPU's step alone."""
    import copy
    from dataclasses import replace

    from bench import scaling_2gpu as s

    sh = StepShape.decode([s.CONTEXT])
    cm = model(cfg)
    nccl = copy.copy(cm)
    nccl.launch, nccl._cache = replace(cm.launch, all_reduce=None), {}
    assert nccl.step_wall_ms(sh, tp=2) > cm.step_wall_ms(sh, tp=2) + 0.3  # 65 sums, ~6.5 us each
    assert nccl.step_wall_ms(sh) == cm.step_wall_ms(sh)


def test_graphed_steps_pay_their_token_bucket(cfg):
    """A prefill or mixed step the engine graphs runs its token bucket's rows (1,153 tokens as 1,280)
    through every op but attention, which reads the real shape; decode steps, steps past the largest
    bucket and engines without measured terms are priced as they are."""
    from dataclasses import replace

    from costmodels.opcost import op_time
    from plans.mesh import bucket

    cm, bare = model(cfg), model(cfg, engine=None)
    layer = cm.decoders[0]
    real = StepShape.prefill([1153])
    padded = cm.graph_rows(real)
    assert padded == replace(real, tokens=float(bucket(1153))) and padded.tokens == 1280
    parts = [op_time(r, real if r.kind == "attention" else shape, 1, 1, cm.rates, cm.profile, paged=True)
             for shape in (padded, real) for r in cm._recs[layer.name]]
    half = len(parts) // 2
    want, unpadded = (sum(max(c, m) + o for c, m, o in p) for p in (parts[:half], parts[half:]))
    assert cm.block_time(layer, real).total_ms == pytest.approx(want) and want > 1.05 * unpadded
    for sh in (StepShape.decode([576] * 3), StepShape.prefill([3000])):
        assert cm.graph_rows(sh) == sh
    assert bare.graph_rows(real) == real


def test_serving_terms_are_fitted_from_the_committed_trace():
    """The profile's driver time and mixed-step extra are what ``fit_form_ms`` and
    ``fit_mixed_step_ms`` give on the committed step traces (``bench/results/fidelity_2gpu.*``; the
    mixed extra from the trace of the engine that sent no mixed step ahead,
    ``fidelity_2gpu.single_mixed_sync.*``); the current engine sends its mixed steps ahead and they
    show no such extra (``fidelity_2gpu.single.*``). The coster charges the extra (``wait_ms``) to
    graphed mixed steps only, the same on each stage; the driver time grows with the step's
    sequences and its prefill chunks."""
    from bench import step_fidelity as sf
    from costmodels.steps import fit_form_ms, fit_mixed_step_ms

    rates = list(sf.read_steps(ROOT / "bench/results" / sf.STEPS_FILE)["llama"]["single"].values())
    steps = load_profile("h200").steps
    form = fit_form_ms(rates)
    assert steps["form_ms"]["value"] == pytest.approx({k: form[k] for k in ("base", "prefill", "per_seq")}, abs=1e-4)
    extra = steps["mixed_step_ms"]["value"]  # a step's, whatever its layers
    for name, ahead in (("single_mixed_sync", False), ("single", True)):
        report = json.loads((ROOT / f"bench/results/fidelity_2gpu.{name}.json").read_text())
        coster = sf.coster_of(sf.plan_of(report, "llama", "single"))
        traced = list(sf.read_steps(ROOT / f"bench/results/fidelity_2gpu.{name}.steps.json.gz")["llama"]["single"].values())
        ms, n = fit_mixed_step_ms(traced, coster, ahead=ahead)
        assert n > 100
        if ahead:  # sent while the last step ran: the rank's host work is hidden
            assert abs(ms) < 0.3 and abs(ms) < extra / 2, ms
        else:
            assert extra == pytest.approx(ms, abs=1e-4) and extra > 0.3
    mixed, dec = StepShape.from_sequences([300] + [1] * 8, [300] + [700] * 8)
    assert coster.wait_ms(mixed, "tp", dec) == pytest.approx(extra)
    halves = [(0, 3), (4, 31)]  # two stages of unequal layers: each rank's own host work, the same extra
    two = type(coster)(coster.cost, stages=halves, tp=1, sp=1, hidden=coster.hidden)
    assert two.wait_ms(mixed, "tp", dec) == pytest.approx(extra)
    for sh, d in ((StepShape.prefill([300]), None), (StepShape.decode([700] * 8), None),
                  StepShape.from_sequences([3000, 1], [3000, 700])):  # past the largest bucket: eager
        assert coster.wait_ms(sh, "tp", d) == 0.0
    lu = coster.cost.launch
    assert lu.driver_ms(64, True) > lu.driver_ms(64, False) > lu.driver_ms(1, False) > 0


def test_the_drivers_time_for_images_is_fitted_from_the_committed_trace_and_delays_image_steps():
    """``form_ms_per_kpatch`` is what ``fit_form_ms_per_kpatch`` gives on the traced image-text replay
    of the engine that sent every step with prompt chunks once the last step's tokens were back
    (``fidelity_2gpu.single_mixed_sync.*``, Qwen2-VL-7B), positive; the driver's time grows
    with a step's patches, and the simulator's coster (the form time of a step it could not form
    ahead) charges it."""
    from bench import step_fidelity as sf
    from costmodels.simulator.coster import ModelCoster
    from costmodels.steps import fit_form_ms_per_kpatch, launch_for

    prof = load_profile("h200")
    launch = launch_for(prof, "shiftplan", "compile")
    traced = sf.read_steps(ROOT / "bench/results/fidelity_2gpu.single_mixed_sync.steps.json.gz")["qwen2-vl"]["single"]
    ms, n = fit_form_ms_per_kpatch(list(traced.values()), launch)
    assert n > 50 and ms > 0 and prof.steps["form_ms_per_kpatch"]["value"] == pytest.approx(ms, abs=1e-4)
    assert launch.form_ms_per_kpatch == pytest.approx(ms, abs=1e-4)
    assert launch.driver_ms(4, True, 5000) - launch.driver_ms(4, True) == pytest.approx(5 * ms, abs=5e-4)
    report = json.loads((ROOT / "bench/results/fidelity_2gpu.single.json").read_text())
    coster = sf.coster_of(sf.plan_of(report, "qwen2-vl", "single"))
    assert isinstance(coster, ModelCoster)
    assert coster.form_ms(4, True, 5000) - coster.form_ms(4, True) == pytest.approx(5 * ms, abs=5e-4)


def test_the_decode_tail_is_fitted_from_the_calibration_and_charged_to_unequal_batches():
    """``decode_us_per_key`` is ``fit_decode_us_per_key`` over the profile's own raw engine decode
    points; a batch whose longest sequence reaches a longer key range than its mean pays that range's
    extra keys at that rate (``opcost.longest_range_tail_ms``), a batch of equal contexts nothing."""
    from costmodels.opcost import longest_range, longest_range_tail_ms
    from costmodels.steps import fit_decode_us_per_key

    prof = load_profile("h200")
    us, n = fit_decode_us_per_key(prof.raw["attn_decode_engine"])
    assert n >= 20 and prof.steps["decode_us_per_key"]["value"] == pytest.approx(us, abs=1e-5) and 0.01 < us < 0.1
    # 8 sequences, 4 KV heads: ranges over 8,192 keys are longer than over 4,096
    assert longest_range(8, 4, 5000) > longest_range(8, 4, 2650) > 0
    tail = longest_range_tail_ms(8, 4, 2650, 5000, us)
    assert tail == pytest.approx(us * 1e-3 * (longest_range(8, 4, 5000) - longest_range(8, 4, 2650)))
    assert longest_range_tail_ms(8, 4, 2650, 2650, us) == 0 == longest_range_tail_ms(8, 4, 2650, 5000, 0.0)
    assert longest_range(1, 4, 40) == 40  # a short sequence's range is the sequence
    from plans.engine_shapes import graph_splits, keys_bucket, splits

    # a captured mixed step's decodes: the graph cuts its 2,048-key tables over its 65 slots (as for 16
    # decodes: 3 ranges of 704 keys), longer than a decode step of 8 cuts them (5 of 448): a tail even at
    # equal contexts; none where the graph's one range is no longer (64 decodes of 700 keys, 1,024-key tables)
    assert graph_splits(65, 8, 2048) == (3, 704) and splits(8, 8, 2048) == (5, 448)
    assert longest_range_tail_ms(8, 8, 1500, 1500, us, (65, 2048)) == pytest.approx(us * 1e-3 * (704 - 448))
    assert longest_range_tail_ms(8, 8, 1500, 1500, us) == 0
    assert longest_range_tail_ms(64, 8, 700, 700, us, (65, 1024)) == 0 == longest_range_tail_ms(8, 8, 1500, 1500, 0.0, (65, 2048))

    for seqs, heads, keys in ((1, 1, 1), (3, 8, 511), (3, 8, 512), (3, 8, 513), (64, 4, 4096), (64, 4, 4097), (200, 2, 131072)):
        assert longest_range(seqs, heads, keys) == min(splits(seqs, heads, keys_bucket(keys))[1], keys)  # the engine's rule
    cost = model(load_config(preset="qwen2-vl-7b"))
    even, spread = StepShape.decode([2650] * 8), StepShape.decode([300] * 4 + [5000] * 4)
    assert spread.kv == even.kv and spread.decode_max_kv == 5000
    layers = len(cost.decoders)
    t_even, t_spread = (sum(b.total_ms for b in cost.step_time(s, pp=1, tp=1, sp=1).stages) for s in (even, spread))
    charged = prof.steps["decode_us_per_key"]["value"]
    assert t_spread - t_even == pytest.approx(layers * longest_range_tail_ms(8, 4, 2650, 5000, charged), rel=1e-6)
    assert t_spread > t_even


def test_the_decode_kernels_empty_graph_slots_are_fitted_from_the_sweep_and_charged_to_graphed_steps():
    """``graph_slot_ns`` is what ``fit_graph_slot_ns`` gives on the committed ``graph_decodes`` sweep,
    whose steps without decodes lie on its line (the decode kernel's cost there is its programs'
    launches alone). The coster charges a graphed prefill or mixed step ``graph_decode_programs`` over
    the slots of its step graph that hold no decode, times that, a layer: more with more slots (the
    plan's ``max_seqs``), none for decode steps, eager steps or a coster that does not know the slots."""
    from bench import step_fidelity as sf
    from costmodels.steps import decode_kernel_programs, fit_graph_slot_ns, graph_decode_programs
    from plans.engine_shapes import keys_bucket, splits

    sweep = json.loads((ROOT / "bench/results/graph_decodes.sweep.json").read_text())
    ns, n = fit_graph_slot_ns(sweep)
    prof = load_profile("h200")
    assert n == 12 and prof.steps["graph_slot_ns"]["value"] == pytest.approx(ns, abs=1e-4)
    slots, keys = sweep["slots"] + 1, keys_bucket(sweep["chunk"])
    for r in (r for r in sweep["rows"] if r["decodes"] == 0):
        nsplit = splits(min(slots, sweep["fill"]), r["heads"][1], keys)[0]
        programs = decode_kernel_programs(slots, r["heads"][1], r["heads"][0], nsplit)
        assert (r["decode_kernel_us"] - r["prefill_kernel_us"]) == pytest.approx(programs * ns * 1e-3, abs=0.6)
    report = json.loads((ROOT / "bench/results/fidelity_2gpu.single.json").read_text())
    plan = sf.plan_of(report, "llama", "single")
    coster = sf.coster_of(plan)
    cost, layers = coster.cost, len(coster.cost.decoders)
    mixed, dec = StepShape.from_sequences([300] + [1] * 8, [300] + [1500] * 8)
    prompt = StepShape.prefill([300])
    per = prof.steps["graph_slot_ns"]["value"]
    want = graph_decode_programs(64 + 1 - 8, 8, 32, 2048) * per * 1e-6 * layers  # max_seqs 64, Llama's heads

    def slots_ms(sh: StepShape, d: StepShape | None, max_seqs: int) -> float:
        graph = cost.step_graph(sh, d, sp=1, mode="tp", max_seqs=max_seqs)
        return cost.graph_slots_ms(graph, d, layers, tp=1, sp=1, mode="tp")

    assert plan.scheduler.max_seqs == 64 and slots_ms(mixed, dec, 64) == pytest.approx(want)
    assert slots_ms(prompt, None, 256) > slots_ms(prompt, None, 64) > 0
    for sh in (StepShape.decode([700] * 8), StepShape.prefill([3000])):  # a decode step; an eager step: no graph
        assert cost.step_graph(sh, None, sp=1, mode="tp", max_seqs=64) is None and slots_ms(sh, None, 64) == 0
    blind = type(coster)(cost, stages=coster.stages, tp=1, sp=1, hidden=coster.hidden)  # no max_seqs
    got = sum(coster.stage_ms(mixed, "tp", dec)) - sum(blind.stage_ms(mixed, "tp", dec))
    graph = cost.step_graph(mixed, dec, sp=1, mode="tp", max_seqs=64)  # its decodes' keys cut as the graph cuts them
    tail = cost.decode_tail_ms(dec, tp=1, sp=1, mode="tp", graph=graph) - cost.decode_tail_ms(dec, tp=1, sp=1, mode="tp")
    assert graph == (65, 2048) and got == pytest.approx(slots_ms(mixed, dec, 64) + tail * layers)


def test_a_graphed_steps_decodes_are_priced_with_the_graphs_cut_of_their_keys():
    """The decode kernel's measured time in a captured mixed step (``bench/results/graph_decodes.json``,
    one H200) against the cost model's price of the same layer (``bench/graph_decodes.py --price``):
    with the decodes' longest range cut as the step graph cuts the keys (``CostModel.step_graph``), every
    case with decodes within 15%, and nearer than the cut a decode step of them would have wherever the
    two differ (few decodes of long contexts: one range, or ranges for 16 decodes, not for 2-8)."""
    from bench import graph_decodes as gd

    report = json.loads((ROOT / "bench/results/graph_decodes.json").read_text())
    gd.price(report)
    rows = [r for r in report["rows"] if r["decodes"]]
    differ = [r for r in rows if r["model_us"] != r["decode_cut_us"]]
    assert len(rows) == 18 and len(differ) == 8
    for r in rows:
        assert abs(1 - r["model_over_kernel"]) <= 0.15, r
    for r in differ:
        assert r["model_us"] > r["decode_cut_us"] and abs(1 - r["model_over_kernel"]) < abs(1 - r["decode_cut_over_kernel"]), r
