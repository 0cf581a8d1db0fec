"""The GPU benchmarks bench/shift_crossover.py, bench/vl_speed.py and bench/fidelity_2gpu.py, dry-run on CPU with tiny
configs (2 gloo ranks): the report's structure, positive figures, and the figures that follow from
others (floors from the stated FLOP formula and the measured matmul rate, ratios to one GPU,
the interpolated crossover inside its bracket)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import shift_crossover as sc
from bench import vl_speed as vl
from tests.tiny.helpers import run_interpreted


# ------------------------------------------------------------------ shift_crossover


def test_token_grid_and_crossover_arithmetic():
    g = sc.token_grid(64, 16384)
    assert g[:4] == [64, 96, 128, 192] and g[-2:] == [12288, 16384] and len(g) == 17
    # TP wins at 128 (d = +0.5), SP x TP from 256 on (d = -1): log-linear interpolation, f = 1/3
    c = sc.crossover([(64, 1.0, 2.0), (128, 2.0, 2.5), (256, 4.0, 3.0), (512, 8.0, 5.0)])
    assert c["bracket"] == [128, 256]
    assert c["tokens"] == pytest.approx(128 * 2 ** (1 / 3), abs=0.1)
    # SP x TP winning early and losing again does not count: the last run of wins does
    c = sc.crossover([(64, 2.0, 1.0), (128, 2.0, 3.0), (256, 4.0, 3.0)])
    assert c["bracket"] == [128, 256]
    assert sc.crossover([(64, 1.0, 2.0), (128, 2.0, 3.0)])["tokens"] is None
    assert sc.crossover([(64, 2.0, 1.0), (128, 3.0, 2.0)])["bracket"] == [None, 64]


def test_mixed_step_holds_a_chunk_and_the_decodes():
    mb = sc.step_batch("mixed", 64, 8, 40, vocab=1000, block=16, seed=0)
    assert mb.num_tokens == 64 and len(mb.sample_idx) == 9 and not mb.decode
    assert mb.ctx == [56] + [41] * 8
    used = {b for bl in mb.blocks for b in bl}
    assert max(used) < sc.blocks_needed([64], 8, 40, 16) - 1  # the last block stays free (scratch slot)
    pre = sc.step_batch("prefill", 48, 8, 40, vocab=1000, block=16, seed=0)
    assert pre.num_tokens == 48 and len(pre.sample_idx) == 1


def test_shift_crossover_tiny_run(tmp_path):
    r = sc.main(["--out", str(tmp_path), "--tiny", "--max-tokens", "16", "--reps", "1"])
    saved = json.loads((tmp_path / "shift_crossover.json").read_text())
    assert saved["grid"] == r["grid"] == [8, 12, 16]
    assert r["command"] == "python bench/shift_crossover.py --out DIR --tiny --max-tokens 16 --reps 1"
    assert r["ranks"] == {"exit_codes": [0, 0], "timed_out": False}
    pl = r["planner"]
    assert pl["source"] == "planner.api.compile_spec"
    if pl["never_switches_up_to"] is None:
        assert pl["crossover_tokens"] == pl["threshold_tokens"] + 1
    else:
        assert pl["crossover_tokens"] is None and pl["threshold_tokens"] == pl["never_switches_up_to"]
    assert pl["curves"] and pl["runtime_backend"] == "eager"
    for kind in sc.KINDS:
        steps = r["steps"][kind]
        assert sorted(int(t) for t in steps) == [8, 12, 16]
        for row in steps.values():
            assert row["tp"]["ms"] > 0 and row["sp_tp"]["ms"] > 0 and len(row["tp"]["reps_ms"]) == 1
            assert row["sp_tp_over_tp"] == pytest.approx(row["sp_tp"]["ms"] / row["tp"]["ms"], rel=1e-2)
        c = r["crossover"][kind]
        if c["tokens"] is not None:
            lo, hi = c["bracket"]
            assert lo is None or lo <= c["tokens"] <= hi
        else:
            assert c["why"]
        if c["tokens"] is not None and pl["crossover_tokens"] is not None:
            assert c["ratio_to_planner"] == pytest.approx(c["tokens"] / pl["crossover_tokens"], rel=1e-2)
            assert c["within_20pct"] == (abs(c["ratio_to_planner"] - 1) <= 0.2 + 1e-3)
        else:
            assert isinstance(c["agrees_with_planner"], bool)
    md = (tmp_path / "shift_crossover.md").read_text()
    assert "## prefill" in md and "## mixed" in md and f"threshold {pl['threshold_tokens']} tokens" in md
    for kind in sc.KINDS:  # a prediction beside every measured step
        assert set(r["predicted"][kind]) == set(r["steps"][kind])
        assert all(p["tp_ms"] > 0 and p["sp_tp_ms"] > 0 for p in r["predicted"][kind].values())


def test_shift_crossover_report_only_rebuilds_the_committed_report(tmp_path):
    """No GPU: the committed measurement's steps kept, the planner side and predictions recomputed
    for the layers that ran (compiled), and the verdict the measurement gives: no crossover up to
    8,192 tokens, and the planner does not switch either."""
    from pathlib import Path

    src = Path(sc.ROOT) / "bench" / "results" / "shift_crossover.json"
    measured = json.loads(src.read_text())
    r = sc.main(["--out", str(tmp_path), "--report-only", str(src)])
    assert r["steps"] == measured["steps"] and r["command"] == measured["command"]
    pl = r["planner"]
    assert pl["runtime_backend"] == measured["backend"] == "compile" and pl["launch"]["host_ms_per_layer"] > 0
    assert pl["never_switches_up_to"] == pl["threshold_tokens"] == 8192 and pl["crossover_tokens"] is None
    for kind in sc.KINDS:
        assert r["crossover"][kind]["tokens"] is None and r["crossover"][kind]["agrees_with_planner"] is True
        pred, steps = r["predicted"][kind], r["steps"][kind]
        for t in ("3072", "4096", "6144", "8192"):  # GPU-bound eager steps: SP2 not faster, as measured
            assert 1.0 < pred[t]["sp_tp_over_tp"] < 1.15
            assert pred[t]["sp_tp_ms"] == pytest.approx(steps[t]["sp_tp"]["ms"], rel=0.1)
            assert pred[t]["tp_ms"] == pytest.approx(steps[t]["tp"]["ms"], rel=0.1)
    assert (tmp_path / "shift_crossover.md").read_text().count("agree") == 2


# ------------------------------------------------------------------ vl_speed


def test_tower_flops_formula_by_hand():
    from executors.config import model_args
    from tests.tiny.helpers import config

    v = model_args(config("qwen2_vl")).vision  # E 32, MLP 64, 2 blocks, merge 2, out 64
    f = vl.tower_flops(v, (1, 4, 4))
    N, E, F = 16, 32, 64
    assert f["patch_embed"] == 2 * N * (3 * 2 * 14 * 14) * E
    assert f["blocks_linear"] == 2 * 2 * N * (4 * E * E + 2 * E * F)
    assert f["attention"] == 2 * 4 * N * N * E
    assert f["merger"] == 2 * (N // 4) * (128 * 128 + 128 * 64)
    assert f["total"] == f["patch_embed"] + f["blocks_linear"] + f["attention"] + f["merger"]
    assert (f["patches"], f["tokens"]) == (16, 4)


CASES = ("single", "tp2/stage0_tp", "shift-sp2/stage0_dp", "pp2/all_dp", "dedicated")


def test_vl_speed_tiny_run(tmp_path):
    r = vl.main(["--out", str(tmp_path), "--tiny", "--trace", "--cases", ",".join(CASES + ("no-such-case",))])
    assert json.loads((tmp_path / "vl_speed.json").read_text())["cases"].keys() == set(CASES) | {"no-such-case"}
    assert "KeyError" in r["cases"]["no-such-case"]["error"]  # a failing case is recorded, the others run
    rate = r["matmul"]["TFLOPs"]
    assert rate > 0
    from executors.config import model_args
    from tests.tiny.helpers import config

    m = model_args(config("qwen2_vl"))
    assert set(r["tower"]) == {f"{px}x{px} x{k}" for px in (56, 112) for k in vl.TOWER_IMAGES}
    for key, t in r["tower"].items():
        px = int(key.split("x")[0])
        fl = vl.tower_flops(m.vision, vl.image_grid(px, m.vision))
        assert t["images"] == int(key.split(" x")[1])
        assert t["patches"] == (px // 14) ** 2 and t["llm_tokens"] == t["patches"] // 4
        assert t["gflop"] == pytest.approx(fl["total"] / 1e9, abs=1e-3)
        assert t["floor_ms"] == pytest.approx(1e3 * fl["total"] / (rate * 1e12), rel=1e-2, abs=1e-4)
        run = t["launched"]  # CPU: no graphs
        assert "graphs" not in t and run["ms_per_image"] > 0
        assert run["x_floor"] == pytest.approx(run["ms_per_image"] / t["floor_ms"], rel=2e-2)
    image_fl = vl.tower_flops(m.vision, vl.image_grid(r["sizes"]["image_px"], m.vision))["total"]
    one = r["cases"]["single"]
    for name in CASES:
        x = r["cases"][name]
        assert "error" not in x, x
        b = x["batch"]
        assert b["completed"] == b["requests"] == r["sizes"]["batch"]
        assert b["output_tok_s"] > 0 and b["requests_s"] > 0 and b["ttft_ms_p50"] > 0 and b["tpot_ms_p50"] > 0
        assert x["ttft_image_ms"] > 0 and x["ttft_text_ms"] > 0
        assert x["image_cost_ms"] == pytest.approx(x["ttft_image_ms"] - x["ttft_text_ms"], abs=2e-3)
        assert x["image_floor_ms"] == pytest.approx(1e3 * image_fl / (rate * 1e12 * x["encoder"]["tp"]), rel=1e-2,
                                                    abs=1e-4)
        v = x["vs_single"]
        assert v["batch_output_tok_s"] == pytest.approx(b["output_tok_s"] / one["batch"]["output_tok_s"], rel=1e-2)
        assert v["ttft_image"] == pytest.approx(x["ttft_image_ms"] / one["ttft_image_ms"], rel=1e-2)
        assert v["batch_tpot_p50"] == pytest.approx(b["tpot_ms_p50"] / one["batch"]["tpot_ms_p50"], rel=1e-2)
        assert not math.isnan(v["batch_ttft_p50"])
        assert x["tpot_b1_ms"] > 0 and v["tpot_b1"] == pytest.approx(x["tpot_b1_ms"] / one["tpot_b1_ms"], rel=1e-2)
        assert x["ttft_long_ms"] > 0 and v["ttft_long"] == pytest.approx(x["ttft_long_ms"] / one["ttft_long_ms"], rel=1e-2)
    assert one["vs_single"]["batch_output_tok_s"] == 1.0
    assert r["cases"]["tp2/stage0_tp"]["encoder"] == {"stages": [0], "tp": 2, "replicas": 1}
    assert r["cases"]["pp2/all_dp"]["encoder"] == {"stages": [0, 1], "tp": 1, "replicas": 2}
    assert r["cases"]["dedicated"]["encoder"]["stages"] == []
    shift = r["cases"]["shift-sp2/stage0_dp"]
    assert shift["shift_threshold"] is not None and shift["modes"]["tp"] > 0 and shift["modes"]["sp_tp"] > 0
    md = (tmp_path / "vl_speed.md").read_text()
    assert all(name in md for name in CASES) and "## (a)" in md and "## (b)" in md and "## (c)" in md
    # --trace: the batch's steps, each case's image steps with their images encoded on the reporting rank
    for name in CASES:
        t = r["cases"][name]["batch_trace"]
        assert sum(x["images"] for x in t["steps"]) == r["sizes"]["batch"]  # every request's one image, once
        assert t["summary"]["image"]["steps"] >= 1 and t["summary"]["all"]["span_ms"] > 0
        assert r["cases"][name]["tpot_b1_trace"]["decode"]["steps"] >= r["sizes"]["new_tokens"] - 2
    assert "## (d)" in md and "## (e)" in md
    assert r["sizes"]["long_tokens"] == 7 * vl.image_tokens(112, m.vision) + r["sizes"]["text_tokens"] == 7 * 16 + 8


def test_engine_speed_runs_every_point_in_one_call(tmp_path) -> None:
    """`bench/engine_speed.py` (CPU dry run) measures one GPU's figures and then, in the same call,
    the parallel modes and the multimodal points: all three result files, each script exiting 0."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "engine_speed.py"), "--out", str(tmp_path), "--tiny",
                          "--multi-gpu", "on", "--variants", "graphs", "--batches", "1"],
                         capture_output=True, text=True, timeout=900, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "engine_speed.json").read_text())
    assert r["variants"]["graphs"]["batch_1"]["decode_step_ms"] > 0
    assert {k: v["returncode"] for k, v in r["multi_gpu"].items()} == {"mesh_speed": 0, "vl_speed": 0}
    for name in ("engine_speed.md", "mesh_speed.md", "vl_speed.md"):
        assert (tmp_path / name).stat().st_size > 0


def test_scaling_compares_speedups_not_times(tmp_path) -> None:
    """bench/scaling_2gpu.py on a made-up measurement: each row's speedups are one GPU's time over
    the mesh's, and its error is their ratio - 1."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fake = {"meshes": {m: {"decode_b1": {"decode_step_ms": d}, "prefill": {"ttft_ms_p50": p}}
                       for m, d, p in (("single", 8.0, 300.0), ("tp2", 5.0, 150.0), ("pp2", 8.0, 300.0))}}
    src = tmp_path / "mesh_speed.json"
    src.write_text(json.dumps(fake))
    out = subprocess.run([sys.executable, str(root / "bench" / "scaling_2gpu.py"), "--mesh-speed", str(src),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads((tmp_path / "scaling_2gpu.json").read_text())
    rows = {(x["mesh"], x["step"]): x for x in r["rows"]}
    assert set(rows) == {("tp2", "decode"), ("tp2", "prefill"), ("pp2", "decode"), ("pp2", "prefill")}
    assert rows["tp2", "decode"]["measured_speedup"] == 1.6 and rows["tp2", "prefill"]["measured_speedup"] == 2.0
    for x in rows.values():
        p = r["predicted_ms"]["single"][x["step"] + "_ms"] / r["predicted_ms"][x["mesh"]][x["step"] + "_ms"]
        assert x["predicted_speedup"] == round(p, 3)
        assert abs(x["error"] - (x["predicted_speedup"] / x["measured_speedup"] - 1)) < 2e-3


# ------------------------------------------------------------------ fidelity_2gpu


def test_fidelity_error_statistics_by_hand():
    from bench import fidelity_2gpu as fid

    def row(errs):
        return {"figures": {f: {"predicted": 1 + e, "measured": 1.0, "error": e} for f, e in zip(fid.FIGURES, errs)}}

    s = fid.error_stats([row([0.0, -0.1, 0.2, 0.05, -0.3]), row([0.01, 0.02, -0.03, 0.04, float("nan")])])
    # |errors|: 0, .01, .02, .03, .04, .05, .1, .2, .3 (nine; the nan is missing)
    assert s["n"] == 9 and s["missing"] == 1
    assert s["median_abs_error"] == pytest.approx(0.04)
    assert s["p90_abs_error"] == pytest.approx(0.2 + 0.2 * 0.1)  # position 0.9 x 8 = 7.2 of 0..8
    assert s["meets"] is False and s["per_figure"]["ttft_ms p50"]["n"] == 2
    s["complete"] = True
    assert "does not hold" in fid.verdict(s, "x")
    ok = fid.error_stats([row([0.05, -0.05, 0.05, 0.0, 0.1])])
    ok["complete"] = True
    assert ok["meets"] and fid.verdict(ok, "x").startswith("The acceptance holds for x")
    ok["complete"] = False
    assert "not shown" in fid.verdict(ok, "x")


def test_fidelity_tiny_run(tmp_path):
    """bench/fidelity_2gpu.py --tiny on two meshes of the text model, two rates: every figure
    predicted and measured, errors from the two, the summary from the rows; a case killed by its
    timeout records the error and --resume keeps the cases that ran; with --trace every step of each
    rate is kept and costed again."""
    from bench import fidelity_2gpu as fid
    from bench import step_fidelity
    from costmodels.simulator.metrics import percentile

    args = ["--out", str(tmp_path), "--tiny", "--models", "llama", "--cases", "single,tp2", "--rates", "0.4,0.9",
            "--duration", "1.5", "--trace"]
    r = fid.main(args)
    assert json.loads((tmp_path / "fidelity_2gpu.json").read_text()) == r
    assert r["command"] == "python bench/fidelity_2gpu.py --out DIR " + " ".join(args[2:])
    assert r["rate_fractions"] == [0.4, 0.9] and r["duration_s"] == 1.5
    m = r["models"]["llama"]
    assert list(m["cases"]) == m["asked_cases"] == ["single", "tp2"]
    rows = []
    for case, c in m["cases"].items():
        assert "error" not in c, c
        assert c["mesh"] == case and c["capacity"]["rps"] > 0 and c["kv_tokens"] > 0
        assert [x["fraction"] for x in c["rates"]] == [0.4, 0.9]
        for x in c["rates"]:
            assert x["rate_rps"] == pytest.approx(x["fraction"] * c["capacity"]["rps"] * c.get("rate_scale", 1.0))
            assert x["requests"] >= 2 and x["completed"] == x["requests"] and x["rejected"] == 0
            for f in fid.FIGURES:
                fig = x["figures"][f]
                assert fig["predicted"] > 0 and fig["measured"] > 0, (case, f, fig)
                assert fig["error"] == pytest.approx(fig["predicted"] / fig["measured"] - 1, rel=1e-9, abs=1e-12)
        assert c["rates"][1]["rate_rps"] > c["rates"][0]["rate_rps"]
        traced = step_fidelity.read_steps(tmp_path / step_fidelity.STEPS_FILE)["llama"][case]
        for x in c["rates"]:  # --trace: the replay's steps (and only those), each costed again
            recs, sc = traced[str(x["fraction"])], x["step_costs"]
            assert sc["all"]["steps"] == len(recs) == sum(v["steps"] for k, v in sc.items() if k != "all")
            # the replay's own steps: each of its requests starts once (a first chunk reads only its own
            # keys), again only when preempted; the warm-up request before the replay is left out
            starts = sum(n == c for r in recs for nn, cc in zip(r["new"], r["ctx"]) for n, c in zip(nn, cc) if n > 1)
            ones = sum(n == c == 1 for r in recs for nn, cc in zip(r["new"], r["ctx"]) for n, c in zip(nn, cc))
            again = x["other"]["preemptions"]["measured"]
            assert x["requests"] <= starts + ones and starts <= x["requests"] + again
            assert sc["all"]["predicted_sum_ms"] > 0 and sc["all"]["period_sum_ms"] > 0
            assert {"decode", "prefill"} <= set(sc) or {"decode", "mixed"} <= set(sc)
        k = c["capacity_check"]
        assert k["requests"] == k["completed"] == c["capacity"]["requests"] and k["measured_rps"] > 0
        assert k["predicted_rps"] == pytest.approx(c["capacity"]["rps"], rel=1e-9)  # the same simulator run
        assert k["error"] == pytest.approx(k["predicted_rps"] / k["measured_rps"] - 1, rel=1e-9, abs=1e-12)
        recs = traced[fid.CAPACITY]  # the capacity check's own steps, costed again: its requests all start
        starts = sum(n == c for r in recs for nn, cc in zip(r["new"], r["ctx"]) for n, c in zip(nn, cc) if n > 1)
        assert k["requests"] <= starts + sum(n == c == 1 for r in recs for nn, cc in zip(r["new"], r["ctx"])
                                             for n, c in zip(nn, cc))
        assert k["step_costs"]["all"]["steps"] == len(recs) and "steps" not in k
        rows += c["rates"]
    errs = [abs(x["figures"][f]["error"]) for x in rows for f in fid.FIGURES]
    for s in (m["summary"], r["summary"]):
        assert s["n"] == len(errs) == 20 and s["missing"] == 0 and s["complete"] is True
        assert s["median_abs_error"] == pytest.approx(percentile(errs, 50))
        assert s["p90_abs_error"] == pytest.approx(percentile(errs, 90))
        assert s["meets"] == (s["median_abs_error"] <= 0.10 and s["p90_abs_error"] <= 0.20)
        for f in fid.FIGURES:
            per = [abs(x["figures"][f]["error"]) for x in rows]
            assert s["per_figure"][f]["median_abs_error"] == pytest.approx(percentile(per, 50))
    md = (tmp_path / "fidelity_2gpu.md").read_text()
    assert "## llama" in md and "## All models" in md and r["command"] in md and "| tp2 | tp2 |" in md
    assert fid.verdict(r["summary"], "the whole run") in md

    # a case past its timeout: the error is recorded and the run goes on; --resume keeps the others
    r2 = fid.main(["--out", str(tmp_path), "--tiny", "--models", "llama", "--cases", "single,tp2,pp2", "--rates",
                   "0.4,0.9", "--duration", "1.5", "--case-timeout", "1", "--resume"])
    c2 = r2["models"]["llama"]["cases"]
    assert c2["single"] == m["cases"]["single"] and c2["tp2"] == m["cases"]["tp2"]
    assert "timed out after 1 s" in c2["pp2"]["error"]
    assert r2["summary"]["complete"] is False and len(r2["commands"]) == 2
    assert r["summary"]["covers"] is False  # one model, two cases, two rates: not what the acceptance names

    # --repredict: the same cost model predicts the same figures for the same requests; a changed
    # prediction moves the error against the kept measurement
    again = fid.main(["--out", str(tmp_path / "again"), "--repredict", str(tmp_path / "fidelity_2gpu.json")])
    for case in ("single", "tp2"):
        for x, y in zip(m["cases"][case]["rates"], again["models"]["llama"]["cases"][case]["rates"]):
            for f in fid.FIGURES:
                assert y["figures"][f]["measured"] == x["figures"][f]["measured"]
                assert y["figures"][f]["predicted"] == pytest.approx(x["figures"][f]["predicted"], rel=1e-9)
    assert "pp2" in again["models"]["llama"]["cases"] and again["repredicted"]["from"] == "fidelity_2gpu.json"
    for x, y in zip(m["cases"]["tp2"]["rates"], again["models"]["llama"]["cases"]["tp2"]["rates"]):
        assert y["step_costs"] == x["step_costs"]  # the steps file is read and costed the same way
    assert (tmp_path / "again" / step_fidelity.STEPS_FILE).is_file()
    assert "Steps (`--trace`" in (tmp_path / "again" / "fidelity_2gpu.md").read_text()
    assert "Predictions made again without the engine" in (tmp_path / "again" / "fidelity_2gpu.md").read_text()
    with pytest.raises(SystemExit) as bad:  # not a report: one message, exit 2
        fid.main(["--out", str(tmp_path / "bad"), "--repredict", str(tmp_path / "fidelity_2gpu.md")])
    assert bad.value.code == 2


# ------------------------------------------------------------------ prefill_attention


def test_prefill_attention_dry_run(tmp_path):
    """bench/prefill_attention.py on CPU (the kernel through Triton's interpreter): every path (SDPA,
    the kernel with and without key ranges) timed per case, the same outputs, FLOPs from the causal
    formula."""
    run_interpreted("bench/prefill_attention.py", "--out", str(tmp_path), "--tiny")
    r = json.loads((tmp_path / "prefill_attention.json").read_text())
    from bench.prefill_attention import PATHS, TINY

    assert set(r["cases"]) == set(TINY)
    hq, _hkv, D = r["heads"]
    for name, x in r["cases"].items():
        assert x["max_abs_diff"] < 1e-4
        assert x["tokens"] == sum(n for _c, n in TINY[name])
        flops = sum(4 * n * (c + (n + 1) / 2) * hq * D for c, n in TINY[name])
        assert x["GFLOP"] == round(flops / 1e9, 3)
        for path in PATHS:
            assert x[path]["host_ms"] > 0 and x[path]["gpu_ms"] > 0
    assert "| 3x8@12 |" in (tmp_path / "prefill_attention.md").read_text()


# ------------------------------------------------------------------ fp8_gemm_speed


def test_fp8_gemm_speed_dry_run(tmp_path):
    """bench/fp8_gemm_speed.py on CPU (the kernels through Triton's interpreter): every method timed
    at every (shape, M), the W8A16 kernel's result within fp16 rounding of the dequantized reference
    (both tilings at M <= GEMV_MAX_M), the W8A8 kernel's (both quantization placements, the routed
    kernel above W8A16_MAX_M rows) within the FP8 tolerance and 1.5x ``torch._scaled_mm``'s error,
    floors from the weight bytes and the FLOPs, the markdown table written."""
    stdout = run_interpreted("bench/fp8_gemm_speed.py", "--out", str(tmp_path), "--tiny")
    r = json.loads((tmp_path / "fp8_gemm_speed.json").read_text())
    from bench.fp8_gemm_speed import SHAPES, TINY, TINY_ROWS

    assert r["command"] == "python bench/fp8_gemm_speed.py --out DIR --tiny" and r["dtype"] == "float16"
    assert [(x["shape"], x["M"]) for x in r["rows"]] == [(s, m) for s in TINY for m in TINY_ROWS]
    for x in r["rows"]:
        N, K = TINY[x["shape"]]
        assert x["floor_fp8_us"] == pytest.approx(N * K / (r["copy_GBps"] * 1e3), abs=0.01)
        assert x["floor_bf16_us"] == pytest.approx(2 * x["floor_fp8_us"], abs=0.02)
        assert x["floor_fp8_mma_us"] == pytest.approx(2 * x["M"] * N * K / (r["peak_tflops"][1] * 1e6), abs=0.01)
        assert x["triton_rel_err"] < (2e-3 if x["M"] <= r["w8a16_max_m"] else 0.06)
        assert ("triton_mma_rel_err" in x) == (x["M"] <= r["gemv_max_m"])
        assert x.get("triton_mma_rel_err", 0) < 2e-3
        for m in ("w8a8_fused", "w8a8_prequant"):
            assert (f"{m}_us" in x) == (f"{m}_rel_err" in x) == (x["M"] > r["gemv_max_m"])
            assert x.get(f"{m}_rel_err", 0) < min(0.06, 1.5 * x["rowwise_rel_err"])
        for m in ("bf16", "rowwise", "tensorwise", "triton"):
            assert x[f"{m}_us"] > 0 and f"{m}_error" not in x
    assert r["w8a16_max_m"] < max(TINY_ROWS) <= r["max_m"]  # the dry run reaches the W8A8 kernel
    md = (tmp_path / "fp8_gemm_speed.md").read_text()
    assert "| tiny/down (40 x 96) | 17 |" in md and md in stdout
    # the GPU shapes: a 70B Llama's projections under TP8 / TP4 / TP2, Llama-3.1-405B's under TP8 and
    # Llama-3.1-8B's
    assert SHAPES["70b/tp8/qkv"] == (1280, 8192) and SHAPES["70b/tp4/o"] == (8192, 2048)
    assert SHAPES["405b/tp8/qkv"] == (2304, 16384) and SHAPES["405b/tp8/down"] == (16384, 6656)
    assert SHAPES["70b/tp2/gate_up"] == (28672, 8192) and SHAPES["8b/down"] == (4096, 14336) and len(SHAPES) == 20


def test_step_profile_finds_gpu_idle_gaps_and_the_host_ops_in_them():
    """``bench/step_profile.py``'s analysis on hand-made profiler events: the GPU's busy time is the
    union of its kernels, each idle gap of at least the threshold names the outermost host ops and
    the innermost ones overlapping it, longest overlap first, and a replay's gaps sum by op."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from bench import step_profile as sp

    def ev(name, a, b, kind=DeviceType.CPU):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=a, end=b), device_type=kind)

    gpu = DeviceType.CUDA
    events = [ev("k1", 0, 100, gpu), ev("k2", 50, 300, gpu), ev("k3", 3300, 9000, gpu), ev("k4", 9100, 9200, gpu),
              ev("k5", 12000, 12100, gpu), ev("aten::to", 100, 3200), ev("cudaMalloc", 200, 2900),
              ev("aten::add", 3100, 3250), ev("aten::mm", 9300, 11900)]
    g = sp.gpu_gaps(events, gap_us=500)
    assert g["busy_ms"] == pytest.approx((300 + 5700 + 100 + 100) / 1e3) and g["span_ms"] == pytest.approx(12.1)
    assert [(x["at_ms"], x["ms"]) for x in g["gaps"]] == [(0.3, 3.0), (9.2, 2.8)]  # 100 us between k3 and k4: no gap
    first = g["gaps"][0]
    assert first["host_ops"][0].startswith("aten::to (2.90") and first["innermost"][0].startswith("cudaMalloc (2.60")
    assert any(h.startswith("aten::add") for h in first["host_ops"])
    summed = sp.gap_ops(events, gap_us=500)
    assert summed["gaps"] == 2 and summed["gap_ms"] == pytest.approx(5.8)
    assert {x["op"]: x["ms"] for x in summed["by_innermost_op"]} == {"cudaMalloc": 3.0, "aten::add": 3.0, "aten::mm": 2.8}
    assert sp.parse_shape("4033:4784,4784,4784,1024") == (4033 - 3 * 1196 - 256, [4784, 4784, 4784, 1024])
    assert sp.parse_shape("4000") == (4000, [])
    import argparse

    for bad in ("12:x", "100:4096", "50:2"):  # not integers; images past the tokens; an image of 2 patches
        with pytest.raises(argparse.ArgumentTypeError):
            sp.parse_shape(bad)


def test_clock_log_windows_nvidia_smi_samples_by_wall_time(monkeypatch):
    """``bench.common.ClockLog``: nvidia-smi's CSV lines (local wall-clock stamps) are read back by time
    window; a window with no sample says so, and a machine without nvidia-smi logs nothing."""
    import datetime

    from bench import step_profile as sp
    from bench.common import ClockLog

    log = ClockLog()
    t0 = datetime.datetime(2026, 12, 1, 11, 0, 0)
    rows = [(0.00, 1980, 120.5), (0.05, 1830, 650.0), (0.10, 1650, 690.0), (0.15, 1980, 130.0), (9.0, 345, 80.0)]
    log.path.write_text("".join(f"{(t0 + datetime.timedelta(seconds=dt)).strftime('%Y/%m/%d %H:%M:%S.%f')[:-3]}, "
                                f"{mhz}, {w}\n" for dt, mhz, w in rows) + "garbage line\n")
    w = log.window(t0.timestamp() + 0.04, t0.timestamp() + 0.12)
    assert w == {"samples": 2, "sm_mhz_median": 1740.0, "sm_mhz_min": 1650.0, "power_w_mean": 670.0}
    assert log.window(t0.timestamp() + 1, t0.timestamp() + 2) == {"samples": 0}
    assert sp.clock_text(w) == "SM 1740 MHz (lowest 1650), 670 W" and sp.clock_text({"samples": 0}) == "not sampled"
    monkeypatch.setenv("PATH", "")  # no nvidia-smi: nothing overwrites the hand-written samples
    with log:  # closing keeps the samples and drops the file
        pass
    assert not log.path.exists() and log.window(t0.timestamp() + 0.04, t0.timestamp() + 0.12) == w
    with ClockLog() as none:
        assert none.proc is None and none.samples() == []


def test_bench_scripts_name_a_bad_input_file_and_exit_2(tmp_path, capsys):
    """``step_profile --report``, ``mixed_step_profile --report`` and ``decode_splits`` / ``graph_decodes
    --price`` given a file that is not their report: one line naming it, exit 2, no traceback."""
    from bench import decode_splits as ds
    from bench import graph_decodes as gd
    from bench import mixed_step_profile as msp
    from bench import step_profile as sp

    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    for main, argv in ((sp.main, ["--out", str(tmp_path), "--report", str(junk)]),
                       (msp.main, ["--out", str(tmp_path), "--tiny", "--report", str(junk)]),
                       (ds.main, ["--out", str(tmp_path), "--price", str(junk)]),
                       (gd.main, ["--out", str(tmp_path), "--price", str(junk)])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and "junk.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a negative rest: said before anything loads
        sp.main(["--out", str(tmp_path), "--rest-s", "-1"])
    assert e.value.code == 2 and "--rest-s -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sp.main(["--out", str(tmp_path), "--top", "0"])
    assert e.value.code == 2 and "--top 0" in capsys.readouterr().err
    from bench import graph_decodes as gd

    with pytest.raises(SystemExit) as e:  # graph_decodes' sweep values: named, nothing run
        gd.main(["--out", str(tmp_path), "--tiny", "--fill", "8,x"])
    assert e.value.code == 2 and "--fill '8,x'" in capsys.readouterr().err


def test_decode_splits_prices_a_measured_report_on_any_machine(tmp_path):
    """``bench/decode_splits.py --price``: the committed GPU measurements, each case priced by the
    cost model (one layer's decode attention of the case's preset at its mean context) beside the
    engine's kernel at its cap; the measured figures are kept as they were."""
    from bench import decode_splits as ds

    src = Path(ds.__file__).resolve().parent / "results" / "decode_splits.json"
    before = json.loads(src.read_text())
    assert ds.main(["--out", str(tmp_path), "--price", str(src)]) == 0
    got = json.loads((tmp_path / "decode_splits.json").read_text())
    cap = str(got["engine_cap"])
    assert [r["us"] for r in got["rows"]] == [r["us"] for r in before["rows"]]
    for r in got["rows"]:
        assert r["model_us"] > 0 and r["model_over_kernel"] == round(r["model_us"] / r["us"][cap], 2)
    # more sequences of the same context: the model's price grows
    qwen = {r["case"]: r["model_us"] for r in got["rows"] if r["case"].startswith("qwen2-vl-7b") and "ctx 1500" in r["case"]}
    assert qwen["qwen2-vl-7b b64 ctx 1500 (w 2048)"] > qwen["qwen2-vl-7b b32 ctx 1500 (w 2048)"]
    assert "model / kernel" in (tmp_path / "decode_splits.md").read_text()
    # the engine's kernel is the oracle: every case, equal lengths or 300-5,000 keys, within 20%
    # (eight sequences of 300-5,000 keys were priced at 0.56 of it at their mean context alone)
    assert all(0.8 <= r["model_over_kernel"] <= 1.2 for r in got["rows"]), [(r["case"], r["model_over_kernel"]) for r in got["rows"]]
    b8 = next(r for r in got["rows"] if r["case"] == "qwen2-vl-7b b8 ctx 300-5000 (w 8192)")
    assert b8["model_us"] > ds.model_price_us("qwen2-vl-7b", 8, 2650) * 1.3  # the longest range's tail


def test_serving_heat_proxy_follows_heavy_time_and_the_fit_recovers_a_line():
    """``bench/serving_heat.py``: the power proxy rises with time spent in heavy steps, decays over
    light steps and idle gaps, and is read at each step's start; the least-squares fit recovers a
    planted line exactly (no spread left)."""
    import math

    from bench import serving_heat as sh

    tau = 1.0
    series = [{"heavy": True, "end": 500.0, "period": 500.0, "pred": 10.0, "gpu": 11.0},
              {"heavy": False, "end": 1000.0, "period": 500.0, "pred": 10.0, "gpu": 10.0},
              {"heavy": True, "end": 3000.0, "period": 500.0, "pred": 10.0, "gpu": 12.0}]  # after 1.5 s idle
    p = sh.proxy(series, tau)
    d = math.exp(-0.5)
    assert p[0] == 0.0 and p[1] == pytest.approx(1 - d) and p[2] == pytest.approx((1 - d) * d * math.exp(-1.5))
    kept = sh.kept(series, tau)
    assert [round(math.exp(y), 6) for _, y in kept] == [1.1, 1.2]  # the light step is left out
    f = sh.fit([(x, 0.02 + 0.1 * x) for x in (0.0, 0.2, 0.5, 0.9)])
    assert f["a"] == pytest.approx(0.02) and f["b"] == pytest.approx(0.1) and f["corr"] == pytest.approx(1.0)
    assert f["resid_sd"] == pytest.approx(0.0, abs=1e-12)


def test_mixed_step_profile_prices_each_class_as_the_coster_composes_the_step(tmp_path, capsys):
    """``bench/mixed_step_profile.py --tiny`` (no GPU): each case's price by op class, on the plan the
    mixed extra was fitted on, sums to the simulator's coster's price of the same step without that
    extra (the composition the GPU run compares kernels against); a mixed step carries the extra, a
    prompt alone does not; cases the plan's steps cannot hold exit 2, naming them."""
    from bench import mixed_step_profile as msp

    assert msp.main(["--out", str(tmp_path), "--tiny", "--cases", "256,0,0;128,32,800;1024,24,1000"]) == 0
    rows = json.loads((tmp_path / "mixed_step_profile.json").read_text())["rows"]
    for r in rows:
        m = r["model"]
        assert sum(m["classes_ms"].values()) == pytest.approx(m["coster_without_extra_ms"], abs=2e-4)
        assert (m["mixed_extra_ms"] > 0) == (r["decodes"] > 0) and m["classes_ms"]["matmul"] > m["classes_ms"]["attention"]
    assert rows[1]["model"]["classes_ms"]["attention"] > rows[0]["model"]["classes_ms"]["attention"]
    for bad in ("3,70,5", "256,0", "x"):
        with pytest.raises(SystemExit) as e:
            msp.main(["--out", str(tmp_path), "--tiny", "--cases", bad])
        assert e.value.code == 2 and f"--cases '{bad}'" in capsys.readouterr().err
    assert msp.kernel_class("nvjet_sm90_tst_128x32_64x10_2x1_v_bz_TNT") == "matmul"
    assert msp.kernel_class("_store") == msp.kernel_class("_prefill_attn") == "attention"
    assert msp.kernel_class("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "norm + elementwise"


def test_bucket_matmuls_names_each_layers_products_and_the_buckets_it_flags(tmp_path, capsys):
    """``bench/bucket_matmuls.py``: a layer's four dense products per GPU of a TP group (Llama-3.1-8B's
    QKV is 6,144 x 4,096, Llama-3.1-70B's gate+up at TP4 14,336 x 8,192), a
    report's table bolds exactly the buckets it lists as dominated, and bad --models exit 2."""
    from bench import bucket_matmuls as bm

    assert bm.projections("llama-3.1-8b", 1) == {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                                                 "down": (4096, 14336)}
    assert bm.projections("llama-3.1-70b", 4) == {"qkv": (2560, 8192), "o": (8192, 2048), "gate_up": (14336, 8192),
                                                  "down": (8192, 7168)}
    us = {str(M): {"qkv": 1.0 * M, "o": 1.0} for M in (16, 32, 48)}
    us["32"]["qkv"] = 60.0  # slower than at 48 rows
    md = bm.markdown({"device": "GPU", "driver": "-", "torch": "-", "cuda": "-", "command": "c", "buckets": [16, 32, 48],
                      "rows": [{"model": "m", "tp": 1, "us": us, "dominated": [32]}]})
    assert "| m (tp1) | 17.0 | **61.0** | 49.0 |" in md and "m tp1 at 32 rows: qkv 60.0 (at 48: 48.0)" in md
    with pytest.raises(SystemExit) as e:
        bm.main(["--out", str(tmp_path), "--models", "llama-3.1-8b"])
    assert e.value.code == 2 and "--models 'llama-3.1-8b'" in capsys.readouterr().err


def test_host_waits_charges_each_blocking_call_to_its_project_frames():
    """bench/host_waits.py: a runtime call is charged to the innermost project frames above it (the
    profiler's parent events), with the Python call that made it; short calls and calls that
    cannot block are left out."""
    from types import SimpleNamespace

    from bench import host_waits as hw

    def ev(name, us=0.0, parent=None, t0=0.0):
        return SimpleNamespace(name=name, cpu_parent=parent, stack=None,
                               time_range=SimpleNamespace(elapsed_us=lambda: us, start=t0, end=t0 + us))

    launch = ev("executors/worker.py(218): launch")
    fwd = ev("executors/stage.py(167): forward", parent=launch)
    to = ev("<built-in method to of Tensor object at 0x7f>", parent=ev("torch/x.py(1): f", parent=fwd))
    copy = ev("aten::copy_", parent=to)
    events = [ev("cudaStreamSynchronize", 900.0, copy), ev("cudaStreamSynchronize", 300.0, copy),
              ev("cudaStreamSynchronize", 50.0, copy), ev("cudaLaunchKernel", 5000.0, copy),
              ev("cudaEventSynchronize", 700.0, None, t0=100.0), ev("cudaMemcpyAsync", 400.0, None, t0=5000.0)]
    # an unlinked call (no parents) is placed by the Python calls whose time spans hold it
    events += [ev("executors/worker.py(343): out", 2000.0, t0=50.0), ev("<built-in method synchronize>", 900.0, t0=90.0)]
    got = hw.runtime_waits(events, min_us=200.0, frames=2)
    key = "cudaStreamSynchronize in to @ executors/stage.py(167): forward < executors/worker.py(218): launch"
    assert got[key] == {"count": 2, "total_us": 1200.0, "max_us": 900.0}
    assert got["cudaEventSynchronize in synchronize @ executors/worker.py(343): out"]["count"] == 1
    assert got["cudaMemcpyAsync in ? @ (no project frame)"]["count"] == 1  # held by no Python call
    assert len(got) == 3  # the 50 us call is under the threshold; a kernel launch is no wait
    assert "cudaStreamSynchronize" in hw.markdown({
        "model": "m", "device": "d", "torch": "t", "python": "p", "command": "c", "requests": 1, "duration_s": 1,
        "rate_rps": 1.0, "fraction": 0.5, "profiled_wall_s": 1, "replay_wall_s": 1, "min_us": 200.0,
        "runtime_waits": got, "sync_warnings": {"w @ s": 3}})
