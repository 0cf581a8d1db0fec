"""Infeasible specs: a clean error naming the binding constraint with its arithmetic, exit 2,
never a traceback or a solver dump."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from planner.api import compile_spec
from planner.cli import main as plan_main
from planner.infeasible import InfeasibleSpec
from planner.spec import parse_spec

CASES = {
    "world": ("model: {preset: llama-3.1-405b, weights_dtype: bf16}\n"
              "hardware: {gpu: h100, gpus_per_node: 8, nodes: 1}\n",
              r"weights need 8\d\d GB in bf16; 8 x 80 GB = 640 GB; try weights_dtype fp8 \(checked: compiles to \w+\) "
              r"or 16 GPUs \(2 nodes x 8\) \(checked: compiles to \w+\)"),
    "per_gpu": ("model: {preset: llama-3.1-70b}\nhardware: {gpu: h100, gpus_per_node: 2, nodes: 1}\n",
                r"every mesh runs out of memory; the closest, tp2: weights 70\.\d .* = 7\d\.\d GB per GPU > 72\.0 GB; "
                r"try weights_dtype fp8 \(checked: compiles to \w+\)"),
    "slo": ("model: {preset: llama-3.1-8b}\nhardware: {gpu: h100, gpus_per_node: 1, nodes: 1}\n"
            "slo: {ttft_p90_ms: 1}\n",
            r"misses slo_ttft: unloaded TTFT \d+ ms > SLO 1 ms .*; try slo\.ttft_p90_ms \d+ \(checked: compiles"),
    "search": ("model: {preset: llama-3.1-70b}\nhardware: {gpu: h200, gpus_per_node: 8, nodes: 1}\n"
               "search: {tp: [3]}\n",
               r"search\.tp = \[3\], but tp must divide the 8 GPUs"),
    "control": ("model: {preset: llama-3.1-8b}\nhardware: {gpu: h100, gpus_per_node: 8, nodes: 1}\n"
              "search: {dp: [1], pp: [1], sp: [1]}\n",
              None),  # tp8 is feasible here: a control case
}


def _spec_text(name: str, body: str) -> str:
    return f"name: {name}\n{body}workload: {{arrival_rate: 1.0}}\n"


@pytest.mark.parametrize("case", [k for k, v in CASES.items() if v[1] is not None])
def test_message_names_the_binding_constraint(case: str):
    body, pattern = CASES[case]
    spec = parse_spec(_spec_text(case, body), source=f"{case}.yaml")
    with pytest.raises(InfeasibleSpec) as e:
        compile_spec(spec)
    msg = str(e.value)
    assert re.search(pattern, msg), msg
    assert msg.startswith(f"{case}: no feasible plan: ")
    assert "Traceback" not in msg and "Infeasible" not in msg and "CBC" not in msg


def test_control_case_compiles():
    spec = parse_spec(_spec_text("ok", CASES["control"][0]), source="ok.yaml")
    plan = compile_spec(spec)
    assert plan.mesh.tp == 8 and plan.mesh.size == 8


def test_cli_exit_code_2_and_one_clean_line(tmp_path: Path, capsys):
    f = tmp_path / "world.yaml"
    f.write_text(_spec_text("world", CASES["world"][0]))
    assert plan_main(["compile", str(f), "-q", "-o", str(tmp_path / "x.plan.yaml")]) == 2
    cap = capsys.readouterr()
    assert "weights need" in cap.err and "640 GB" in cap.err
    assert "Traceback" not in cap.err + cap.out
    assert not (tmp_path / "x.plan.yaml").exists()


def test_broken_solver_is_a_user_error(monkeypatch):
    import pulp

    import planner.ilp as ilp
    from plans.errors import UserError

    monkeypatch.setattr(ilp, "_solver", lambda name: (pulp.COIN_CMD(path="no-such-cbc-binary", msg=False), "cbc"))
    p = ilp.StageProblem(layers=(ilp.ItemCost(thr=1.0),) * 4, stages=2)
    with pytest.raises(UserError) as e:
        ilp.solve(p)
    assert "cbc MILP solver could not run" in str(e.value)


def test_a_hint_is_printed_only_when_it_compiles():
    """Every suggested fix was compiled first: the fixed spec gives the mesh the message names."""
    body, _ = CASES["world"]
    spec = parse_spec(_spec_text("world", body), source="world.yaml")
    with pytest.raises(InfeasibleSpec) as e:
        compile_spec(spec)
    m = re.search(r"try weights_dtype fp8 \(checked: compiles to (\w+)\)", str(e.value))
    assert m
    fixed = parse_spec(_spec_text("world", body.replace("bf16", "fp8")), source="world.yaml")
    assert compile_spec(fixed).mesh.label() == m.group(1)


def test_no_fix_works_says_what_was_tried():
    from planner.infeasible import Fix, verified
    from plans.errors import UserError

    def never(_spec):
        raise UserError("still infeasible")

    err = verified(InfeasibleSpec("x: no feasible plan: reason", [Fix("weights_dtype fp8", lambda s: s),
                                                                   Fix("16 GPUs", lambda s: s)]), None, never)
    assert str(err) == ("x: no feasible plan: reason; no single change among these makes it feasible: "
                        "weights_dtype fp8, 16 GPUs")
    assert "try" not in str(err)


def test_fixes_change_the_spec_as_they_say():
    from planner.infeasible import _more_gpus, _shorter, _smaller_dtype

    spec = parse_spec(_spec_text("f", "model: {preset: llama-3.1-8b}\nhardware: {gpu: h100, gpus_per_node: 2}\n")
                      .replace("{arrival_rate: 1.0}", "{arrival_rate: 1.0, input_tokens: {mean: 900, max: 4096}, "
                                                      "output_tokens: {mean: 100, max: 512}}"), source="f.yaml")
    (fix,) = _more_gpus(spec)
    assert fix.text == "4 GPUs (gpus_per_node 4)" and fix.apply(spec).hardware.gpus_per_node == 4
    (fix,) = _more_gpus(spec, at_least=20)
    assert fix.text == "24 GPUs (3 nodes x 8)"
    s = fix.apply(spec)
    assert (s.hardware.gpus_per_node, s.hardware.nodes) == (8, 3)
    (fix,) = _shorter(spec)
    s = fix.apply(spec)
    assert fix.text == "input_tokens max 2048, output_tokens max 256"
    assert (s.workload.input_tokens.max, s.workload.input_tokens.mean, s.workload.output_tokens.max) == (2048, 900, 256)
    (fix,) = _smaller_dtype(spec)
    assert fix.text == "weights_dtype fp8" and fix.apply(spec).model.weights_dtype == "fp8"
