"""Workloads: synthetic draws match the spec's distributions, images become tokens by the model's
own rule, traces (Azure columns or plain ones) load as they are, and everything is seeded."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from costmodels.synthetic import model_info
from costmodels.workload import ImageRule, from_trace, image_rule
from planner.inputs import workload_of
from graph.hf_config import load_config
from planner.spec import load_spec, parse_spec
from plans.errors import UserError

ROOT = Path(__file__).parents[1]
AZURE = ROOT / "examples" / "traces" / "azure_sample.csv"


@pytest.fixture(scope="module")
def vl_info():
    return model_info(load_config(preset="qwen2.5-vl-72b"))


@pytest.fixture(scope="module")
def text_info():
    return model_info(load_config(preset="llama-3.1-8b"))


def _spec(images: bool = True, **workload) -> str:
    wl = {"arrival_rate": 5.0, "input_tokens": "{mean: 600, cv: 0.5, max: 8192}",
          "output_tokens": "{mean: 200, cv: 1.0, min: 4, max: 1024}", "requests": 4000, "seed": 3}
    wl.update(workload)
    lines = "\n".join(f"  {k}: {v}" for k, v in wl.items())
    img = ("\n  images: {per_request: [0, 1, 4], weights: [0.5, 0.3, 0.2], "
           "resolution: [[448, 448], [1280, 720]]}") if images else ""
    return (f"name: t\nmodel: {{preset: qwen2.5-vl-72b}}\nhardware: {{gpu: h200}}\nworkload:\n{lines}{img}\n"
            "slo: {ttft_p90_ms: 1000, tpot_p90_ms: 50}\n")


# ------------------------------------------------------------------ image rule


@pytest.mark.parametrize("wh,tokens", [((448, 448), 256), ((1280, 720), 1196), ((1920, 1080), 1222),
                                       ((640, 480), 391), ((10, 10), 4), ((28, 28), 4)])
def test_qwen_image_tokens(vl_info, wh, tokens):
    rule = image_rule(vl_info)
    assert rule is not None and rule.kind == "qwen2_vl"
    t, p = rule.tokens(*wh)
    assert t == tokens
    assert p == 4 * t  # ViT sees 14-px patches: 4 per merged LLM token


def _hf_smart_resize():
    """transformers' own ``smart_resize``, taken from its source (the module itself needs torchvision)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    src = (Path(spec.origin).parent / "models" / "qwen2_vl" / "image_processing_qwen2_vl.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize")
    ns: dict = {"math": math}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "smart_resize", "exec"), ns)
    return ns["smart_resize"]


def test_qwen_rule_matches_transformers_smart_resize():
    smart_resize = _hf_smart_resize()
    rule = ImageRule("qwen2_vl")
    sizes = [(w, h) for w in (30, 97, 448, 800, 1333, 2048, 4000) for h in (40, 333, 720, 1080, 3000)]
    for w, h in sizes:
        assert rule.resize(w, h) == smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def test_text_model_has_no_image_rule(text_info):
    assert image_rule(text_info) is None


def test_max_pixels_from_config_overrides_default():
    rule = ImageRule("qwen2_vl", max_pixels=28 * 28 * 16384)
    assert rule.tokens(1920, 1080)[0] == 39 * 69  # no downscale under the checkpoint's larger limit


# ------------------------------------------------------------------ synthetic


def test_synthetic_matches_spec_distributions(vl_info):
    spec = parse_spec(_spec())
    reqs = workload_of(spec, vl_info).sample()
    assert len(reqs) == 4000
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:])]
    rate = 1 / statistics.mean(gaps)
    assert abs(rate - 5.0) / 5.0 < 0.05
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert abs(cv - 1.0) < 0.08  # Poisson: exponential gaps
    text = [r.text_tokens for r in reqs]
    assert abs(statistics.mean(text) - 600) / 600 < 0.04
    out = [r.output_tokens for r in reqs]
    assert min(out) >= 4 and max(out) <= 1024
    counts = [len(r.image_tokens) for r in reqs]
    for c, w in ((0, 0.5), (1, 0.3), (4, 0.2)):
        assert abs(counts.count(c) / len(reqs) - w) < 0.03
    assert set(counts) <= {0, 1, 4}
    assert {t for r in reqs for t in r.image_tokens} == {256, 1196}
    for r in reqs:
        assert r.prompt_tokens == r.text_tokens + sum(r.image_tokens)
        assert [4 * t for t in r.image_tokens] == list(r.image_patches)


def test_bursty_arrivals_have_the_requested_cv(vl_info):
    spec = parse_spec(_spec(images=False, burstiness=2.5, requests=6000))
    reqs = workload_of(spec, vl_info).sample()
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:])]
    assert abs(statistics.pstdev(gaps) / statistics.mean(gaps) - 2.5) < 0.25
    assert abs(1 / statistics.mean(gaps) - 5.0) / 5.0 < 0.1


def test_seeded_and_reproducible(vl_info):
    wl = workload_of(parse_spec(_spec(requests=300)), vl_info)
    assert wl.sample() == wl.sample()
    assert wl.sample(seed=7) == wl.sample(seed=7)
    assert wl.sample(seed=7) != wl.sample(seed=8)


def test_with_rate_redraws_at_the_new_rate(vl_info):
    wl = workload_of(parse_spec(_spec(requests=3000)), vl_info).with_rate(50.0)
    reqs = wl.sample()
    assert abs((len(reqs) - 1) / reqs[-1].arrival_s - 50.0) / 50.0 < 0.06
    with pytest.raises(UserError, match="rate"):
        wl.with_rate(0)


def test_images_on_a_text_model_is_a_user_error(text_info):
    with pytest.raises(UserError, match="no vision tower"):
        workload_of(parse_spec(_spec()), text_info)


# ------------------------------------------------------------------ traces


def test_azure_trace_loads_as_is(vl_info):
    wl = from_trace(AZURE, info=vl_info)
    reqs = wl.sample()
    rows = AZURE.read_text().strip().splitlines()[1:]
    assert len(reqs) == len(rows) == wl.requests
    assert reqs[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))
    first = rows[0].split(",")
    assert reqs[0].output_tokens == int(first[2])
    assert len(reqs[0].image_tokens) == int(first[3])
    for r, row in zip(reqs, rows):
        ctx, n_img = int(row.split(",")[1]), int(row.split(",")[3])
        assert len(r.image_tokens) == n_img
        assert r.text_tokens == max(1, ctx - sum(r.image_tokens))  # ContextTokens include image tokens
    assert wl.multimodal
    # the trace's own rate, and time-scaling to another one
    span = reqs[-1].arrival_s
    assert math.isclose(wl.rate, (len(reqs) - 1) / span)
    fast = wl.with_rate(wl.rate * 4).sample()
    assert math.isclose(fast[-1].arrival_s, span / 4)


def test_trace_from_spec_uses_its_resolutions(vl_info):
    spec = load_spec(ROOT / "examples" / "qwen2-vl-7b-1xh100.yaml")
    wl = workload_of(spec, vl_info)
    toks = {t for r in wl.sample() for t in r.image_tokens}
    assert toks == {256, 999}  # 448x448 -> 16x16; 1024x768 -> 37x27 on the 28-px grid


def test_plain_columns_and_seconds(tmp_path, vl_info):
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,input_tokens,output_tokens\n0.5,100,10\n1.5,200,20\n3.5,300,30\n")
    reqs = from_trace(p, info=vl_info).sample()
    assert [r.arrival_s for r in reqs] == [0.0, 1.0, 3.0]
    assert [(r.text_tokens, r.output_tokens, r.image_tokens) for r in reqs] == [(100, 10, ()), (200, 20, ()), (300, 30, ())]


def test_trace_images_ignored_for_a_text_model(text_info):
    wl = from_trace(AZURE, info=text_info)
    assert not any(r.image_tokens for r in wl.sample())
    assert any("ignored" in n for n in wl.notes)


@pytest.mark.parametrize("text,match", [
    ("when,input_tokens,output_tokens\n1,2,3\n", r"no arrival column.*TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 12:00:00,abc,3\n", r":2: ContextTokens 'abc' is not a number"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,3\n", r":2: arrival 'yesterday'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "at least one request"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,-5,3\n", ">= 0"),
])
def test_bad_traces_are_user_errors(tmp_path, text, match):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        from_trace(p)


def test_missing_trace_file(tmp_path):
    with pytest.raises(UserError, match="trace file not found"):
        from_trace(tmp_path / "nope.csv")
