"""`plan simulate` end to end, and the simulator on the real cost model (pinned plans).

The op graphs come from the analytic builder (``costmodels.synthetic``) so these tests do not
depend on the tracer's speed; the cost model, plans, workloads and the CLI are the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from costmodels.hardware import get_gpu
from costmodels.model import CostModel
from costmodels.simulator import LogGrid, coster_for, simulate
from planner.pinned import pinned_plan
from costmodels.synthetic import build_graph
from planner.inputs import workload_of
from graph.hf_config import load_config
from graph.opgraph import StepShape
from planner.cli import main
from planner.spec import load_spec, parse_spec
from plans.errors import UserError
from plans.schema import load_plan, save_plan

ROOT = Path(__file__).parents[1]
AZURE = ROOT / "examples" / "traces" / "azure_sample.csv"


def _analytic_graph(cfg):
    return build_graph(cfg)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two pinned plans in a temp folder (no examples/ beside it), with analytic op graphs."""
    mp = pytest.MonkeyPatch()
    mp.setattr("costmodels.build.graph_for_config", _analytic_graph)
    d = tmp_path_factory.mktemp("plans")
    vl_spec = load_spec(ROOT / "examples" / "qwen2-vl-7b-1xh100.yaml")
    vl_cost = CostModel(build_graph(load_config(preset="qwen2-vl-7b")), get_gpu("h100"))
    vl = pinned_plan(vl_spec, vl_cost, tp=1, name="vl7b")
    save_plan(vl, d / "vl7b.plan.yaml")
    txt_spec = load_spec(ROOT / "examples" / "llama-3.1-8b-1xh100.yaml")
    txt_cost = CostModel(build_graph(load_config(preset="llama-3.1-8b")), get_gpu("h100"))
    txt = pinned_plan(txt_spec, txt_cost, tp=1, name="llama-3.1-8b-1xh100")
    save_plan(txt, d / "llama-3.1-8b-1xh100.plan.yaml")
    yield {"dir": d, "vl": d / "vl7b.plan.yaml", "txt": d / "llama-3.1-8b-1xh100.plan.yaml", "vl_spec": vl_spec,
           "vl_cost": vl_cost, "vl_plan": vl}
    mp.undo()


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_has_the_contract_keys(env, capsys):
    code, out, err = _run(capsys, "simulate", env["vl"], "--workload", ROOT / "examples" / "qwen2-vl-7b-1xh100.yaml",
                          "--rate", "2", "--requests", "120", "--json")
    assert code == 0, err
    d = json.loads(out)
    for key in ("ttft_ms", "tpot_ms"):
        assert set(d[key]) == {"p50", "p90", "p99"}
        assert 0 < d[key]["p50"] <= d[key]["p90"] <= d[key]["p99"]
    assert d["output_tok_s"] > 0 and d["combined_tok_s"] > d["output_tok_s"]
    assert 0 <= d["goodput_rps"] <= 2.5
    assert d["shift_tp_fraction"] == 0.0  # sp = 1: never shifted
    assert d["rate_rps"] == 2.0 and d["completed"] == 120


def test_several_plans_and_rates_plot(env, capsys, tmp_path):
    png = tmp_path / "curve.png"
    code, out, err = _run(capsys, "simulate", env["vl"], env["txt"], "--workload", AZURE, "--rates", "1,4",
                          "--requests", "100", "--json", "--plot", png)
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["plan"], r["rate_rps"]) for r in rows] == [("vl7b", 1.0), ("vl7b", 4.0),
                                                          ("llama-3.1-8b-1xh100", 1.0), ("llama-3.1-8b-1xh100", 4.0)]
    assert rows[1]["output_tok_s"] > rows[0]["output_tok_s"]  # more load, more tokens (below saturation)
    assert any("image counts ignored" in n for n in rows[2]["notes"])  # text model on a multimodal trace
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(env, capsys):
    code, out, _ = _run(capsys, "simulate", env["vl"], "--workload", AZURE, "--requests", "60")
    assert code == 0
    assert "TTFT p50/p90/p99 ms" in out and "vl7b" in out


def test_default_workload_is_the_example_named_after_the_plan(env, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, err = _run(capsys, "simulate", env["txt"], "--requests", "80", "--json")
    assert code == 0, err
    assert json.loads(out)["rate_rps"] == load_spec(ROOT / "examples" / "llama-3.1-8b-1xh100.yaml").workload.arrival_rate


def test_missing_workload_is_a_clean_error(env, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "simulate", env["vl"])
    assert code == 2
    assert "no workload given" in err and "--workload" in err and "Traceback" not in err + out


@pytest.mark.parametrize("args,match", [
    (["--rates", "1,x"], "comma-separated"),
    (["--rate", "-1"], "must be > 0"),
    (["--rate", "1", "--rates", "1,2"], "not both"),
    (["--workload", "missing.csv"], "workload file not found"),
    (["--requests", "0"], "--requests"),
])
def test_bad_options_are_clean_errors(env, capsys, args, match):
    code, out, err = _run(capsys, "simulate", env["vl"], "--workload", AZURE, *args) if "--workload" not in args \
        else _run(capsys, "simulate", env["vl"], *args)
    assert code == 2
    assert match in err and "Traceback" not in err


def test_missing_plan_file(capsys, tmp_path):
    code, _, err = _run(capsys, "simulate", tmp_path / "nope.plan.yaml", "--workload", AZURE)
    assert code == 2 and "plan file not found" in err


# ------------------------------------------------------------------ the API on the real cost model


def test_simulate_api_fills_the_plans_predicted_block(env):
    plan, cost, spec = env["vl_plan"], env["vl_cost"], env["vl_spec"]
    wl = workload_of(spec, cost.info).with_requests(150)
    res = simulate(plan, cost, wl, slo=spec.slo.targets(), seed=0)
    pred = res.to_predicted()
    assert pred.source == "simulator"
    assert pred.ttft_ms.p90 == res.ttft_ms["p90"] and pred.goodput_rps == res.goodput_rps
    plan2 = plan.model_copy(update={"predicted": pred})
    assert load_plan_roundtrip(plan2, env["dir"]).predicted.ttft_ms.p90 == pytest.approx(pred.ttft_ms.p90, rel=1e-3)
    # no request is served faster than the prefill of the shortest prompt alone on this GPU
    shortest = min(r.prompt_tokens for r in wl.sample())
    floor = cost.step_time(StepShape.prefill([shortest]), tp=1).total_ms
    assert res.ttft_ms["p50"] >= floor * 0.97  # 0.97: the log grid rounds shapes by <= 2.2%


def load_plan_roundtrip(plan, d):
    p = d / "roundtrip.plan.yaml"
    save_plan(plan, p)
    return load_plan(p)


def test_log_grid_error_is_small(env):
    """Bucketed step times vs the cost model's exact ones on shapes that a run produces."""
    plan, cost = env["vl_plan"], env["vl_cost"]
    bucketed = coster_for(plan, cost, grid=LogGrid(per_octave=16))
    shapes = []
    orig = bucketed.stage_ms

    def spy(shape, mode, decode=None):
        shapes.append((shape, mode, decode))
        return orig(shape, mode, decode)

    bucketed.stage_ms = spy
    wl = workload_of(env["vl_spec"], cost.info).with_requests(200).with_rate(8.0)
    simulate(plan, cost, wl, coster=bucketed)
    exact = coster_for(plan, cost, exact=True)
    errs = [abs(orig(s, m, d)[0] - exact.stage_ms(s, m, d)[0]) / exact.stage_ms(s, m, d)[0] for s, m, d in shapes[::7]]
    assert len(errs) > 50
    assert any(d is not None for _, _, d in shapes)  # mixed prefill + decode steps are among them
    assert max(errs) < 0.05
    assert sum(errs) / len(errs) < 0.01


def test_mixed_step_is_dense_work_plus_each_parts_attention(env):
    """A prefill chunk batched with decodes costs about the sum of its parts, less the shared weight reads."""
    plan, cost = env["vl_plan"], env["vl_cost"]
    c = coster_for(plan, cost, exact=True)
    pre, dec = StepShape.prefill([2000]), StepShape.decode([1500] * 64)
    mixed = c.stage_ms(pre + dec, "sp_tp", dec)[0]
    alone = c.stage_ms(pre, "sp_tp")[0], c.stage_ms(dec, "sp_tp")[0]
    assert max(alone) < mixed < sum(alone)


def test_pinned_plan_arithmetic(env):
    spec = parse_spec((ROOT / "examples" / "qwen2.5-vl-72b-8xh200.yaml").read_text())
    cost = CostModel(build_graph(load_config(preset="qwen2.5-vl-72b")), get_gpu("h200"))
    shift = pinned_plan(spec, cost, tp=2, sp=4, shift=True)
    plain = pinned_plan(spec, cost, tp=2, sp=4)
    assert shift.shift.enabled and shift.shift.threshold_tokens > 0
    assert shift.memory_gb.shift_copy > 0 and plain.memory_gb.shift_copy == 0
    assert plain.memory_gb.kv_tokens > shift.memory_gb.kv_tokens  # the second weight copy costs KV
    pp = pinned_plan(spec, cost, pp=2, tp=4)
    assert [(s.first_layer, s.last_layer) for s in pp.stages] == [(0, 39), (40, 79)]
    assert pp.stages[0].vision and not pp.stages[1].vision
    with pytest.raises(UserError, match="16 GPUs"):
        pinned_plan(spec, cost, dp=2, tp=8)


def test_config_from_a_plan(env):
    from costmodels.simulator import SimConfig

    spec = parse_spec((ROOT / "examples" / "qwen2.5-vl-72b-8xh200.yaml").read_text())
    cost = CostModel(build_graph(load_config(preset="qwen2.5-vl-72b")), get_gpu("h200"))
    plan = pinned_plan(spec, cost, pp=2, sp=2, tp=2, shift=True, placement="all_dp")
    stages = [s.model_copy(update={"shift_threshold_tokens": th}) for s, th in zip(plan.stages, (300, 700))]
    c = SimConfig.from_plan(plan.model_copy(update={"stages": stages}))
    assert (c.dp, c.pp, c.tp, c.sp, c.lanes) == (1, 2, 2, 2, 2)
    assert c.kv_tokens == plan.memory_gb.kv_tokens and c.placement == "all_dp"
    assert c.threshold == plan.shift.threshold_tokens and c.stage_thresholds == (300, 700)
    assert c.stage_modes(500) == ("sp_tp", "tp") and c.stage_modes(100) is None and c.mode(100) == "tp"
    off = SimConfig.from_plan(pinned_plan(spec, cost, pp=2, tp=4))
    assert not off.shift and off.mode(10) == "tp" and off.stage_thresholds == ()  # sp = 1: plain TP
