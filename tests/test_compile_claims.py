"""What compile claims, simulate confirms: a plan's predicted figures and "meets SLO" are what
`plan simulate PLAN` reports at the spec's rate; goodput never exceeds the arrival rate; caps the
workload hits show in `plan show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.cli import main as plan_main
from plans.schema import _round, load_plan

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("example", ["llama-3.1-8b-1xh100", "qwen2-vl-7b-1xh100"])
def test_predicted_is_what_simulate_reports(example, capsys):
    plan_path = ROOT / "plans" / f"{example}.plan.yaml"
    plan = load_plan(plan_path)
    assert plan_main(["simulate", str(plan_path), "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    pr = plan.predicted
    assert pr.source == "simulator"
    # the plan keeps 4 significant digits of the exact figure, simulate's JSON 4 decimals of it: the two
    # roundings may part by one unit of the plan's last digit (8.2994... -> 8.299 in the plan, 8.2995 -> 8.3)
    for key in ("ttft_ms", "tpot_ms"):
        for q in ("p50", "p90", "p99"):
            assert getattr(getattr(pr, key), q) == pytest.approx(_round(sim[key][q]), rel=1.2e-3), (key, q)
    for key in ("output_tok_s", "combined_tok_s", "goodput_rps"):
        assert getattr(pr, key) == pytest.approx(_round(sim[key]), rel=1.2e-3), key
    assert pr.meets_slo == sim["meets_slo"]
    assert sim["goodput_rps"] <= sim["rate_rps"] + 1e-9


def test_goodput_never_exceeds_the_arrival_rate(capsys):
    plan_path = ROOT / "plans" / "llama-3.1-8b-1xh100.plan.yaml"
    # a short Poisson sample arrives faster than its nominal rate; goodput is still capped by it
    assert plan_main(["simulate", str(plan_path), "--rates", "0.5,1,2", "-n", "30", "--seed", "3", "--json",
                      "--ttft-slo", "100000", "--tpot-slo", "100000"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for r in rows:
        assert r["goodput_rps"] <= r["rate_rps"] + 1e-9
    assert any(r["goodput_rps"] == pytest.approx(r["rate_rps"]) for r in rows)  # every request met the SLOs


def test_image_caps_show_in_plan_show(capsys):
    plan_path = ROOT / "plans" / "qwen2.5-vl-72b-8xh200.plan.yaml"
    assert plan_main(["show", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert "images of 1920x1080 are resized to 1316x728" in out and "max_pixels 1,003,520" in out
