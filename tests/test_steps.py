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
