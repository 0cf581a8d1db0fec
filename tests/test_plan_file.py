"""The plan file: canonical YAML that is byte-identical across runs, provenance, the mesh and
stages, shift threshold with its curves, memory, predicted metrics and runners-up; the schema
module imports without the planner's heavy parts."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from graph.hf_config import config_sha256, load_config
from planner import __version__
from planner.api import compile_spec, dump_plan, load_plan, save_plan
from planner.spec import load_spec
from plans.schema import parse_plan

ROOT = Path(__file__).parents[1]
SPEC = ROOT / "examples" / "llama-3.1-70b-8xh200.yaml"
VL_SPEC = ROOT / "examples" / "qwen2.5-vl-72b-8xh200.yaml"


@pytest.fixture(scope="module")
def plan():
    return compile_spec(SPEC)


@pytest.fixture(scope="module")
def vl_plan():
    return compile_spec(VL_SPEC)


def test_byte_identical_across_runs(plan):
    again = compile_spec(load_spec(SPEC))
    assert dump_plan(again) == dump_plan(plan)


def test_round_trip_is_canonical(plan, tmp_path):
    p = tmp_path / "x.plan.yaml"
    save_plan(plan, p)
    text = p.read_text()
    assert dump_plan(load_plan(p)) == text
    # stable key order: schema order, not alphabetical
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(("#", " ", "-"))]
    assert keys[:6] == ["schema_version", "name", "provenance", "model", "hardware", "objective"]


def test_provenance(plan):
    pv = plan.provenance
    assert pv.spec_sha256 == hashlib.sha256(SPEC.read_bytes()).hexdigest()
    assert pv.model_config_sha256 == config_sha256(load_config("llama-3.1-70b"))
    assert pv.cost_profile.startswith(("roofline:h200", "h200"))
    assert pv.shiftplan_version == __version__


def test_mesh_stages_memory(plan):
    m = plan.mesh
    assert m.dp * m.pp * m.tp * m.sp == 8 and 64 % (m.tp * m.sp) == 0
    assert plan.stages[0].first_layer == 0 and plan.stages[-1].last_layer == 79
    assert plan.stages[0].embedding and plan.stages[-1].lm_head
    g = plan.memory_gb
    assert 0 < g.total <= g.capacity and g.kv_tokens > 0
    assert g.total == pytest.approx(g.weights + g.shift_copy + g.kv + g.activations, rel=1e-3)
    assert (g.shift_copy > 0) == (m.sp > 1)


def test_shift_threshold_agrees_with_its_curves(plan, vl_plan):
    for p in (plan, vl_plan):
        if p.mesh.sp < 2:
            assert not p.shift.enabled
            continue
        assert p.shift.enabled and p.shift.threshold_tokens is not None and len(p.shift.curves) >= 4
        for c in p.shift.curves:  # TP at or below the threshold, SP x TP above
            assert (c.tokens <= p.shift.threshold_tokens) == (c.tp_ms <= c.sp_tp_ms), c
        assert all(s.shift_threshold_tokens is not None for s in p.stages)


def test_predicted_and_runners_up(plan):
    pr = plan.predicted
    assert pr.source in ("simulator", "estimate")
    assert pr.ttft_ms.p50 <= pr.ttft_ms.p90 <= pr.ttft_ms.p99
    assert pr.combined_tok_s > 0 and pr.meets_slo is not None
    assert plan.runners_up
    labels = {r.mesh for r in plan.runners_up}
    assert plan.mesh.label() not in labels
    for r in plan.runners_up:
        assert any(ch.isdigit() for ch in r.reason), r.reason  # reasons carry figures


def test_vision_plan(vl_plan):
    assert vl_plan.vision.placement in ("stage0_tp", "stage0_dp", "all_dp", "dedicated")
    assert vl_plan.model.vision_blocks > 0
    on = [s.index for s in vl_plan.stages if s.vision]
    if vl_plan.vision.placement in ("stage0_tp", "stage0_dp"):
        assert on == [0]
    if vl_plan.vision.placement == "dedicated":
        assert vl_plan.vision.dedicated_gpus > 0 and on == []
    assert vl_plan.mesh.size + vl_plan.vision.dedicated_gpus == 8


def test_schema_imports_light():
    code = ("import sys, plans.schema; "
            "heavy = [m for m in ('torch', 'transformers', 'pulp', 'networkx', 'planner', 'costmodels', 'graph') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_schema_version_is_a_user_error(plan):
    text = dump_plan(plan).replace("schema_version: 1", "schema_version: 99")
    with pytest.raises(Exception) as e:
        parse_plan(text, "x.plan.yaml")
    assert "schema_version 99 is not supported" in str(e.value)


def _inline(text: str):
    from planner.spec import parse_spec

    return parse_spec(text, source="inline.yaml", base_dir=ROOT / "examples")


def test_search_pins_every_part_of_the_plan():
    plan = compile_spec(_inline(
        "name: pinned\nmodel: {preset: llama-3.1-70b}\nhardware: {gpu: h200, gpus_per_node: 8, nodes: 1}\n"
        "workload: {arrival_rate: 4.0}\n"
        "search: {pp: [2], tp: [2], sp: [2], shift_threshold: 300, stages: [[0, 37], [38, 79]]}\n"))
    assert (plan.mesh.dp, plan.mesh.pp, plan.mesh.tp, plan.mesh.sp) == (1, 2, 2, 2)
    assert [(s.first_layer, s.last_layer) for s in plan.stages] == [(0, 37), (38, 79)]
    assert plan.shift.threshold_tokens == 300 and all(s.shift_threshold_tokens == 300 for s in plan.stages)


def test_min_gpus_uses_the_fewest_gpus_that_carry_the_load():
    plan = compile_spec(_inline(
        "name: few\nmodel: {preset: llama-3.1-8b}\nhardware: {gpu: h100, gpus_per_node: 8, nodes: 1}\n"
        "workload: {arrival_rate: 2.0, input_tokens: {mean: 512, max: 2048}, output_tokens: {mean: 128}}\n"
        "objective: min_gpus\nslo: {ttft_p90_ms: 1000, tpot_p90_ms: 50}\n"))
    assert plan.mesh.size < 8  # 8B at 2 req/s does not need the node
    assert plan.predicted.meets_slo
    assert any("uses" in r.reason and "GPUs vs" in r.reason for r in plan.runners_up)
