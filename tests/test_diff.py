"""`plan diff`: semantic, readable changes; markdown mode; exit 0 when equal, 1 when not."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.cli import main as plan_main
from planner.diff import diff_plans, render
from plans.build import assemble_plan
from plans.mesh import ParallelDims
from plans.schema import (Hardware, MemoryPerGPU, Mesh, ModelRef, Percentiles, Plan, Predicted, Provenance, RunnerUp,
                          Scheduler, Shift, save_plan)


def _plan(split: int = 40, threshold: int = 256, ttft_p90: float = 412.0) -> Plan:
    return assemble_plan(
        name="t", objective="max_throughput",
        provenance=Provenance(spec_sha256="a" * 64, model_config_sha256="b" * 64, cost_profile="roofline:h200",
                              shiftplan_version="0.1.0"),
        model=ModelRef(name="llama-3.1-70b", preset="llama-3.1-70b", architecture="LlamaForCausalLM", num_layers=80),
        hardware=Hardware(gpu="h200", gpus_per_node=8, nodes=1),
        dims=ParallelDims(pp=2, tp=2, sp=2, shift=True, threshold=threshold),
        layers=[(0, split - 1), (split, 79)], step_ms=[100.0, 100.0], curves=[(256, 10.0, 9.0)],
        memory=MemoryPerGPU(weights=35.3, kv=80.0, activations=2.0, total=117.3, capacity=141.0,
                            kv_tokens=500000),
        scheduler=Scheduler(),
        predicted=Predicted(source="simulator", ttft_ms=Percentiles(p50=200.0, p90=ttft_p90, p99=600.0),
                            tpot_ms=Percentiles(p50=20.0, p90=25.0, p99=30.0), goodput_rps=7.5, meets_slo=True),
        runners_up=[RunnerUp(mesh="tp8", reason="goodput 7.0 vs 7.5 req/s")],
    )


def test_equal_plans_have_no_changes():
    assert diff_plans(_plan(), _plan()) == []
    assert render([], "text") == "plans are equal\n"


def test_the_review_sentence():
    changes = diff_plans(_plan(), _plan(split=38, threshold=384, ttft_p90=388.0))
    text = render(changes, "text")
    assert "stage 0: layers 0-39 (+embedding) -> 0-37 (+embedding)" in text
    assert "stage 1: layers 40-79 (+lm_head) -> 38-79 (+lm_head)" in text
    assert "shift threshold 256 -> 384 tokens" in text
    assert "predicted TTFT p90 412 -> 388 ms" in text
    assert "TTFT p50" not in text  # unchanged fields are not listed


def test_markdown_table():
    md = render(diff_plans(_plan(), _plan(threshold=384)), "markdown", "old.yaml", "new.yaml")
    assert md.startswith("**Plan changes** `old.yaml` -> `new.yaml`")
    assert "| what | old | new |" in md and "| shift threshold | 256 tokens | 384 tokens |" in md


def test_mesh_vision_memory_and_provenance_changes():
    a = _plan()
    b = _plan().model_copy(deep=True)
    b.mesh = Mesh(pp=2, tp=4, sp=1)
    b.shift = Shift(enabled=False)
    b.vision.placement = "all_dp"
    b.memory_gb.kv_tokens = 400000
    b.provenance.cost_profile = "h200-2026-11-23"
    text = render(diff_plans(a, b))
    assert "mesh pp2xtp2xsp2 -> pp2xtp4" in text
    assert "vision placement none -> all_dp" in text
    assert "KV capacity 500000 -> 400000 tokens" in text
    assert "cost profile roofline:h200 -> h200-2026-11-23" in text
    assert "shift yes -> no" in text


def test_unknown_fields_still_reported():
    b = _plan().model_copy(deep=True)
    b.scheduler.max_seqs = 128
    b.backend = "compile"
    text = render(diff_plans(_plan(), b))
    assert "scheduler.max_seqs 256 -> 128" in text and "backend eager -> compile" in text


def test_rounding_noise_is_not_a_change():
    b = _plan(ttft_p90=412.00001)  # the file rounds to 4 significant digits
    assert diff_plans(_plan(), b) == []


@pytest.fixture
def two_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    a, b, c = tmp_path / "a.plan.yaml", tmp_path / "b.plan.yaml", tmp_path / "c.plan.yaml"
    save_plan(_plan(), a)
    save_plan(_plan(split=38), b)
    save_plan(_plan(), c)
    return a, b, c


def test_cli_exit_codes(two_files, capsys):
    a, b, c = two_files
    assert plan_main(["diff", str(a), str(c)]) == 0
    assert "plans are equal" in capsys.readouterr().out
    assert plan_main(["diff", str(a), str(b)]) == 1
    assert "stage 1: layers 40-79 (+lm_head) -> 38-79" in capsys.readouterr().out
    assert plan_main(["diff", str(a), str(b), "--format", "markdown"]) == 1
    assert "| stage 1 |" in capsys.readouterr().out


def test_cli_errors_are_clean(two_files, tmp_path, capsys):
    a, _, _ = two_files
    assert plan_main(["diff", str(a), str(tmp_path / "missing.yaml")]) == 2
    assert "plan file not found" in capsys.readouterr().err
    assert plan_main(["diff", str(a), str(a), "--format", "html"]) == 2
    bad = tmp_path / "bad.plan.yaml"
    bad.write_text(a.read_text().replace("last_layer: 79", "last_layer: 70"))
    assert plan_main(["diff", str(a), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "stages cover 71 layers, the model has 80" in err and "Traceback" not in err


def test_python_api_diff(tmp_path):
    from planner.api import diff_plans as api_diff, load_plan, render_diff, save_plan as api_save

    api_save(_plan(threshold=384), tmp_path / "n.plan.yaml")
    new = load_plan(tmp_path / "n.plan.yaml")
    assert [c.text() for c in api_diff(_plan(), new)] == ["shift threshold 256 -> 384 tokens"]
    assert render_diff(_plan(), new, "markdown").count("| shift threshold |") == 1
