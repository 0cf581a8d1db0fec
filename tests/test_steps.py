"""The engine's step terms in the cost model (``costmodels.steps``): the host side of a step
applies to eagerly launched steps only (SP x TP, and plain TP past the largest graph bucket), as
max(host, GPU); the Ulysses exchange's extra applies to SP x TP layers only; both only for this
repo's engine with the backends the profile measured; and the profile's values are what the
fits give on the committed measurement."""

from __future__ import annotations

import json
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
    lu = Launch(host_ms_per_layer=1.0)
    top = GRAPH_TOKEN_BUCKETS[-1]
    assert lu.graphed(top, 2, "tp") and not lu.graphed(top + 1, 2, "tp")
    assert not lu.graphed(16, 2, "sp_tp") and lu.graphed(16, 1, "sp_tp")  # sp = 1 runs plain TP
    assert lu.wall_ms(5.0, 32, 16, 2, "tp") == 5.0  # graphed: no host side
    assert lu.wall_ms(5.0, 32, 16, 2, "sp_tp") == 32.0  # eager, host-bound: max, not sum
    assert lu.wall_ms(50.0, 32, top + 1, 2, "tp") == 50.0  # eager, GPU-bound


def test_host_side_only_on_eager_steps(cfg):
    cm = model(cfg)
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
    cm = model(cfg)
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
    from costmodels.steps import fit_gemv_GBps, fit_pp_handoff_ms

    steps = load_profile("h200").steps
    speed = json.loads((ROOT / "bench/results/engine_speed.json").read_text())
    assert steps["gemv_GBps"]["value"] == pytest.approx(fit_gemv_GBps(speed), rel=1e-4)
    pp2 = json.loads((ROOT / "bench/results/mesh_speed.pp2.json").read_text())
    assert steps["pp_handoff_ms"]["value"] == pytest.approx(fit_pp_handoff_ms(pp2, model(cfg)), abs=1e-4)


def test_gemv_prices_small_decoder_products_only(cfg):
    """Decoder linears of at most 4 rows stream their weights at the GEMV's rate; 5 rows, the lm_head,
    FP8 weights and other engines keep the GEMM table."""
    from costmodels.opcost import op_time

    cm, bare = model(cfg), model(cfg, engine=None)
    fp8 = cost_model_for(cfg, "h200", weights_dtype="fp8", kv_dtype="bf16", gpus_per_node=2,
                         fused_elementwise=True, engine="shiftplan", backend="compile")[0]
    recs = {r.kind if r.kind == "lm_head" else (r.k, r.n): r for b in (cm.decoders[0], *cm._text_blocks("lm_head"))
            for r in cm._recs[b.name] if r.is_matmul}
    q = recs[(4096.0, 4096.0)]
    bw = cm.launch.gemv_GBps * 1e9
    for rows in (1, 4):
        sh = StepShape.decode([576] * rows)
        c, m, _ = op_time(q, sh, 1, 1, cm.rates, cm.profile)
        assert c == 0 and m == pytest.approx((4096 * 4096 + rows * 2 * 4096) * 2 / bw * 1e3)
        assert op_time(q, sh, 1, 1, bare.rates, bare.profile)[:2] != (c, m)
        assert op_time(q, sh, 1, 1, fp8.rates, fp8.profile)[:2] != (c, m / 2)  # FP8: its GEMM table
        lm = recs["lm_head"]
        assert op_time(lm, sh, 1, 1, cm.rates, cm.profile) == op_time(lm, sh, 1, 1, bare.rates, bare.profile)
    five = StepShape.decode([576] * 5)
    assert op_time(q, five, 1, 1, cm.rates, cm.profile) == op_time(q, five, 1, 1, bare.rates, bare.profile)
    assert fp8.rates.gemv_bw == 0 and bare.rates.gemv_bw == 0


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


def test_decode_steps_within_10pct_of_the_engines_measurement(cfg):
    """The predicted decode step at batch 1, 32 and 128 against ``bench/results/engine_speed.json``
    (one H200, compiled layers, the look-ahead the engine runs by default): each within 10%."""
    speed = json.loads((ROOT / "bench/results/engine_speed.json").read_text())
    run = speed["variants"]["graphs+compile+lookahead"]
    context = speed["prompt_tokens"] + speed["new_tokens"] // 2
    cm = model(cfg)
    for batch in (1, 32, 128):
        measured = run[f"batch_{batch}"]["decode_step_ms"]
        predicted = cm.step_wall_ms(StepShape.decode([context] * batch))
        assert predicted == pytest.approx(measured, rel=0.10), (batch, predicted, measured)


def test_two_gpu_speedups_within_10pct_of_the_measured(cfg):
    """``bench/scaling_2gpu.py`` on the committed measurements: every mesh's predicted speedup over one
    GPU (tp2, shift-sp2, pp2; decode and prefill) within 10% of the measured one, and the single GPU's
    own steps within 10%."""
    from bench import scaling_2gpu as s

    files = [ROOT / "bench/results/mesh_speed.json", ROOT / "bench/results/mesh_speed.pp2.json"]
    reports = [json.loads(f.read_text()) for f in files]
    assert reports[0]["backend"] == "compile"
    pred = s.predicted(model(cfg))
    rows = [r for rep in reports for r in s.compare(pred, s.measured(rep))]
    assert {r["mesh"] for r in rows} == {"tp2", "shift-sp2", "pp2"}
    for r in rows:
        assert abs(r["error"]) <= 0.10, r
    single = s.measured(reports[0])["single"]
    for step in ("decode_ms", "prefill_ms"):
        assert pred["single"][step] == pytest.approx(single[step], rel=0.10)
