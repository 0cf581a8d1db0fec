"""Every bad input gets a clear error (exit code 2, no traceback), by class: non-finite or absurd
numbers, user text that looks like rich markup, binary files, bad output paths, plan files that
validate but are impossible, requests beyond the model's context, contradictory search pins.
Plus the exit-code contract, `plan --version` and help text on every option."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from planner.cli import app, main as plan_main
from planner.spec import SpecError, parse_spec
from plans.errors import UserError
from plans.schema import load_plan

ROOT = Path(__file__).parents[1]
PLAN = ROOT / "plans" / "llama-3.1-8b-1xh100.plan.yaml"
VL_PLAN = ROOT / "plans" / "qwen2-vl-7b-1xh100.plan.yaml"

BASE = ("name: t\nmodel: {preset: llama-3.1-8b}\nhardware: {gpu: h100, gpus_per_node: 1}\n"
        "workload: {arrival_rate: 1.0, input_tokens: {mean: 512, max: 1024}, output_tokens: {mean: 64, max: 128}}\n")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = plan_main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def spec_error(text: str) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(text, source="s.yaml")
    return " ".join(str(e.value).split())


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize("old, new, needle", [
    ("arrival_rate: 1.0", "arrival_rate: .inf", "workload.arrival_rate"),
    ("arrival_rate: 1.0", "arrival_rate: .nan", "workload.arrival_rate"),
    ("arrival_rate: 1.0", "arrival_rate: 1.0e12", "less than or equal to 1000000"),
    ("arrival_rate: 1.0", "arrival_rate: true", "workload.arrival_rate"),
    ("{mean: 512,", "{mean: .inf,", "workload.input_tokens.mean"),
    ("{mean: 64,", "{mean: .nan,", "workload.output_tokens.mean"),
    ("gpus_per_node: 1", "gpus_per_node: true", "hardware.gpus_per_node"),
    ("gpus_per_node: 1", "gpus_per_node: 1.5", "hardware.gpus_per_node"),
    ("arrival_rate: 1.0,", "arrival_rate: 1.0, requests: 300000000,", "workload.requests"),
])
def test_non_finite_absurd_and_boolean_numbers_are_refused(old, new, needle):
    assert old in BASE
    msg = spec_error(BASE.replace(old, new, 1))
    assert needle in msg and "s.yaml:" in msg


@pytest.mark.parametrize("figure", ["0", "-5", ".nan", ".inf", "true"])
def test_inline_gpu_figures_must_be_finite_and_positive(figure):
    gpu = f"{{name: g, bf16_tflops: {figure}, hbm_gb: 80, hbm_tbps: 3, link_gbps: 100}}"
    msg = spec_error(BASE.replace("gpu: h100", f"gpu: {gpu}"))
    assert "hardware.gpu.bf16_tflops" in msg


def test_absurd_cli_numbers_are_usage_errors(capsys):
    for args in (["--rate", "nan"], ["--rate", "inf"], ["--requests", "300000000"], ["--tpot-slo", "inf"]):
        code, _, err = run(capsys, "simulate", PLAN, *args)
        assert code == 2, args
        assert re.search(r"finite|at most|from 1 to|--requests|--rate", err), err


# ------------------------------------------------------------------ user text is text, not markup


@pytest.mark.parametrize("text", ["[bold]x[/]", "[/]", "a[red]b", "[link=x]y", "[#ff0000 on blue]"])
def test_user_text_prints_as_is(tmp_path, capsys, text):
    code, _, err = run(capsys, "show", tmp_path / f"{text}.plan.yaml")
    assert code == 2 and f"{text}.plan.yaml" in err
    bad = tmp_path / "s.yaml"
    bad.write_text(BASE.replace("llama-3.1-8b", f"'{text}'"))
    code, _, err = run(capsys, "compile", bad)
    assert code == 2 and f"unknown preset '{text}'" in " ".join(err.split())


def test_compile_summary_escapes_the_plan_name(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(BASE.replace("name: t", "name: '[bold]n[/]'"))
    code, _, err = run(capsys, "compile", spec, "-o", tmp_path / "p.plan.yaml")
    assert code == 0 and "[bold]n[/]: " in err
    code, out, _ = run(capsys, "graph", spec)
    assert code == 0 and "[bold]n[/] (LlamaForCausalLM)" in out
    code, out, _ = run(capsys, "show", tmp_path / "p.plan.yaml")
    assert code == 0 and "plan [bold]n[/]" in out and "provenance spec s.yaml " in out


# ------------------------------------------------------------------ binary and non-UTF-8 files


@pytest.mark.parametrize("data", [b"\xff\xfe\x00\x01binary", b"name: t\x00\x00\n", bytes(range(256))])
def test_binary_files_are_clear_errors(tmp_path, capsys, data):
    f = tmp_path / "f.yaml"
    f.write_bytes(data)
    csv = tmp_path / "f.csv"
    csv.write_bytes(data)
    for args in (["compile", f], ["show", f], ["diff", f, PLAN], ["simulate", PLAN, "--workload", csv],
                 ["simulate", PLAN, "--workload", f], ["graph", f], ["estimate", f]):
        code, _, err = run(capsys, *args)
        assert code == 2, args
        assert "error:" in err, args


def test_binary_model_config_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_bytes(b"\xff\x00binary")
    spec = tmp_path / "s.yaml"
    spec.write_text(BASE.replace("{preset: llama-3.1-8b}", "{config: config.json}"))
    for args in (["compile", spec], ["graph", spec], ["graph", tmp_path / "config.json"], ["estimate", spec]):
        code, _, err = run(capsys, *args)
        assert code == 2 and "not a model config file: not UTF-8 text" in err, args


def test_burstiness_and_request_counts_are_bounded():
    assert "workload.burstiness" in spec_error(BASE.replace("arrival_rate: 1.0,", "arrival_rate: 1.0, burstiness: 1.0e-300,"))
    assert "less than or equal to 200000" in spec_error(
        BASE.replace("arrival_rate: 1.0,", "arrival_rate: 1.0, requests: 200001,"))


def test_a_folder_given_as_a_file(tmp_path, capsys):
    for args in (["show", tmp_path], ["compile", tmp_path], ["simulate", PLAN, "--workload", tmp_path]):
        code, _, err = run(capsys, *args)
        assert code == 2 and "not found" in err, args


# ------------------------------------------------------------------ output paths


def test_bad_output_paths_are_refused_before_the_work(tmp_path, capsys):
    spec = ROOT / "examples" / "llama-3.1-8b-1xh100.yaml"
    (tmp_path / "d").mkdir()
    cases = [
        (["compile", spec, "-o", tmp_path / "d"], "is a folder"),
        (["compile", spec, "-o", tmp_path / "missing" / "p.plan.yaml"], "does not exist"),
        (["compile", spec, "-o", tmp_path / "p.plan.yaml", "--lp", tmp_path / "d"], "--lp"),
        (["compile", spec, "-o", tmp_path / "p.plan.yaml", "--lp", tmp_path / "no" / "x.lp"], "does not exist"),
        (["simulate", PLAN, "--plot", tmp_path / "curve.xyz"], "cannot write '.xyz' figures"),
        (["simulate", PLAN, "--plot", tmp_path / "curve"], "no suffix"),
        (["simulate", PLAN, "--plot", tmp_path / "d"], "is a folder"),
        (["export-onnx", PLAN, "-o", tmp_path / "d"], "is a folder"),
        (["export-onnx", PLAN, "-o", tmp_path / "no" / "s.onnx"], "does not exist"),
        (["export", PLAN, "--engine", "vllm", "-o", tmp_path / "d"], "is a folder"),
        (["export", PLAN, "--engine", "vllm", "-o", tmp_path / "no" / "x.sh"], "does not exist"),
    ]
    for args, needle in cases:
        code, _, err = run(capsys, *args)
        assert code == 2 and needle in " ".join(err.split()), (args, err)
    assert not (tmp_path / "p.plan.yaml").exists()  # refused before compiling


# ------------------------------------------------------------------ plans that validate but are impossible


def _mutated(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(PLAN.read_text())
    edit(data)
    out = tmp_path / "bad.plan.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


IMPOSSIBLE = {
    "tp 0": (lambda d: d["mesh"].update(tp=0), "mesh.tp"),
    "mesh larger than hardware": (lambda d: d["mesh"].update(dp=4), "4 GPUs > 1 per node x 1 nodes = 1"),
    "duplicate axis": (lambda d: d["mesh"].update(axis_order=["dp", "dp", "tp", "sp"]), "repeated: dp"),
    "missing axis": (lambda d: d["mesh"].update(axis_order=["dp", "pp", "tp"]), "missing: sp"),
    "negative memory": (lambda d: d["memory_gb"].update(kv=-1.0), "memory_gb.kv"),
    "NaN": (lambda d: d["memory_gb"].update(weights=float("nan")), "memory_gb.weights"),
    "infinite step": (lambda d: d["stages"][0].update(step_ms=float("inf")), "stages.0.step_ms"),
    "max_seqs 0": (lambda d: d["scheduler"].update(max_seqs=0), "scheduler.max_seqs"),
    "boolean degree": (lambda d: d["mesh"].update(pp=True), "mesh.pp"),
    "unknown GPU": (lambda d: d["hardware"].update(gpu="h1000"), "unknown GPU 'h1000'"),
    "over capacity": (lambda d: d["memory_gb"].update(total=1e6), "exceeds the GPU's capacity"),
    "stage index": (lambda d: d["stages"][0].update(index=3), "has index 3"),
    "micro-batches beyond the sequences": (lambda d: d["scheduler"].update(microbatches=10**6),
                                           "scheduler.microbatches = 1000000"),
}


@pytest.mark.parametrize("name", IMPOSSIBLE)
def test_impossible_plans_are_refused_by_load_plan(tmp_path, name):
    edit, needle = IMPOSSIBLE[name]
    with pytest.raises(UserError) as e:
        load_plan(_mutated(tmp_path, edit))
    assert needle in " ".join(str(e.value).split())


def test_every_command_checks_the_plan(tmp_path, capsys):
    bad = _mutated(tmp_path, lambda d: d["mesh"].update(dp=4))
    for args in (["show", bad], ["diff", bad, PLAN], ["diff", PLAN, bad], ["simulate", bad],
                 ["run", bad, "--tokens", "1,2"], ["bench", bad], ["export-onnx", bad, "-o", tmp_path / "x.onnx"],
                 ["export", bad, "--engine", "vllm"],
                 ["compile", ROOT / "examples" / "llama-3.1-8b-1xh100.yaml", "--check", bad]):
        code, _, err = run(capsys, *args)
        assert code == 2 and "4 GPUs > 1 per node x 1 nodes = 1" in " ".join(err.split()), args


# ------------------------------------------------------------------ beyond the model's context


def test_synthetic_requests_beyond_context_are_refused_with_the_arithmetic():
    from planner.api import compile_spec

    spec = parse_spec(BASE.replace("{mean: 512, max: 1024}", "{mean: 512, max: 131072}"), "s.yaml")
    with pytest.raises(UserError) as e:
        compile_spec(spec)
    msg = " ".join(str(e.value).split())
    assert "131072 input_tokens max" in msg and "128 output_tokens max = 131200 tokens" in msg
    assert "context of 131072 tokens" in msg


def test_images_times_image_tokens_beyond_context():
    from planner.inputs import workload_of
    from graph.cache import load_or_trace
    from graph.hf_config import load_config

    info = load_or_trace(load_config("qwen2-vl-7b")).graph.info
    text = ("name: v\nmodel: {preset: qwen2-vl-7b}\nhardware: {gpu: h100, gpus_per_node: 1}\n"
            "workload: {arrival_rate: 1.0, input_tokens: {mean: 100, max: 200}, output_tokens: {mean: 10, max: 20},\n"
            "  images: {per_request: [0, 40], resolution: [[1280, 720]]}}\n")
    with pytest.raises(UserError) as e:
        workload_of(parse_spec(text, "v.yaml"), info)
    msg = " ".join(str(e.value).split())
    assert "200 input_tokens max + 40 images x 1196 tokens + 20 output_tokens max = 48060 tokens" in msg
    assert f"context of {info.max_context}" in msg


def test_estimate_isl_beyond_context(capsys):
    code, _, err = run(capsys, "estimate", ROOT / "examples" / "llama-3.1-8b-1xh100.yaml", "--isl", "200000")
    assert code == 2 and "--isl 200000 + --osl 256 = 200256 tokens" in " ".join(err.split())
    code, _, err = run(capsys, "estimate", ROOT / "examples" / "qwen2-vl-7b-1xh100.yaml", "--images", "2")
    assert code == 2 and "give both" in err  # was silently ignored


def test_bench_input_tokens_beyond_context(tmp_path, capsys):
    from tests.tiny.helpers import make_plan
    from plans.schema import save_plan

    p = tmp_path / "tiny.plan.yaml"
    save_plan(make_plan("llama"), p)
    code, _, err = run(capsys, "bench", p, "--input-tokens", "100000", "--output-tokens", "8")
    assert code == 2 and "--input-tokens 100000 + --output-tokens 8 = 100008" in " ".join(err.split())


# ------------------------------------------------------------------ search pins


@pytest.mark.parametrize("search, needle", [
    ("{sp: [1], shift_threshold: 256}", "shift needs sp >= 2"),
    ("{pp: [2], stages: [[0, 31]]}", "stages pins 1 pipeline stages but pp is pinned to [2]"),
    ("{vision_placement: [stage0_tp], dedicated_vision_gpus: [2]}", "has no 'dedicated'"),
    ("{stages: [[0, 10], [12, 31]]}", "contiguous"),
])
def test_contradictory_pins_are_refused(search, needle):
    assert needle in spec_error(BASE + f"search: {search}\n")


def test_pins_that_cannot_apply_to_the_model_are_refused():
    from planner.api import compile_spec

    for search in ("{vision_placement: [dedicated]}", "{dedicated_vision_gpus: [1]}"):
        with pytest.raises(UserError, match="has no vision encoder"):
            compile_spec(parse_spec(BASE + f"search: {search}\n", "s.yaml"))


# ------------------------------------------------------------------ exit codes, version, help


def test_exit_codes(tmp_path, capsys):
    assert run(capsys, "diff", PLAN, PLAN)[0] == 0
    assert run(capsys, "diff", PLAN, VL_PLAN)[0] == 1
    assert run(capsys, "diff", PLAN)[0] == 2  # usage error: a missing argument
    assert run(capsys, "show", PLAN, "--no-such-option")[0] == 2
    assert run(capsys, "no-such-command")[0] == 2
    assert run(capsys, "diff", PLAN, PLAN, "--format", "html")[0] == 2
    assert run(capsys, "show", tmp_path / "none.plan.yaml")[0] == 2


def test_version(capsys):
    from planner import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"shiftplan {__version__}"


def test_every_option_has_help_text():
    import typer.main

    group = typer.main.get_command(app)
    missing = []
    for name, cmd in group.commands.items():
        assert (cmd.help or "").strip(), name
        for p in cmd.params:
            if p.param_type_name == "option" and not (getattr(p, "help", None) or "").strip():
                missing.append(f"{name} {p.opts[0]}")
    missing += [f"plan {p.opts[0]}" for p in group.params if not (getattr(p, "help", None) or "").strip()]
    assert not missing, missing


# ------------------------------------------------------------------ a plan knows its spec


def test_simulate_finds_the_plans_own_spec_and_names_a_moved_one(tmp_path, capsys):
    (tmp_path / "specs").mkdir()
    (tmp_path / "plans").mkdir()
    spec = tmp_path / "specs" / "mine.yaml"
    spec.write_text(BASE.replace("name: t", "name: mine"))
    plan = tmp_path / "plans" / "mine.plan.yaml"
    assert run(capsys, "compile", spec, "-q", "-o", plan)[0] == 0
    assert load_plan(plan).provenance.spec == "../specs/mine.yaml"
    code, out, _ = run(capsys, "simulate", plan, "-n", "50", "--json")
    assert code == 0 and '"plan": "mine"' in out
    # the whole folder moved: still found
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "plans", moved / "plans")
    shutil.copytree(tmp_path / "specs", moved / "specs")
    assert run(capsys, "simulate", moved / "plans" / "mine.plan.yaml", "-n", "50")[0] == 0
    # the spec changed since: a note says so
    spec.write_text(spec.read_text() + "# edited\n")
    code, out, _ = run(capsys, "simulate", plan, "-n", "50")
    assert code == 0 and "has changed since this plan was compiled" in out
    # the spec moved away: a clear error naming where it was looked for
    spec.rename(tmp_path / "mine.yaml")
    code, _, err = run(capsys, "simulate", plan, "-n", "50")
    msg = " ".join(err.split())
    assert code == 2 and "compiled from ../specs/mine.yaml" in msg and "has moved" in msg and "--workload" in msg


# ------------------------------------------------------------------ the simulate figure


def test_simulate_figure_has_title_slo_lines_and_labelled_points():
    from costmodels.simulator import SloTargets
    from planner.cmd_simulate import latency_figure

    def row(plan: str, rate: float, tok: float, ttft: float, tpot: float) -> dict:
        return {"plan": plan, "rate_rps": rate, "combined_tok_s": tok,
                "ttft_ms": {"p90": ttft}, "tpot_ms": {"p90": tpot}}

    rows = [row("a", 1, 1000, 200, 20), row("a", 2, 2000, 300, 30), row("b", 1, 900, 150, 25)]
    fig = latency_figure(rows, SloTargets(ttft_p90_ms=250.0, tpot_p90_ms=28.0))
    assert "latency vs throughput" in fig._suptitle.get_text()
    for ax, slo in zip(fig.axes, (250.0, 28.0)):
        assert ax.get_title()
        labels = [t.get_text() for t in ax.texts]
        assert sorted(labels) == ["1 req/s", "1 req/s", "2 req/s"]
        assert any(list(line.get_ydata()) == [slo, slo] for line in ax.get_lines())
        assert any(f"SLO {slo:g} ms" == t.get_text() for t in ax.get_legend().get_texts())
        fig.canvas.draw()
        ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert ticks and all(re.fullmatch(r"[\d,.]+", t) for t in ticks), ticks  # plain numbers, no 10^x


def test_a_plan_for_an_inline_gpu_carries_its_figures(tmp_path, capsys):
    spec = tmp_path / "inl.yaml"
    spec.write_text(BASE.replace("gpu: h100", "gpu: {name: mygpu, bf16_tflops: 500, hbm_gb: 48, hbm_tbps: 2.0, "
                                              "link_gbps: 100}"))
    plan = tmp_path / "inl.plan.yaml"
    assert run(capsys, "compile", spec, "-q", "-o", plan)[0] == 0
    p = load_plan(plan)
    assert p.hardware.gpu == "mygpu" and p.hardware.gpu_spec.hbm_gb == 48.0
    assert run(capsys, "simulate", plan, "-n", "50")[0] == 0
    plan.write_text(plan.read_text().replace("hbm_gb: 48.0", "hbm_gb: -48.0"))
    code, _, err = run(capsys, "show", plan)
    assert code == 2 and "hardware.gpu_spec.hbm_gb" in err


def test_mean_below_min_is_refused():
    assert "need min <= mean" in spec_error(BASE.replace("{mean: 64, max: 128}", "{mean: 0.5}"))


def test_options_that_would_be_ignored_are_refused_or_noted(tmp_path, capsys):
    spec = ROOT / "examples" / "llama-3.1-8b-1xh100.yaml"
    code, _, err = run(capsys, "compile", spec, "--check", PLAN, "-o", tmp_path / "p.plan.yaml")
    assert code == 2 and "writes nothing" in err
    code, out, _ = run(capsys, "simulate", PLAN, "--workload", ROOT / "examples" / "qwen2.5-32b-8xh200.yaml", "-n", "30")
    assert code == 0 and "is a spec for qwen2.5-32b; this plan is for llama-3.1-8b" in " ".join(out.split())


def test_a_spec_where_a_plan_belongs_and_the_reverse(capsys):
    spec = ROOT / "examples" / "llama-3.1-8b-1xh100.yaml"
    code, _, err = run(capsys, "show", spec)
    assert code == 2 and "this is a model.yaml spec, not a plan" in err
    code, _, err = run(capsys, "compile", PLAN)
    assert code == 2 and "this is a compiled plan, not a model.yaml spec" in err


def test_plan_errors_name_the_file_line_and_field(tmp_path):
    text = PLAN.read_text()
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.strip().startswith("max_seqs:"))
    bad = tmp_path / "b.plan.yaml"
    bad.write_text(text.replace("max_seqs: 256", "max_seqs: 0"))
    with pytest.raises(UserError) as e:
        load_plan(bad)
    assert f"{bad}:{line}: scheduler.max_seqs: Input should be greater than or equal to 1" in str(e.value)


def test_a_plan_on_stdout_records_its_spec_relative_to_the_current_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "s.yaml"
    spec.write_text(BASE)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "compile", "specs/s.yaml", "-q")
    assert code == 0 and "\n  spec: specs/s.yaml\n" in out
    (tmp_path / "p.plan.yaml").write_text(out)
    assert run(capsys, "simulate", "p.plan.yaml", "-n", "20")[0] == 0


def test_max_context_without_a_workload_is_a_usage_error(capsys):
    """`plan bench --max-context` sets the context of a workload replay; synthetic requests set their
    own (input + output tokens), so giving it there is one clear error, exit 2."""
    code, _, err = run(capsys, "bench", PLAN, "--max-context", "100")
    assert code == 2 and "--max-context replay a workload" in " ".join(err.split())
