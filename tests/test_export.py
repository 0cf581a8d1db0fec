"""plan export: golden exports of every committed plan for every engine, every emitted flag in the
pinned flag table, refusals and downgrades naming the engine's limit, and the spec's `engine`
restricting the search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from planner.candidates import ModelFacts, SearchSpace, enumerate_candidates
from planner.api import compile_spec
from planner.cli import main as plan_main
from planner.export import ENGINES, INFO, export_plan, render
from planner.export.engines import mesh_limit
from planner.export.flags import CHOICES, ENV, FLAGS
from planner.spec import load_spec
from plans.mesh import ParallelDims
from plans.schema import Mesh, Plan, Scheduler, Shift, Stage, Vision, dump_plan, load_plan

ROOT = Path(__file__).parents[1]
PLANS = sorted((ROOT / "plans").glob("*.plan.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
EXPORTS = ROOT / "plans" / "exports"


def _stem(p: Path) -> str:
    return p.name[: -len(".plan.yaml")]


def _plan(name: str) -> Plan:
    return load_plan(ROOT / "plans" / f"{name}.plan.yaml")


def _with(plan: Plan, **update) -> Plan:
    """``plan`` updated; its stages' vision flags follow the placement, as ``Plan.check`` requires."""
    p = plan.model_copy(update=update)
    encoding = ParallelDims(pp=p.mesh.pp, placement=p.vision.placement, dedicated_gpus=p.vision.dedicated_gpus,
                            vision=p.model.vision_blocks > 0).encoder_stages()
    return p.model_copy(update={"stages": [st.model_copy(update={"vision": i in encoding})
                                           for i, st in enumerate(p.stages)]}).check()


def _stages(layers: int, pp: int) -> list[Stage]:
    n = layers // pp
    return [Stage(index=i, first_layer=i * n, last_layer=layers - 1 if i == pp - 1 else (i + 1) * n - 1,
                  embedding=i == 0, lm_head=i == pp - 1) for i in range(pp)]


def _vl_shift() -> Plan:
    """The Qwen2.5-VL-72B plan as tp2 x sp4 with shift at 518 tokens, encoder stage0_dp (the committed
    plan's mesh before the engine's host terms moved it to dp4xtp2)."""
    vl = _plan("qwen2.5-vl-72b-8xh200")
    return _with(vl, mesh=Mesh(tp=2, sp=4), shift=Shift(enabled=True, threshold_tokens=518),
                 stages=[st.model_copy(update={"shift_threshold_tokens": 518}) for st in _stages(80, 1)],
                 vision=Vision(placement="stage0_dp"))


def _argv(x) -> list[list[str]]:
    return [la.argv for la in x.launches]


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# ------------------------------------------------------------------ golden exports


def _refresh(stem: str, engine: str) -> str:
    return (f"plan compile examples/{stem}.yaml --engine {engine} -q -o {stem}.{engine}.plan.yaml && plan export "
            f"{stem}.{engine}.plan.yaml --explain -o plans/exports/{stem}.{engine}.sh && rm {stem}.{engine}.plan.yaml")


REFRESH_ALL = ("for x in examples/*.yaml; do s=$(basename $x .yaml); for e in vllm arctic sglang; do "
               + _refresh("$s", "$e").replace("examples/$s.yaml", "$x") + "; done; done")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_committed_export_is_fresh(example: Path, engine: str):
    """plans/exports/X.E.sh is the launch of example X compiled for engine E: the search kept only what E runs,
    so it exports with no downgrade, every flag in the pinned table."""
    plan = compile_spec(load_spec(example).model_copy(update={"engine": engine}))
    assert plan.engine == engine
    x = export_plan(plan, engine, downgrade=False)
    for la in x.launches:
        assert {w for w in la.argv if w.startswith("--")} <= set(FLAGS[engine])
    golden = EXPORTS / f"{example.stem}.{engine}.sh"
    how = f"`{_refresh(example.stem, engine)}` (every export: `{REFRESH_ALL}`)"
    assert golden.is_file(), f"missing plans/exports/{golden.name}; run {how}"
    assert golden.read_text() == render(x, "cmd", explain=True), f"plans/exports/{golden.name} is stale; run {how}"


def test_no_export_without_its_example():
    expected = {f"{e.stem}.{engine}.sh" for e in EXAMPLES for engine in ENGINES}
    assert {f.name for f in EXPORTS.iterdir()} == expected


# ------------------------------------------------------------------ flags checked against the pinned table


def _synthetic_plans() -> list[Plan]:
    vl = _plan("qwen2.5-vl-72b-8xh200")
    l70x2 = _plan("llama-3.1-70b-2x8xh100")
    return [
        # dedicated encoder GPUs beside a tp4 replica
        _with(vl, mesh=Mesh(tp=4), shift=Shift(), vision=Vision(placement="dedicated", dedicated_gpus=2)),
        # DP replicas inside nodes, across two nodes
        _with(l70x2, mesh=Mesh(dp=4, tp=4), shift=Shift(), stages=_stages(80, 1)),
        # encoder on every stage (all_dp) over pp2
        _with(vl, mesh=Mesh(pp=2, tp=4), shift=Shift(), stages=_stages(80, 2), vision=Vision(placement="all_dp")),
    ]


def test_every_emitted_flag_is_in_the_pinned_table():
    plans = [load_plan(p) for p in PLANS] + _synthetic_plans()
    seen: dict[str, set[str]] = {e: set() for e in ENGINES}
    for plan in plans:
        for engine in ENGINES:
            x = export_plan(plan, engine)
            for la in x.launches:
                flags = {w for w in la.argv if w.startswith("--")}
                assert flags <= set(FLAGS[engine]), (engine, plan.name, flags - set(FLAGS[engine]))
                assert set(la.env) <= set(ENV[engine]), (engine, plan.name, set(la.env) - set(ENV[engine]))
                for flag, allowed in CHOICES[engine].items():
                    if flag in la.argv:
                        assert _flag(la.argv, flag) in allowed, (engine, plan.name, flag, _flag(la.argv, flag))
                seen[engine] |= flags
    # the table is not padded: every engine's exports use most of its flags
    for engine in ENGINES:
        assert len(seen[engine]) >= len(FLAGS[engine]) - 4, (engine, set(FLAGS[engine]) - seen[engine])


PARSED = ROOT / "bench" / "results" / "export_flags.json"
REPARSE = ("re-run `python bench/export_flags.py --out bench/results` with vLLM 0.18.0, arctic-inference 0.2.0 and "
           "SGLang installed (README: Deploy on vLLM, Arctic Inference or SGLang)")


def test_every_committed_export_flag_was_parsed_by_its_engine():
    """bench/results/export_flags.json holds the engines' own parsers' verdict on every flag of every committed
    plans/exports script (read by the same function), so an export that gains a flag fails here until the check
    is re-run; and on every flag and choice of the pinned table."""
    from bench.export_flags import flags_of, launch_commands, value_of

    r = json.loads(PARSED.read_text())
    assert r["versions"]["vllm"] == "0.18.0" and r["versions"]["arctic-inference"] == "0.2.0", REPARSE
    assert r["versions"]["sglang"] and not r["failed"], (r["failed"], REPARSE)
    scripts = sorted(EXPORTS.glob("*.sh"))
    assert set(r["scripts"]) == {p.name for p in scripts}, REPARSE
    for p in scripts:
        checked, engine = r["scripts"][p.name]["commands"], p.name.split(".")[-2]
        cmds = launch_commands(p.read_text())
        assert len(cmds) == len(checked) >= 1, (p.name, REPARSE)
        for cmd, done in zip(cmds, checked):
            assert (cmd["program"], cmd["env"]) == (done["program"], done["env"]), (p.name, REPARSE)
            assert done["parse"]["ok"], (p.name, done["parse"]["error"])
            if engine != "sglang":  # Arctic's flags parsed by the plugin, vLLM's without it
                assert done["arctic_plugin_loaded"] == (engine == "arctic") and done["engine_args"]["ok"], p.name
            parsed = {f for f, d in done["flags"].items() if d["ok"]}
            assert set(flags_of(cmd["args"])) <= parsed, (p.name, set(flags_of(cmd["args"])) - parsed, REPARSE)
    for engine in ENGINES:
        table = r["table"][engine]
        assert set(FLAGS[engine]) <= {f for f, d in table[0]["flags"].items() if d["ok"]}, (engine, REPARSE)
        pairs = {(f, value_of(c["args"], f)) for c in table for f, d in c["flags"].items() if d["ok"]}
        assert {(f, v) for f, vs in CHOICES[engine].items() for v in vs} <= pairs, (engine, REPARSE)


def test_launch_commands_reads_env_program_and_continuations():
    from bench.export_flags import launch_commands

    text = ("#!/usr/bin/env bash\n# node 0: --not-a-flag\nA=1 B='x y' vllm serve M \\\n    --tp 2 \\\n"
            "    --addr ${HEAD_ADDR}\n\npython -m sglang.launch_server --model-path M --encoder-urls u1 u2\n")
    assert launch_commands(text) == [
        {"env": {"A": "1", "B": "x y"}, "program": ["vllm", "serve"],
         "args": ["M", "--tp", "2", "--addr", "${HEAD_ADDR}"]},
        {"env": {}, "program": ["python", "-m", "sglang.launch_server"],
         "args": ["--model-path", "M", "--encoder-urls", "u1", "u2"]}]
    with pytest.raises(ValueError, match="not a launch command"):
        launch_commands("echo hi\n")


def test_export_prints_the_version_it_targets():
    plan = _plan("qwen2.5-32b-8xh200")
    for engine in ENGINES:
        x = export_plan(plan, engine)
        for fmt in ("cmd", "yaml", "json"):
            assert INFO[engine].version in render(x, fmt)
    assert "v0.18.0" in INFO["vllm"].version and "v0.2.0" in INFO["arctic"].version


# ------------------------------------------------------------------ mapping


def test_arctic_runs_the_plans_sp_and_threshold():
    plan = _plan("qwen2.5-32b-8xh200")
    assert plan.mesh.sp > 1 and plan.shift.enabled
    x = export_plan(plan, "arctic", downgrade=False)
    (argv,) = _argv(x)
    assert _flag(argv, "--ulysses-sequence-parallel-size") == str(plan.mesh.sp)
    assert _flag(argv, "--tensor-parallel-size") == str(plan.mesh.tp)
    assert "--enable-shift-parallel" in argv
    assert _flag(argv, "--shift-parallel-threshold") == str(plan.shift.threshold_tokens)
    assert _flag(argv, "--max-num-seqs") == str(plan.scheduler.max_seqs)
    assert x.launches[0].env["ARCTIC_INFERENCE_ENABLED"] == "1"


def test_vllm_folds_sp_into_tp_and_names_the_limit():
    x = export_plan(_vl_shift(), "vllm")
    (argv,) = _argv(x)
    assert _flag(argv, "--tensor-parallel-size") == "8" and "--ulysses-sequence-parallel-size" not in argv
    assert _flag(argv, "--mm-encoder-tp-mode") == "data"
    assert len(x.downgrades) == 1 and "no Ulysses sequence parallelism" in x.downgrades[0]
    assert "tp2xsp4 runs as tp8" in x.downgrades[0]


def test_fp8_weights_and_kv():
    plan = _plan("llama-3.1-405b-fp8-8xh200")
    v = _argv(export_plan(plan, "vllm"))[0]
    s = _argv(export_plan(plan, "sglang"))[0]
    assert _flag(v, "--quantization") == "fp8" and _flag(v, "--kv-cache-dtype") == "fp8"
    assert _flag(s, "--quantization") == "fp8" and _flag(s, "--kv-cache-dtype") == "fp8_e4m3"
    dp = str(plan.mesh.dp) if plan.mesh.dp > 1 else None  # one replica: no flag
    assert _flag(v, "--data-parallel-size") == dp and _flag(s, "--dp-size") == dp
    assert _flag(v, "--tensor-parallel-size") == str(plan.mesh.tp) and _flag(s, "--tp-size") == str(plan.mesh.tp)


def test_one_launch_per_node_for_a_replica_spanning_nodes():
    plan = _plan("llama-3.1-70b-2x8xh100")  # pp2 over two 8-GPU nodes
    for engine in ENGINES:
        x = export_plan(plan, engine)
        assert [la.node for la in x.launches] == [0, 1]
        part = {"vllm": "VLLM_PP_LAYER_PARTITION", "arctic": "VLLM_PP_LAYER_PARTITION",
                "sglang": "SGLANG_PP_LAYER_PARTITION"}[engine]
        assert x.launches[0].env[part] == "40,40"
        a0, a1 = _argv(x)
        if engine == "sglang":
            assert (_flag(a0, "--node-rank"), _flag(a1, "--node-rank")) == ("0", "1")
            assert _flag(a1, "--dist-init-addr") == "${HEAD_ADDR}:50000"
        else:
            assert (_flag(a0, "--node-rank"), _flag(a1, "--node-rank")) == ("0", "1")
            assert "--headless" in a1 and "--headless" not in a0
    text = render(export_plan(plan, "vllm"), "cmd")
    assert text.count("vllm serve") == 2 and "# node 1:" in text


def test_dp_over_nodes_and_dedicated_encoders():
    dedicated, dp_nodes, _ = _synthetic_plans()
    x = export_plan(dp_nodes, "vllm")
    a0, a1 = _argv(x)
    assert _flag(a0, "--data-parallel-size") == "4" and _flag(a0, "--data-parallel-size-local") == "2"
    assert "--headless" in a1 and _flag(a1, "--data-parallel-start-rank") == "2"
    v = export_plan(dedicated, "vllm")
    roles = [(la.role, la.gpus) for la in v.launches]
    assert roles == [("llm", [0, 1, 2, 3]), ("encoder", [4]), ("encoder", [5])]
    assert "--mm-encoder-only" in v.launches[1].argv and v.launches[1].env["CUDA_VISIBLE_DEVICES"] == "4"
    assert json.loads(_flag(v.launches[0].argv, "--ec-transfer-config"))["ec_role"] == "ec_consumer"
    s = export_plan(dedicated, "sglang")
    llm = s.launches[0].argv
    assert "--language-only" in llm and "http://127.0.0.1:30101" in llm
    assert all("--encoder-only" in la.argv for la in s.launches[1:])


def test_yaml_and_json_formats_carry_the_launches():
    x = export_plan(_plan("llama-3.1-70b-2x8xh100"), "arctic")
    for data in (yaml.safe_load(render(x, "yaml", explain=True)), json.loads(render(x, "json"))):
        assert data["engine"] == "arctic" and len(data["launches"]) == 2
        assert data["launches"][1]["command"][:2] == ["vllm", "serve"]
        assert data["downgrades"] and "without pipeline stages" in data["downgrades"][0]
    explained = yaml.safe_load(render(x, "yaml", explain=True))["decisions"]
    assert any(d["kind"] == "map" and "--pipeline-parallel-size 2" in d["text"] for d in explained)


def test_python_api_exports():
    from planner.api import export_launch

    text = export_launch(_plan("qwen2.5-32b-8xh200"), "arctic", "json", model="/models/q32")
    data = json.loads(text)
    assert data["launches"][0]["command"][:3] == ["vllm", "serve", "/models/q32"]
    with pytest.raises(Exception, match="cannot run plan"):
        export_launch(_plan("qwen2.5-32b-8xh200"), "sglang", downgrade=False)


# ------------------------------------------------------------------ refusals and downgrades


def test_arctic_limits_name_their_reason():
    assert "M-RoPE" in export_plan(_vl_shift(), "arctic").downgrades[0]
    assert "without pipeline stages" in export_plan(_plan("llama-3.1-70b-2x8xh100"), "arctic").downgrades[0]
    odd = _with(_plan("qwen2.5-32b-8xh200"), scheduler=Scheduler(max_seqs=255))  # dp2 x sp4
    x = export_plan(odd, "arctic")
    assert x.target.sp == 4 and x.target.max_seqs == 252
    assert "keep --max-num-seqs divisible by the SP degree: 255 % 4 = 3" in x.downgrades[0]
    _, _, all_dp = _synthetic_plans()
    assert "first pipeline stage only" in export_plan(all_dp, "sglang").downgrades[0]
    assert export_plan(all_dp, "vllm").target.placement == "stage0_dp"


def test_cli_refusals_exit_2(tmp_path, capsys):
    plan = str(ROOT / "plans" / "qwen2.5-32b-8xh200.plan.yaml")
    assert plan_main(["export", plan, "--engine", "vllm", "--no-downgrade"]) == 2
    err = capsys.readouterr().err
    assert "cannot run plan qwen2.5-32b-8xh200 as planned" in err and "no Ulysses sequence parallelism" in err
    assert plan_main(["export", plan, "--engine", "trtllm"]) == 2
    assert "unknown engine 'trtllm'" in capsys.readouterr().err
    assert plan_main(["export", plan]) == 2
    assert "give --engine" in capsys.readouterr().err
    assert plan_main(["export", plan, "--engine", "arctic", "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err  # output paths are checked as every command checks them
    assert plan_main(["export", plan, "--engine", "arctic", "-o", str(tmp_path / "no" / "x.sh")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert plan_main(["export", plan, "--engine", "arctic", "--format", "toml"]) == 2
    assert plan_main(["export", str(tmp_path / "none.plan.yaml"), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--format must be" in err and "plan file not found" in err and "Traceback" not in err
    out = tmp_path / "arctic.sh"
    assert plan_main(["export", plan, "--engine", "arctic", "--no-downgrade", "-o", str(out)]) == 0
    assert "--ulysses-sequence-parallel-size 4" in out.read_text()


# ------------------------------------------------------------------ the spec's engine restricts the search


LLAMA70 = ModelFacts(layers=80, heads=64, kv_heads=8, layer_weights_gb=1.712, embed_gb=1.05, head_gb=1.05,
                     kv_gb_per_token_head=2 * 128 * 2 / 1e9)


def test_engine_check_keeps_only_meshes_the_engine_runs():
    base = dict(gpus=8, gpus_per_node=8, capacity_gb=140.0, activations_gb=4.0, min_kv_tokens=16384)
    free = enumerate_candidates(LLAMA70, SearchSpace(**base))
    assert any(c.sp > 1 for c in free.candidates)
    for engine, arch in (("vllm", "LlamaForCausalLM"), ("sglang", "LlamaForCausalLM"),
                         ("arctic", "Qwen2_5_VLForConditionalGeneration")):
        cs = enumerate_candidates(LLAMA70, SearchSpace(
            **base, engine_check=lambda dp, pp, tp, sp, e=engine, a=arch: mesh_limit(e, pp, tp, sp, a, 256)))
        assert cs.candidates and all(c.sp == 1 for c in cs.candidates)
        assert any(INFO[engine].title in r.reason for r in cs.rejected)
    arctic = enumerate_candidates(LLAMA70, SearchSpace(
        **base, engine_check=lambda dp, pp, tp, sp: mesh_limit("arctic", pp, tp, sp, "LlamaForCausalLM", 256)))
    assert any(c.sp > 1 for c in arctic.candidates) and all(c.pp == 1 for c in arctic.candidates if c.sp > 1)


def test_spec_engine_compiles_a_plan_that_engine_runs(tmp_path, capsys):
    spec = tmp_path / "l70.yaml"
    spec.write_text((ROOT / "examples" / "llama-3.1-70b-8xh200.yaml").read_text() + "engine: vllm\n")
    out = tmp_path / "l70.plan.yaml"
    assert plan_main(["compile", str(spec), "-q", "-o", str(out)]) == 0
    plan = load_plan(out)
    assert plan.engine == "vllm" and plan.mesh.sp == 1 and not plan.shift.enabled
    assert "engine: vllm\n" in out.read_text()
    assert plan_main(["show", str(out)]) == 0
    assert "engine     vllm: vLLM v0.18.0" in capsys.readouterr().out
    assert plan_main(["show", str(ROOT / "plans" / "llama-3.1-70b-8xh200.plan.yaml")]) == 0
    assert "engine     shiftplan (its own executors" in capsys.readouterr().out
    # no --engine: the plan's own
    assert plan_main(["export", str(out), "--no-downgrade", "-o", str(tmp_path / "l70.sh")]) == 0
    assert "vllm serve meta-llama/Llama-3.1-70B-Instruct" in (tmp_path / "l70.sh").read_text()
    # the default engine stays out of the file, so plans written before the field are unchanged
    assert "\nengine:" not in dump_plan(plan.model_copy(update={"engine": "shiftplan"}))


def test_compile_engine_option_overrides_the_spec(tmp_path, capsys):
    out = tmp_path / "q32.plan.yaml"
    example = str(ROOT / "examples" / "qwen2.5-32b-8xh200.yaml")
    assert plan_main(["compile", example, "--engine", "sglang", "-q", "-o", str(out)]) == 0
    plan = load_plan(out)
    assert plan.engine == "sglang" and plan.mesh.sp == 1
    assert load_plan(ROOT / "plans" / "qwen2.5-32b-8xh200.plan.yaml").mesh.sp > 1  # the free search picks SP
    assert plan_main(["compile", example, "--engine", "tgi", "-q"]) == 2
    assert "--engine must be one of shiftplan, vllm, arctic, sglang" in capsys.readouterr().err


def test_spec_rejects_an_unknown_engine(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text((ROOT / "examples" / "llama-3.1-8b-1xh100.yaml").read_text() + "engine: tensorrt-llm\n")
    assert plan_main(["compile", str(spec), "-q"]) == 2
    assert "engine" in capsys.readouterr().err


def test_export_reads_only_the_plan_schema():
    import subprocess
    import sys

    code = ("import sys; from planner.cli import main; "
            f"rc = main(['export', {str(PLANS[0])!r}, '--engine', 'arctic']); "
            "heavy = [m for m in ('torch', 'pulp', 'networkx', 'planner.pipeline', 'planner.spec', 'costmodels', "
            "'graph') if m in sys.modules]; print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout[-2000:] + out.stderr[-2000:]


def test_a_replica_on_part_of_two_nodes_is_refused():
    from plans.errors import UserError

    odd = _with(_plan("llama-3.1-70b-2x8xh100"), mesh=Mesh(pp=3, tp=4), shift=Shift(), stages=_stages(80, 3))
    with pytest.raises(UserError, match="spans nodes \\[0, 1\\] without filling them"):
        export_plan(odd, "vllm")


def test_search_pins_the_engine_cannot_run_are_named(tmp_path, capsys):
    base = (ROOT / "examples" / "qwen2.5-32b-8xh200.yaml").read_text()
    spec = tmp_path / "pinned.yaml"
    spec.write_text(base + "engine: sglang\nsearch: {sp: [8]}\n")
    assert plan_main(["compile", str(spec), "-q"]) == 2
    err = capsys.readouterr().err
    assert "search.sp = [8] but engine: sglang" in err and "no Ulysses sequence parallelism" in err
    vl = tmp_path / "vl.yaml"
    vl.write_text((ROOT / "examples" / "qwen2.5-vl-72b-8xh200.yaml").read_text().replace(
        "vision_placement: [stage0_tp, stage0_dp, all_dp, dedicated]", "vision_placement: [all_dp]")
        + "engine: vllm\n")
    assert plan_main(["compile", str(vl), "-q"]) == 2
    err = capsys.readouterr().err
    assert "search.vision_placement = ['all_dp'] but engine: vllm" in err and "first pipeline stage only" in err
