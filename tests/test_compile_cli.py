"""`plan compile` / `plan show` / `--check` from the command line, and the warm compile
importing neither torch nor transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main as plan_main
from plans.schema import load_plan

ROOT = Path(__file__).parents[1]
SPEC = ROOT / "examples" / "llama-3.1-70b-2x8xh100.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plans") / "x.plan.yaml"
    assert plan_main(["compile", str(SPEC), "-q", "-o", str(out)]) == 0
    return out


def test_compile_writes_a_valid_plan_and_a_summary(tmp_path, capsys):
    out = tmp_path / "p.plan.yaml"
    assert plan_main(["compile", str(SPEC), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    plan = load_plan(out)
    assert plan.name == "llama-3.1-70b-2x8xh100" and plan.mesh.size == 16
    assert plan.mesh.tp * plan.mesh.sp <= 8  # tensor parallelism stays inside a node
    assert "searched" in err and "ILPs" in err and plan.mesh.label() in err and f"wrote {out}" in err


def test_compile_to_stdout(capsys):
    assert plan_main(["compile", str(SPEC), "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# shiftplan plan, schema v1") and "mesh:" in out


def test_check_up_to_date_and_stale(compiled, tmp_path, capsys):
    assert plan_main(["compile", str(SPEC), "-q", "--check", str(compiled)]) == 0
    assert "is up to date" in capsys.readouterr().out
    stale = tmp_path / "stale.plan.yaml"
    text = compiled.read_text()
    assert "kv_tokens: " in text
    stale.write_text(text.replace("max_seqs: 256", "max_seqs: 128"))
    assert plan_main(["compile", str(SPEC), "-q", "--check", str(stale)]) == 1
    out = capsys.readouterr().out
    assert "is stale" in out and "scheduler.max_seqs 128 -> 256" in out


def test_show(compiled, capsys):
    assert plan_main(["show", str(compiled)]) == 0
    out = capsys.readouterr().out
    plan = load_plan(compiled)
    assert f"mesh       {plan.mesh.label()}" in out
    assert "stages\n  0: layers 0-" in out and "memory     per GPU" in out and "predicted  (" in out
    if plan.shift.enabled:
        assert f"steps of <= {plan.shift.threshold_tokens} tokens run TP{plan.mesh.tp * plan.mesh.sp}" in out


def test_user_errors_exit_2(tmp_path, capsys):
    assert plan_main(["compile", str(tmp_path / "none.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {preset: llama-3.1-8b}\nhardware: {gpu: h100}\nworkload: {arrival_rate: -1}\n")
    assert plan_main(["compile", str(bad)]) == 2
    assert plan_main(["show", str(tmp_path / "none.plan.yaml")]) == 2
    err = capsys.readouterr().err
    assert "spec file not found" in err and "workload.arrival_rate" in err and "plan file not found" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("spec", [SPEC, ROOT / "examples" / "llama-3.1-70b-8xh200.yaml"], ids=["h100", "h200"])
def test_warm_compile_imports_no_torch(spec, tmp_path):
    """With the graph cache warm a fresh process compiles without torch, also for an H200, whose
    profile prices this engine (graph buckets, the decode kernel's key ranges: ``plans.engine_shapes``)."""
    assert plan_main(["compile", str(spec), "-q", "-o", str(tmp_path / "warm.plan.yaml")]) == 0
    code = ("import sys; from planner.cli import main; "
            f"rc = main(['compile', {str(spec)!r}, '-q', '-o', {str(tmp_path / 'w.plan.yaml')!r}]); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.stdout.split() == ["0", "False", "False"], out.stderr[-2000:]


def test_lp_file_has_labelled_constraints(tmp_path):
    lp = tmp_path / "chosen.lp"
    assert plan_main(["compile", str(SPEC), "-q", "-o", str(tmp_path / "p.plan.yaml"), "--lp", str(lp)]) == 0
    text = lp.read_text()
    assert "Minimize" in text and "bottleneck_stage0:" in text and "mem_stage0:" in text
    assert "slo_ttft:" in text  # the example sets a TTFT SLO
