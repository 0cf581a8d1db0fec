"""More bad inputs, each one clear error (exit code 2, no traceback) that names what is wrong: YAML
keys that are not names, inline GPU figures and model configs out of any device's or model's range,
plan files edited past what their model or executors can run, `plan run` options refused before any
worker or model is built, empty items in comma lists, and arrival rates too slow to simulate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from planner.cli import main as plan_main
from planner.spec import SpecError, parse_spec
from plans.errors import UserError
from plans.schema import load_plan

ROOT = Path(__file__).parents[1]
PLAN = ROOT / "plans" / "llama-3.1-8b-1xh100.plan.yaml"
PP_PLAN = ROOT / "plans" / "llama-3.1-70b-2x8xh100.plan.yaml"
SPEC = ROOT / "examples" / "llama-3.1-8b-1xh100.yaml"

BASE = ("name: t\nmodel: {preset: llama-3.1-8b}\nhardware: {gpu: h100, gpus_per_node: 1}\n"
        "workload: {arrival_rate: 1.0, input_tokens: {mean: 512, max: 1024}, output_tokens: {mean: 64, max: 128}}\n")


def run(capsys, *args) -> tuple[int, str]:
    code = plan_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, " ".join(err.split())


def spec_error(text: str) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(text, source="s.yaml")
    return " ".join(str(e.value).split())


def mutated(tmp_path: Path, src: Path, edit) -> Path:
    data = yaml.safe_load(src.read_text())
    data["provenance"]["spec"] = str((src.parent / data["provenance"]["spec"]).resolve())
    edit(data)
    out = tmp_path / "bad.plan.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


# ------------------------------------------------------------------ the spec


@pytest.mark.parametrize("key, kind", [("? [a, b]\n: 1\n", "list"), ("? {a: 1}\n: 1\n", "dict")])
def test_a_yaml_key_that_is_not_a_name(key, kind):
    """A list or mapping as a key used to end in `TypeError: unhashable type`."""
    msg = spec_error(BASE + key)
    assert f"s.yaml:5: not valid YAML: a key must be a name, got a {kind}" in msg


@pytest.mark.parametrize("figures, field", [
    ("bf16_tflops: 1e300, hbm_gb: 80, hbm_tbps: 3, link_gbps: 100", "hardware.gpu.bf16_tflops"),
    ("bf16_tflops: 500, hbm_gb: 1e300, hbm_tbps: 3, link_gbps: 100", "hardware.gpu.hbm_gb"),  # was a NaN traceback
    ("bf16_tflops: 500, hbm_gb: 80, hbm_tbps: 1e300, link_gbps: 100", "hardware.gpu.hbm_tbps"),
    ("bf16_tflops: 1e-300, hbm_gb: 80, hbm_tbps: 3, link_gbps: 100", "hardware.gpu.bf16_tflops"),  # was a hang
    ("bf16_tflops: 500, hbm_gb: 80, hbm_tbps: 1e-300, link_gbps: 100", "hardware.gpu.hbm_tbps"),
    ("bf16_tflops: 500, hbm_gb: 80, hbm_tbps: 3, link_gbps: 1e-300", "hardware.gpu.link_gbps"),
    ("bf16_tflops: 500, hbm_gb: 80, hbm_tbps: 3, link_gbps: 100, inter_node_gbps: 1e300",
     "hardware.gpu.inter_node_gbps"),
])
def test_inline_gpu_figures_beyond_any_device(figures, field):
    msg = spec_error(BASE.replace("gpu: h100", f"gpu: {{name: g, {figures}}}"))
    assert field in msg and "s.yaml:3" in msg


def test_inline_gpu_at_its_bounds_compiles(tmp_path, capsys):
    for figures in ("bf16_tflops: 1e-3, hbm_gb: 80, hbm_tbps: 1e-3, link_gbps: 1e-3",
                    "bf16_tflops: 1e6, hbm_gb: 1e5, hbm_tbps: 1e3, link_gbps: 1e6"):
        spec = tmp_path / "s.yaml"
        spec.write_text(BASE.replace("gpu: h100", f"gpu: {{name: g, {figures}}}"))
        assert run(capsys, "compile", spec, "-q", "-o", tmp_path / "p.plan.yaml")[0] == 0


def test_an_arrival_rate_too_slow_to_simulate():
    """At 1e-300 requests/s the arrival times swallow the steps' milliseconds: every latency came out 0."""
    assert "workload.arrival_rate" in spec_error(BASE.replace("arrival_rate: 1.0", "arrival_rate: 1.0e-9"))
    parse_spec(BASE.replace("arrival_rate: 1.0", "arrival_rate: 1.0e-6"), "s.yaml")


# ------------------------------------------------------------------ model configs


@pytest.mark.parametrize("edit, needle", [
    ({"num_hidden_layers": 10**9}, "'num_hidden_layers' is 1,000,000,000; at most 4,096"),  # was a hang
    ({"max_position_embeddings": 0}, "'max_position_embeddings' must be a positive integer, got 0"),
    ({"max_position_embeddings": -5}, "'max_position_embeddings' must be a positive integer, got -5"),
])
def test_model_configs_out_of_range(tmp_path, capsys, edit, needle):
    cfg = json.loads((ROOT / "graph" / "presets" / "llama-3.1-8b" / "config.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg, **edit}))
    spec = tmp_path / "s.yaml"
    spec.write_text(BASE.replace("{preset: llama-3.1-8b}", "{config: config.json}"))
    for args in (["graph", path, "--no-cache"], ["compile", spec, "-q"]):
        code, err = run(capsys, *args)
        assert code == 2 and needle in err, (args, err)


# ------------------------------------------------------------------ plan files


BROKEN = {
    "nodes": (PLAN, lambda d: (d["hardware"].update(nodes=10**9), d["mesh"].update(dp=10**9)),
              "hardware.nodes: Input should be less than or equal to 1024"),  # simulate hung
    "gpus per node": (PLAN, lambda d: d["hardware"].update(gpus_per_node=1000), "hardware.gpus_per_node"),
    "block size": (PLAN, lambda d: d["scheduler"].update(block_size=10**9), "scheduler.block_size"),
    "max_seqs": (PLAN, lambda d: d["scheduler"].update(max_seqs=10**12), "scheduler.max_seqs"),
    "max_batch_tokens": (PLAN, lambda d: d["scheduler"].update(max_batch_tokens=10**12), "scheduler.max_batch_tokens"),
    "lm_head off the last stage": (PP_PLAN, lambda d: d["stages"][1].update(lm_head=False),
                                   "stages[1].lm_head is false; the lm_head is on stage 1 alone"),
    "lm_head on the first stage": (PP_PLAN, lambda d: d["stages"][0].update(lm_head=True),
                                   "stages[0].lm_head is true; the lm_head is on stage 1 alone"),
    "two embeddings": (PP_PLAN, lambda d: d["stages"][1].update(embedding=True),
                       "stages[1].embedding is true; the embedding is on stage 0 alone"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_plans_the_executors_cannot_run(tmp_path, capsys, name):
    src, edit, needle = BROKEN[name]
    bad = mutated(tmp_path, src, edit)
    with pytest.raises(UserError) as e:
        load_plan(bad)
    assert needle in " ".join(str(e.value).split())
    code, err = run(capsys, "simulate", bad, "-n", "20")
    assert code == 2 and needle in err


@pytest.mark.parametrize("edit, needle", [
    (lambda d: (d["model"].update(num_layers=40), d["stages"][0].update(last_layer=39)),
     "model.num_layers is 40 but the model config of llama-3.1-8b has 32"),
    (lambda d: d["model"].update(architecture="Qwen2ForCausalLM"),
     "model.architecture is Qwen2ForCausalLM but the model config of llama-3.1-8b has LlamaForCausalLM"),
    (lambda d: d["model"].update(preset="llama-3.1-70b", name="llama-3.1-70b"),
     "model.num_layers is 32 but the model config of llama-3.1-70b has 80"),
])
def test_a_plan_edited_for_another_model(tmp_path, capsys, edit, needle):
    """The simulator used to run such a plan on its config's model (half the layers: half the time)."""
    bad = mutated(tmp_path, PLAN, edit)
    code, err = run(capsys, "simulate", bad, "-n", "20")
    assert code == 2 and needle in err and "recompile it" in err and str(bad) in err


# ------------------------------------------------------------------ `plan run` before the model is built


@pytest.fixture
def no_load(monkeypatch):
    """Building the 8B model on CPU takes minutes: the errors below must come before it."""
    import executors.engine

    def load(*a, **kw):
        raise AssertionError("the model was built before the options were checked")

    monkeypatch.setattr(executors.engine, "load", load)


@pytest.mark.parametrize("args, needle", [
    (["--tokens", "1,,2"], "--tokens: '1,,2' has an empty item between commas"),
    (["--tokens", "1,a"], "--tokens: 'a' is not an integer token id"),
    (["--tokens", "200000"], "--tokens: token id 200000 is outside the vocabulary of llama-3.1-8b (0..128255)"),
    (["--tokens", "-1"], "--tokens: token id -1 is outside the vocabulary"),
    (["--tokens", "1,2,3", "--max-context", "8"],
     "a prompt of 3 tokens + --max-new-tokens 32 = 35 tokens is beyond --max-context of 8 tokens"),
    (["--tokens", "1", "--backend", "jax"], "--backend: unknown backend 'jax'; choose one of eager, compile, tensorrt"),
    (["--tokens", "1", "--device", "tpu"], "--device 'tpu': use cpu or cuda"),
    (["--tokens", "1", "--image", "/nonexistent/a.png"], "--image /nonexistent/a.png: not found"),
    (["--tokens", "1", "--tokenizer", "/nonexistent/tok"], "--tokenizer /nonexistent/tok: not found"),
    (["--prompt", "hi"], "--prompt needs a tokenizer"),
])
def test_run_options_are_checked_before_the_model_is_built(capsys, no_load, args, needle):
    code, err = run(capsys, "run", PLAN, *args)
    assert code == 2 and needle in err, err


def test_run_paths_of_the_wrong_kind(tmp_path, capsys, no_load):
    (tmp_path / "img").mkdir()
    code, err = run(capsys, "run", PLAN, "--tokens", "1", "--image", tmp_path / "img")
    assert code == 2 and "is a folder; give an image file" in err
    a_png = tmp_path / "a.png"
    a_png.write_bytes(b"\x89PNG")
    code, err = run(capsys, "run", PLAN, "--tokens", "1", "--image", a_png)
    assert code == 2 and "--image: llama-3.1-8b (LlamaForCausalLM) has no vision tower" in err
    code, err = run(capsys, "run", PLAN, "--tokens", "1", "--tokenizer", a_png)
    assert code == 2 and "not a folder" in err
    code, err = run(capsys, "run", PLAN, "--tokens", "1", "--tokenizer", tmp_path / "img")
    assert code == 2 and "no tokenizer.json or tokenizer_config.json in it" in err


def test_bench_backend_is_checked_before_the_model_is_built(capsys, no_load):
    code, err = run(capsys, "bench", PLAN, "--backend", "jax", "--requests", "1")
    assert code == 2 and "--backend: unknown backend 'jax'" in err


# ------------------------------------------------------------------ other commands' options


def test_empty_items_and_slow_rates_in_simulate(capsys):
    code, err = run(capsys, "simulate", PLAN, "--rates", "1,,2", "-n", "20")
    assert code == 2 and "--rates must be comma-separated numbers, got '1,,2'" in err
    for rate in ("1e-300", "1e-7"):
        code, err = run(capsys, "simulate", PLAN, "--rate", rate, "-n", "20")
        assert code == 2 and "arrival rates must be > 0 (at least 1e-06) and at most 1e+06 requests/s" in err


def test_empty_names_are_refused(capsys):
    code, err = run(capsys, "graph", SPEC, "--block", "")
    assert code == 2 and "no block '' in this model" in err
    code, err = run(capsys, "export", PLAN, "--engine", "vllm", "--model", "")
    assert code == 2 and "--model is empty" in err
