"""`plan bench --workload`: a workload replayed in real time on the engine, reported with the
simulator's own metrics, side by side with the simulator's prediction for the same requests."""

from __future__ import annotations

import shutil
from pathlib import Path

from planner.api import compile_spec
from planner.bench_workload import bench_workload, compare, patch_grid
from plans.schema import save_plan
from tests.test_exec_planned import SPEC
from tests.tiny.helpers import CONFIGS


def test_patch_grid_keeps_the_patch_count() -> None:
    for p in (16, 24, 64, 4 * 150, 4 * 7):
        t, h, w = patch_grid(p)
        assert (t, h * w, h % 2, w % 2) == (1, p, 0, 0)


def _tiny_plan(tmp_path: Path) -> Path:
    shutil.copy(CONFIGS["qwen2_vl"], tmp_path / "qwen2_vl.json")
    spec = SPEC.replace("gpus_per_node: 4", "gpus_per_node: 1").replace("tp: [2]", "tp: [1]")
    (tmp_path / "tiny.yaml").write_text(spec.replace("sp: [2]", "sp: [1]").replace("  shift_threshold: 8\n", ""))
    save_plan(compile_spec(tmp_path / "tiny.yaml"), tmp_path / "tiny.plan.yaml")
    return tmp_path / "tiny.plan.yaml"


def test_plan_bench_workload_cli(tmp_path: Path, capsys) -> None:
    """`plan bench --workload --compare-sim` prints the table and JSON with simulate's keys; the replay
    options without --workload are a usage error (exit 2)."""
    import json

    from planner.cli import main

    plan = _tiny_plan(tmp_path)
    out, trace = tmp_path / "b.json", tmp_path / "trace.json"
    assert main(["bench", str(plan), "--workload", str(tmp_path / "tiny.yaml"), "--rate", "5", "--duration", "0.5",
                 "--compare-sim", "--json", str(out), "--trace", str(trace)]) == 0
    text = capsys.readouterr().out
    assert "measured vs predicted" in text and "ttft_ms p90" in text
    got = json.loads(out.read_text())
    for side in ("measured", "predicted"):
        assert {"ttft_ms", "tpot_ms", "e2e_ms", "output_tok_s", "goodput_rps", "shift_tp_fraction",
                "preemptions"} <= set(got[side])
    assert got["measured"]["requests"] == got["predicted"]["requests"] >= 1
    steps = json.loads(trace.read_text())["steps"]  # --trace: the replay's steps, not in --json
    assert steps and "step_trace" not in got and all(s["answered_ms"] >= s["sent_ms"] for s in steps)
    assert main(["bench", str(plan), "--rate", "5"]) == 2
    assert main(["bench", str(plan), "--workload", str(tmp_path / "missing.yaml")]) == 2


def test_workload_replay_reports_like_simulate(tmp_path: Path) -> None:
    from costmodels.simulator.metrics import SloTargets
    from costmodels.workload import Workload  # noqa: F401  (the spec's workload type)
    from planner.inputs import workload_of
    from planner.spec import load_spec
    from costmodels.simulator import cost_model_for_plan

    shutil.copy(CONFIGS["qwen2_vl"], tmp_path / "qwen2_vl.json")
    spec = SPEC.replace("gpus_per_node: 4", "gpus_per_node: 1").replace("tp: [2]", "tp: [1]").replace("sp: [2]", "sp: [1]").replace("  shift_threshold: 8\n", "")
    (tmp_path / "tiny.yaml").write_text(spec)
    plan = compile_spec(tmp_path / "tiny.yaml")
    save_plan(plan, tmp_path / "tiny.plan.yaml")
    wl = workload_of(load_spec(tmp_path / "tiny.yaml"), cost_model_for_plan(plan, tmp_path).info)
    slo = SloTargets(ttft_p90_ms=60_000, tpot_p90_ms=60_000)
    out = bench_workload(tmp_path / "tiny.plan.yaml", wl, rate=6.0, duration=0.8, seed=3, slo=slo, weights=None,
                         device="cpu", backend=None, compare_sim=True)
    m, p = out["measured"], out["predicted"]
    n = out["requests"]
    assert n >= 2 and m.requests == p.requests == n and m.completed == n and m.rejected == 0
    assert m.ttft_ms["p50"] > 0 and m.e2e_ms["p90"] >= m.ttft_ms["p90"] and m.throughput_rps > 0
    assert m.goodput_rps <= m.arrival_rate + 1e-9 and m.meets_slo is True
    assert m.span_s >= (n - 1) / m.arrival_rate  # the replay lasted past the last arrival
    assert abs(m.arrival_rate - p.arrival_rate) < 1e-6  # the very same arrivals
    rows = compare(m, p)
    assert [r["figure"] for r in rows][:2] == ["ttft_ms p50", "ttft_ms p90"] and len(rows) == 10
    assert all(r["error"] != r["error"] or abs(r["predicted"] / r["measured"] - 1 - r["error"]) < 1e-9
               for r in rows if r["measured"])


def test_a_replay_serves_exactly_the_context_its_longest_request_needs(tmp_path: Path) -> None:
    """``replay_context``: the default ``max_context`` of a replay (so the engine's warm-up captures
    no graphs past it) is the longest request as the engine holds it: with it every request of the
    image-text replay completes; one token less and the longest one is refused."""
    from costmodels.simulator import cost_model_for_plan
    from planner.bench_workload import replay_context, sample_requests
    from planner.inputs import workload_of
    from planner.spec import load_spec
    from plans.schema import load_plan

    path = _tiny_plan(tmp_path)
    plan = load_plan(path)
    wl = workload_of(load_spec(tmp_path / "tiny.yaml"), cost_model_for_plan(plan, tmp_path).info)
    _wl, reqs = sample_requests(wl, rate=6.0, duration=0.8, seed=3)
    assert any(r.image_patches for r in reqs)
    ctx = replay_context(plan, tmp_path, reqs)
    full = bench_workload(path, wl, rate=6.0, duration=0.8, seed=3, slo=None, weights=None, device="cpu",
                          backend=None, compare_sim=False, max_context=ctx)["measured"]
    short = bench_workload(path, wl, rate=6.0, duration=0.8, seed=3, slo=None, weights=None, device="cpu",
                           backend=None, compare_sim=False, max_context=ctx - 1)["measured"]
    assert full.completed == full.requests == len(reqs) and short.completed < len(reqs)
