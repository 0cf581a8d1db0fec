"""Measured collective tables and the FP8 GEMM table: interpolation, the cost model's use of them
in place of the alpha-beta / bf16 figures, the merge of a multi-GPU calibration into a profile."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from costmodels import collectives as C
from costmodels.calib_collectives import calls_per_timing, group_sizes
from costmodels.fit import collective_tables, fit_gemm_fp8
from costmodels.hardware import get_gpu
from costmodels.merge import main as merge_main
from costmodels.merge import merge
from costmodels.model import CostModel
from costmodels.profile import load_profile, read_profile
from costmodels.synthetic import build_graph
from graph.hf_config import load_config
from graph.opgraph import StepShape
from plans.errors import UserError

SIZES = [4096 * 4 ** i for i in range(9)]


@pytest.fixture(scope="module")
def g8():
    return build_graph(load_config("llama-3.1-8b"))


@pytest.fixture(scope="module")
def h200():
    prof = load_profile("h200")  # datasheet links, bf16 table for fp8, no FP8 points, no engine attention tables
    return replace(prof, collectives={}, gemm_fp8=None, gemm_fp8_tensor=None, attn_decode_engine=None,
                   attn_prefill_engine=None,
                   raw={k: v for k, v in prof.raw.items()
                        if k not in ("gemm_fp8", "gemm_fp8_tensor", "attn_decode_engine", "attn_prefill_engine")})


def _points(ms_of, ops=C.FORMULAS, n=2, modes=("eager",)) -> list[dict]:
    return [{"op": op, "bytes": s, "n": n, "mode": mode, "ms": ms_of(op, s, mode)}
            for op in ops for s in SIZES for mode in modes]


def _with_tables(prof, points):
    return replace(prof, collectives={"tables": collective_tables(points)})


def test_group_sizes_and_calls_per_timing():
    assert group_sizes(2) == [2] and group_sizes(8) == [2, 4, 8] and group_sizes(6) == [2, 4] and group_sizes(1) == []
    assert calls_per_timing(4096, 10) == 10 and calls_per_timing(256 << 20, 10) == 2


def test_measured_table_interpolates_between_neighbours():
    m = C.Measured(collective_tables([{"op": "all_reduce", "bytes": b, "n": 2, "ms": us * 1e-3}
                                      for b, us in ((4096, 10.0), (65536, 20.0), (1 << 20, 100.0))]))
    assert m.ms("all_reduce", 65536, 2) == pytest.approx(0.020)  # measured sizes come back
    mid = m.ms("all_reduce", 16384, 2)  # the geometric middle of 4 and 64 KiB: log-log interpolation
    assert 0.010 < mid < 0.020 and mid == pytest.approx((10.0 * 20.0) ** 0.5 * 1e-3)
    assert 0.020 < m.ms("all_reduce", 300_000, 2) < 0.100
    assert m.ms("all_reduce", 100, 2) == pytest.approx(0.010)  # below the table: the latency floor
    assert m.ms("all_reduce", 4 << 20, 2) == pytest.approx(0.400)  # above: bandwidth-bound, t ~ S
    assert m.ms("all_reduce", 65536, 4) is None and m.ms("all_gather", 65536, 2) is None
    assert m.ms("all_reduce", 65536, 2, graph=True) == pytest.approx(0.020)  # no graph table: the eager one


def test_tables_change_step_times_in_the_expected_direction(g8, h200):
    ab = CostModel(g8, "h200", profile=h200)
    slow = CostModel(g8, "h200", profile=_with_tables(h200, _points(
        lambda op, s, mode: 10 * C.FORMULAS[op](s, 2, ab.links.intra))))
    fast = CostModel(g8, "h200", profile=_with_tables(h200, _points(
        lambda op, s, mode: 0.1 * C.FORMULAS[op](s, 2, ab.links.intra))))
    for shape in (StepShape.prefill([2048] * 2), StepShape.decode([1024] * 16)):
        base = ab.step_time(shape, tp=2).stages[0]
        s_, f_ = slow.step_time(shape, tp=2).stages[0], fast.step_time(shape, tp=2).stages[0]
        assert s_.comm_ms == pytest.approx(10 * base.comm_ms, rel=0.05)  # log-log between measured sizes
        assert f_.comm_ms == pytest.approx(0.1 * base.comm_ms, rel=0.05)
        assert f_.total_ms < base.total_ms < s_.total_ms
        assert (s_.compute_ms, s_.memory_ms) == (base.compute_ms, base.memory_ms)
        # 4 GPUs were not measured, and a group across nodes is not the measured link: alpha-beta
        assert slow.step_time(shape, tp=4).total_ms == ab.step_time(shape, tp=4).total_ms
    across = CostModel(g8, "h200", profile=slow.profile, gpus_per_node=1)
    plain = CostModel(g8, "h200", profile=h200, gpus_per_node=1)
    assert across.step_time(StepShape.prefill([512]), tp=2).total_ms == plain.step_time(StepShape.prefill([512]), tp=2).total_ms


def test_decode_steps_read_the_graph_table_prefill_the_eager_one(g8, h200):
    """Graph-timed all-reduce at a quarter of the eager time: decode steps (T = B, replayed as CUDA
    graphs by the engine) pay the graph time, prefill steps the eager one."""
    ab = CostModel(g8, "h200", profile=h200)
    pts = _points(lambda op, s, mode: C.FORMULAS[op](s, 2, ab.links.intra) * (0.25 if mode == "graph" else 1.0),
                  modes=("graph", "eager"))
    both = CostModel(g8, "h200", profile=_with_tables(h200, pts))
    eager = CostModel(g8, "h200", profile=_with_tables(h200, [p for p in pts if p["mode"] == "eager"]))
    dec, pre = StepShape.decode([1024] * 16), StepShape.prefill([2048])
    assert both.step_time(dec, tp=2).stages[0].comm_ms == pytest.approx(
        0.25 * eager.step_time(dec, tp=2).stages[0].comm_ms, rel=1e-3)  # tables hold us to 3 decimals
    assert both.step_time(pre, tp=2).total_ms == eager.step_time(pre, tp=2).total_ms


def test_all_to_all_and_p2p_tables(g8, h200):
    ab = CostModel(g8, "h200", profile=h200)
    slow = CostModel(g8, "h200", profile=_with_tables(h200, _points(
        lambda op, s, mode: 10 * (C.p2p_ms(s, ab.links.intra) if op == "p2p" else C.FORMULAS[op](s, 2, ab.links.intra)),
        ops=("all_to_all", "p2p"))))
    shape = StepShape.prefill([4096])
    # Ulysses all-to-alls (sp_tp mode, sp = 2) slower; shifted TP (an all-reduce over 2, not measured) as before
    assert slow.step_time(shape, sp=2, mode="sp_tp").total_ms > ab.step_time(shape, sp=2, mode="sp_tp").total_ms
    assert slow.step_time(shape, sp=2, mode="tp").total_ms == ab.step_time(shape, sp=2, mode="tp").total_ms
    act = 4096 * 4096 * 2.0
    assert slow.p2p_ms(act, inter_node=False) == pytest.approx(10 * ab.p2p_ms(act, inter_node=False), rel=0.05)
    assert slow.p2p_ms(act, inter_node=True) == ab.p2p_ms(act, inter_node=True)
    assert slow.step_time(shape, pp=2).p2p_ms[0] > ab.step_time(shape, pp=2).p2p_ms[0]


def _calib(h200) -> dict:
    """A calibration as bench/calibrate_comm_fp8.py writes it: FP8 GEMMs at the bf16 GEMMs' times
    (half the efficiency at twice the peak), collectives at a flat 30 us (eager) and 10 us (graph)."""
    fp8 = [dict(p) for p in h200.raw["gemm"] if p["m"] >= 16 and p["m"] % 16 == 0]
    coll = [{"op": op, "bytes": s, "n": 2, "mode": mode, "ms": 0.03 if mode == "eager" else 0.01}
            for op in ("all_reduce", "all_gather") for s in SIZES[:3] for mode in ("eager", "graph")]
    return {"meta": {"device_name": "NVIDIA H200", "driver": "580.0", "torch": "2.11.0", "date": "2026-12-01"},
            "collectives": coll, "collectives_errors": [{"op": "p2p", "n": 2, "mode": "eager", "error": "x"}],
            "collectives_meta": {"world": 2}, "gemm_fp8": fp8, "skipped": [], "overhead_us": 1.0}


def test_merge_adds_the_tables_and_keeps_the_rest(g8, h200):
    calib = _calib(h200)
    out = merge(h200, calib)
    assert out.id == f"{h200.id}+2026-12-01" and out.meta["merged"]["gemm_fp8_points"] == len(calib["gemm_fp8"])
    assert out.meta["merged"]["collective_errors"] == calib["collectives_errors"]
    assert out.collectives["meta"]["group_sizes"] == [2] and out.collectives["meta"]["driver"] == "580.0"
    assert out.gemm.values == h200.gemm.values and out.attn_decode.values == h200.attn_decode.values
    for m, n, k in ((4096, 4096, 4096), (64, 6144, 1536)):
        assert out.gemm_fp8(m, n, k) == pytest.approx(out.gemm(m, n, k) / 2, rel=0.03)
    assert out.gemm_fp8(4096, 4096, 4096) == fit_gemm_fp8(calib["gemm_fp8"], "h200", h200.overhead_us)(4096, 4096, 4096)
    cm = CostModel(g8, "h200", weights_dtype="fp8", profile=out)
    assert cm.fp8_gemm_source == "measured"
    assert cm.links.ms("all_reduce", 8192, 2) == pytest.approx(0.03) and cm.links.ms("all_reduce", 8192, 2, graph=True) == pytest.approx(0.01)
    with pytest.raises(UserError, match="H100"):
        merge(h200, {**calib, "meta": {**calib["meta"], "device_name": "NVIDIA H100 80GB HBM3"}})
    with pytest.raises(UserError, match="nothing to merge"):
        merge(h200, {**calib, "collectives": [], "gemm_fp8": []})


def test_merge_command_writes_a_profile_that_reads_back(tmp_path, h200):
    src, dst = tmp_path / "comm_fp8.json", tmp_path / "h200.json"
    src.write_text(json.dumps(_calib(h200)))
    base = tmp_path / "base.json"
    base.write_text(json.dumps(h200.to_json()))
    assert merge_main([str(src), str(base), "-o", str(dst)]) == 0
    back = read_profile(dst)
    assert back.gemm_fp8 is not None and back.collectives["tables"]["graph"]["all_reduce"]["2"]["us"] == [10.0] * 3
    assert read_profile(base).gemm_fp8 is None  # -o leaves the source profile alone


def test_fp8_and_collectives_are_skipped_with_a_reason_on_cpu():
    from costmodels.calibrate import Grids, run_comm_fp8

    raw = run_comm_fp8(budget_s=30, grids=Grids.cpu_dry_run(), log=lambda _: None)
    assert raw["gemm_fp8"] == [] and "collectives" not in raw
    assert any("gemm_fp8" in s and "no FP8" in s for s in raw["skipped"])
    assert any(s.startswith("collectives") for s in raw["skipped"])


def test_merge_records_versions_and_command(h200):
    """meta.merged names the device, driver, torch, CUDA and NCCL versions, the date and the calibration
    command; --meta fills in what an older calibration file lacks without overriding what it has."""
    calib = _calib(h200)
    out = merge(h200, calib, extra_meta={"nccl": "2.28.9", "command": "python bench/calibrate_comm_fp8.py --out D",
                                         "driver": "999"})
    m = out.meta["merged"]
    assert (m["nccl"], m["command"], m["driver"], m["torch"], m["date"]) == (
        "2.28.9", "python bench/calibrate_comm_fp8.py --out D", "580.0", "2.11.0", "2026-12-01")
    assert out.collectives["meta"]["nccl"] == "2.28.9"


def test_merge_command_rejects_an_unknown_meta_key(tmp_path, h200, capsys):
    src = tmp_path / "comm_fp8.json"
    src.write_text(json.dumps(_calib(h200)))
    assert merge_main([str(src), str(tmp_path / "x.json"), "--meta", "colour=blue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_merge_command_names_a_calibration_whose_points_lack_their_fields(tmp_path, capsys):
    """Engine prefill points without their head counts: one line naming the file and the missing
    field, exit 2, the profile left as it was."""
    src, base = tmp_path / "comm_fp8.json", tmp_path / "h200.json"
    src.write_text(json.dumps({"meta": {"device_name": "NVIDIA H200"}, "attn_prefill_engine": [{"kind": "prefill", "L": 16}]}))
    base.write_text((Path(__file__).parents[1] / "costmodels/profiles/h200.json").read_text())
    before = base.read_text()
    assert merge_main([str(src), str(base)]) == 2
    err = capsys.readouterr().err
    assert "comm_fp8.json" in err and "'heads'" in err and "Traceback" not in err and base.read_text() == before


def test_collective_fit_reads_the_graph_timed_all_reduce():
    """Eager small collectives are bounded by the host's launch rate: the alpha-beta fit that serves larger
    groups reads the graph-timed all-reduce where there is one, 1 us per ring step, the rest in alpha0."""
    from costmodels.fit import fit_collectives

    pts = [{"op": "all_reduce", "bytes": s, "n": 2, "mode": mode, "ms": (floor + s / 300e9 * 1e6) * 1e-3}
           for s in SIZES for mode, floor in (("eager", 50.0), ("graph", 11.0))]
    fit = fit_collectives(pts)
    assert fit["alpha_us"] == 1.0 and fit["alpha0_us"] == pytest.approx(9.0, abs=0.05)
    assert fit["bus_gbps"] == pytest.approx(300, rel=0.02)
    eager_only = fit_collectives([p for p in pts if p["mode"] == "eager"])
    assert eager_only["alpha0_us"] + 2 * eager_only["alpha_us"] == pytest.approx(50.0, abs=0.5)


def test_a_small_m_fp8_calibration_replaces_only_its_points(h200):
    """A run over the decode rows only (``--fp8-only --max-m 256``) merged into a profile that holds a
    whole FP8 grid: its points replace the profile's of the same (m, n, k), new rows (M below 16)
    are added, the large-M points stay (and with them the table there); the earlier merge's record
    moves to ``merge_history``."""
    full = merge(h200, _calib(h200))
    old = full.raw["gemm_fp8"]
    nks = sorted({(p["n"], p["k"]) for p in old})
    small = [{"m": m, "n": n, "k": k, "ms": 0.004, "kernel": "triton_w8a16"}
             for m in (1, 4, 16, 64, 256) for n, k in nks]
    calib = {"meta": {"device_name": "NVIDIA H200", "date": "2026-12-02", "command": "python bench/calibrate_comm_fp8.py "
                      "--out D --fp8-only --max-m 256"}, "gemm_fp8": small, "skipped": ["collectives (--fp8-only)"]}
    out = merge(full, calib)
    pts = out.raw["gemm_fp8"]
    shapes = [(p["m"], p["n"], p["k"]) for p in pts]
    assert len(shapes) == len(set(shapes)) and len(pts) == len(old) + 2 * len(nks)  # M = 1 and 4 are new
    by = {s: p for s, p in zip(shapes, pts)}
    assert by[(16, nks[0][0], nks[0][1])]["ms"] == 0.004 and by[(16, nks[0][0], nks[0][1])]["kernel"] == "triton_w8a16"
    big = [p for p in old if p["m"] > 256]
    assert big and all(by[(p["m"], p["n"], p["k"])] == p for p in big)
    m = out.meta["merged"]
    assert m["gemm_fp8_points"] == len(small) and m["gemm_fp8_points_kept"] == len(old) - 3 * len(nks)
    assert m["gemm_fp8_points_dropped"] == 0  # no row limit recorded: nothing but the same shapes replaced
    assert m["collective_points"] == 0 and out.collectives == full.collectives  # no collectives: the tables stay
    history = full.meta.get("merge_history", [])
    assert out.meta["merge_history"] == [*history, full.meta["merged"]] and out.id == f"{full.id}+fp8-2026-12-02"
    assert out.gemm_fp8(4096, 6144, 6144) == pytest.approx(full.gemm_fp8(4096, 6144, 6144))
    n, k = nks[-1]
    assert out.gemm_fp8(16, n, k) == fit_gemm_fp8(pts, "h200", h200.overhead_us)(16, n, k)
    assert out.gemm_fp8(16, n, k) != pytest.approx(full.gemm_fp8(16, n, k), rel=0.01)
    assert out.gemm_fp8(1, n, k) < out.gemm_fp8(16, n, k)  # one row in the same 4 us: 1/16 of the work


def test_a_row_limited_fp8_run_leaves_no_older_kernel_in_its_rows(h200):
    """A run that records its row limit (``gemm_fp8_max_m``) and was cut to some (N, K) pairs: up to the
    limit the profile's points of another kernel (or none named) go, so the fit fills the pairs the run
    did not reach from the run's own points, as the bf16 table's shape scaled by the row's nearest
    measured cells; a point naming the kernel the run used at its M stays, rows above the limit stay."""
    full = merge(h200, _calib(h200))  # FP8 at the bf16 times, no kernel named (an older calibration)
    nks = sorted({(p["n"], p["k"]) for p in full.raw["gemm_fp8"]})
    reached, missed = nks[::2], nks[1::2]
    same = {"m": 64, "n": missed[0][0], "k": missed[0][1], "ms": 0.5, "kernel": "triton_w8a8"}
    other = {"m": 16, "n": missed[1][0], "k": missed[1][1], "ms": 0.5, "kernel": "scaled_mm_rowwise"}
    old = [p for p in full.raw["gemm_fp8"] if (p["m"], p["n"], p["k"]) not in {(16, *missed[1]), (64, *missed[0])}]
    base = replace(full, raw={**full.raw, "gemm_fp8": [*old, same, other]})
    bf16 = {(p["m"], p["n"], p["k"]): p["ms"] for p in h200.raw["gemm"]}
    rows = (1, 16, 64, 256)
    new = [{"m": m, "n": n, "k": k, "ms": 0.7 * bf16[(m, n, k)], "kernel": "triton_w8a16" if m <= 32 else "triton_w8a8"}
           for m in rows for n, k in reached]
    calib = {"meta": {"device_name": "NVIDIA H200", "date": "2026-12-03"}, "gemm_fp8": new, "gemm_fp8_max_m": 256}
    out = merge(base, calib)
    pts = out.raw["gemm_fp8"]
    low = [p for p in pts if p["m"] <= 256]
    assert [p for p in low if p not in new] == [same]
    assert [p for p in pts if p["m"] > 256] == [p for p in base.raw["gemm_fp8"] if p["m"] > 256]
    m = out.meta["merged"]
    fresh = {(p["m"], p["n"], p["k"]) for p in new}
    left = [p for p in base.raw["gemm_fp8"] if p["m"] <= 256 and (p["m"], p["n"], p["k"]) not in fresh]
    assert m["gemm_fp8_points_dropped"] == len(left) - 1 > 0
    assert m["gemm_fp8_points_kept"] + len(new) == len(pts)

    def fp8_ms(prof, m, n, k):
        return 2 * m * n * k / (prof.gemm_fp8(m, n, k) * get_gpu("h200").fp8_tflops * 1e12) * 1e3 + prof.overhead_us * 1e-3

    for row in (16, 256):  # every pair not reached follows the bf16 table's shape (the nearest efficiency: not)
        assert [fp8_ms(out, row, n, k) / bf16[(row, n, k)] for n, k in missed] == pytest.approx([0.7] * len(missed), rel=0.03)
    n, k = missed[-1]  # the largest pair the run did not reach
    assert fp8_ms(full, 16, n, k) == pytest.approx(bf16[(16, n, k)], rel=0.05)  # the older points' figure
    assert out.gemm_fp8(4096, n, k) == full.gemm_fp8(4096, n, k)
    plain = merge(base, {k_: v for k_, v in calib.items() if k_ != "gemm_fp8_max_m"})  # no limit: a checkerboard
    assert fp8_ms(plain, 16, n, k) == pytest.approx(bf16[(16, n, k)], rel=0.05)


def test_fp8_calibration_times_the_engine_call(monkeypatch):
    """Each FP8 point times ``executors.quant.linear`` on an ``Fp8Weight`` at the grid's M as it is
    (no rounding to 16), rows up to ``max_m``, and names the kernel ``quant.kernel_for`` gives; an
    ``--fp8-only`` run skips the collectives and records its row limit."""
    import torch

    from costmodels import calibrate
    from costmodels.gpu_bench import Timer
    from executors import quant

    calls = []
    real = quant.linear

    def linear(x, w, *a, **kw):
        assert isinstance(w, quant.Fp8Weight) and w.q.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16
        calls.append(tuple(x.shape))
        return real(x, w, *a, **kw)

    monkeypatch.setattr(calibrate, "fp8_supported", lambda dev: True)
    monkeypatch.setattr(quant, "linear", linear)
    grids = calibrate.Grids.cpu_dry_run()
    dev = torch.device("cpu")
    skipped: list = []
    pts = calibrate._fp8_gemms(grids, dev, Timer(dev), torch.Generator().manual_seed(0), lambda: False, skipped, max_m=8)
    assert sorted({p["m"] for p in pts}) == [m for m in grids.gemm_m if m <= 8] == [1, 8]
    assert len(pts) == 2 * len(grids.gemm_nk) ** 2 and not skipped
    assert all(p["kernel"] == "dequant" and p["ms"] > 0 for p in pts)  # the CPU's path
    assert {(1, 64), (8, 256)} <= set(calls)
    raw = calibrate.run_comm_fp8(budget_s=30, grids=grids, log=lambda _: None, fp8_only=True, max_m=8)
    assert "collectives (--fp8-only)" in raw["skipped"] and raw["gemm_fp8_max_m"] == 8
    assert {p["m"] for p in raw["gemm_fp8"]} == {1, 8}
    # two shards measure the grid between them, each pair once
    halves = [calibrate._fp8_gemms(grids, dev, Timer(dev), torch.Generator().manual_seed(0), lambda: False, [],
                                   max_m=1, shard=(i, 2)) for i in range(2)]
    pairs = [{(p["n"], p["k"]) for p in h} for h in halves]
    assert pairs[0] and pairs[1] and not pairs[0] & pairs[1]
    assert pairs[0] | pairs[1] == {(p["n"], p["k"]) for p in pts}


def test_calibrate_comm_fp8_script_takes_fp8_only_and_max_m(tmp_path, monkeypatch, capsys):
    """``bench/calibrate_comm_fp8.py --fp8-only --max-m 8`` passes both on and records its command; bad
    options and ``--decode-engine`` without a GPU exit 2 with one line."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import calibrate_comm_fp8
    from costmodels import calibrate

    seen = {}

    def fake(**kw):
        seen.update(kw)
        return {"meta": {}, "skipped": [], "gemm_fp8": [], "seconds": 0.0}

    monkeypatch.setattr(calibrate, "run_comm_fp8", fake)
    assert calibrate_comm_fp8.main(["--out", str(tmp_path), "--fp8-only", "--max-m", "8", "--budget-s", "5"]) == 0
    assert seen == {"budget_s": 5.0, "collectives_s": 90.0, "fp8_only": True, "max_m": 8, "shard": (0, 1), "fp8_kernel": "engine"}
    raw = json.loads((tmp_path / "comm_fp8.json").read_text())
    assert raw["meta"]["command"] == "python bench/calibrate_comm_fp8.py --out DIR --fp8-only --max-m 8 --budget-s 5"
    assert calibrate_comm_fp8.main(["--out", str(tmp_path), "--fp8-only", "--shard", "1/2"]) == 0
    assert seen["shard"] == (1, 2)
    with pytest.raises(SystemExit) as e:  # argparse: one line naming the option, exit code 2
        calibrate_comm_fp8.main(["--out", str(tmp_path), "--shard", "2/2"])
    assert e.value.code == 2
    monkeypatch.setattr(calibrate, "_device", lambda: None)  # no GPU: --decode-engine names why, exit 2
    with pytest.raises(SystemExit) as e:
        calibrate_comm_fp8.main(["--out", str(tmp_path), "--decode-engine"])
    assert e.value.code == 2 and "CUDA GPU" in capsys.readouterr().err


def test_merge_with_a_row_limit_takes_only_the_rows_up_to_it(h200):
    """``merge(..., max_m=64)`` (``--max-m 64``): a run's points above 64 rows timed a kernel the engine no
    longer routes them to, so they do not come in, and the profile's points there stay."""
    full = merge(h200, _calib(h200))
    old = {(p["m"], p["n"], p["k"]): p for p in full.raw["gemm_fp8"]}
    nks = sorted({(p["n"], p["k"]) for p in old.values()})
    run = [{"m": m, "n": n, "k": k, "ms": 0.25, "kernel": "triton_w8a8" if m > 32 else "triton_w8a16"}
           for m in (16, 64, 256) for n, k in nks]
    calib = {"meta": {"device_name": "NVIDIA H200", "date": "2026-12-03", "command": "c"}, "gemm_fp8": run,
             "gemm_fp8_max_m": 1024, "skipped": []}
    out = merge(full, calib, max_m=64)
    by = {(p["m"], p["n"], p["k"]): p for p in out.raw["gemm_fp8"]}
    n, k = nks[0]
    assert by[(16, n, k)]["ms"] == by[(64, n, k)]["ms"] == 0.25
    assert by[(256, n, k)] == old[(256, n, k)]  # above the limit: the profile's point
    assert out.meta["merged"]["gemm_fp8_points"] == 2 * len(nks) and out.meta["merged"]["gemm_fp8_max_m"] == 64
    from costmodels import merge as merge_mod

    assert merge_mod.main(["/nonexistent.json", "x.json", "--max-m", "64"]) == 2  # a missing file: exit 2


def test_per_tensor_fp8_points_make_their_own_table_read_for_tensorrt_plans(g8, h200):
    """``--fp8-kernel tensor`` points go to ``gemm_fp8_tensor`` (the engine's ``gemm_fp8`` stays); a
    cost model for a ``tensorrt`` backend reads them, any other backend the engine's table."""
    from costmodels.model import fp8_kernels_for
    from graph.opgraph import StepShape

    calib = _calib(h200)
    engine = merge(h200, calib)  # engine FP8 = the bf16 times
    faster = [dict(p, ms=p["ms"] / 2, kernel="scaled_mm_tensor") for p in calib["gemm_fp8"]]
    out = merge(engine, {"meta": {**calib["meta"], "date": "2026-12-02"}, "gemm_fp8_tensor": faster})
    assert out.id == f"{engine.id}+fp8t-2026-12-02" and out.meta["merged"]["gemm_fp8_tensor_points"] == len(faster)
    assert out.gemm_fp8.values == engine.gemm_fp8.values and len(out.raw["gemm_fp8_tensor"]) == len(faster)
    assert read_profile_json(out).gemm_fp8_tensor.values == out.gemm_fp8_tensor.values
    assert (fp8_kernels_for("tensorrt"), fp8_kernels_for("compile"), fp8_kernels_for(None)) == ("tensor", "engine", "engine")
    trt = CostModel(g8, "h200", weights_dtype="fp8", profile=out, fp8_kernels="tensor")
    eng = CostModel(g8, "h200", weights_dtype="fp8", profile=out)
    assert (trt.fp8_gemm_source, eng.fp8_gemm_source) == ("measured, per-tensor scales", "measured")
    shape = StepShape.prefill([4096])
    ratio = trt.step_time(shape).stages[0].compute_ms / eng.step_time(shape).stages[0].compute_ms
    assert 0.45 < ratio < 0.6  # the linears at half the time; attention unchanged


def read_profile_json(p):
    from costmodels.profile import Profile

    return Profile.from_json(json.loads(json.dumps(p.to_json())))


def test_engine_decode_points_make_a_table_read_by_engine_plans_at_their_kv_heads(g8, h200):
    """``--decode-engine`` points (the engine's paged kernel, several KV head counts) become
    ``attn_decode_engine``: plans this repo's engine runs (its measured step terms, ``launch``) price
    decode attention from it at their GPU's KV heads; plans for another engine keep the SDPA table. Points at twice SDPA's time with 8 KV heads and
    four times with 4: Llama-3.1-8B's decode attention (8 KV heads) costs twice SDPA's alone, under
    TP2 (4 a GPU) four times."""
    from costmodels.calibrate import Grids

    from costmodels.opcost import op_time

    ovh = h200.overhead_us * 1e-3
    sdpa = {(p["B"], p["C"]): p["ms"] - ovh for p in h200.raw["attn_decode"]}  # 8 KV heads
    pts = [{"B": b, "C": c, "heads": 5 * kv, "kv_heads": kv, "head_dim": 128, "kernel": "paged_decode",
            "ms": ms * kv / 8 * (2 if kv == 8 else 4) + ovh} for (b, c), ms in sdpa.items() for kv in (8, 4)]
    calib = {"meta": {"device_name": "NVIDIA H200", "date": "2026-12-03"}, "attn_decode_engine": pts}
    out = merge(h200, calib)
    assert out.id == f"{h200.id}+dec-2026-12-03" and out.meta["merged"]["attn_decode_engine_points"] == len(pts)
    assert read_profile_json(out).attn_decode_engine.values == out.attn_decode_engine.values
    assert out.attn_decode.values == h200.attn_decode.values
    shape = StepShape.decode([1536] * 48)

    def attn_ms(cm, tp=1):
        attn = next(r for r in cm._recs[cm.decoders[0].name] if r.kind == "attention")
        c, m, _ = op_time(attn, shape, tp, 1, cm.rates, cm.profile)
        return max(c, m)

    from costmodels.steps import launch_for

    launch = launch_for(out, "shiftplan", "compile")
    assert launch is not None and launch_for(out, "vllm", "compile") is None
    eng, other = CostModel(g8, "h200", profile=out, launch=launch), CostModel(g8, "h200", profile=out)
    trt = CostModel(g8, "h200", profile=out, fp8_kernels="tensor")
    assert attn_ms(other) == attn_ms(trt)
    assert attn_ms(eng) / attn_ms(trt) == pytest.approx(2, rel=0.1)
    assert attn_ms(eng, tp=2) / attn_ms(trt, tp=2) == pytest.approx(4, rel=0.1)
    assert 4 in Grids.full().dec_kv_heads and 1 in Grids.full().dec_kv_heads


def _prefill_engine_points(eff: dict[int, float], dec_eff: dict[int, float], ovh_ms: float) -> list[dict]:
    """Synthetic ``--engine-attention`` prefill-kernel points at a constant efficiency per group:
    ``eff[group]`` of the bf16 peak on prefill chunks, ``dec_eff[group]`` of HBM bandwidth on 16 decode
    rows and a tenth of it on one."""
    from costmodels.fit import decode_attention_bytes

    gpu, D = get_gpu("h200"), 128
    pts = []
    for kv in (8, 4, 2, 1):
        for g in eff:
            h = kv * g
            pts += [{"kind": "prefill", "L": L, "B": B, "C": L, "heads": h, "kv_heads": kv, "head_dim": D,
                     "kernel": "paged_prefill",
                     "ms": 4 * h * D * B * L * (L + 1) / 2 / (eff[g] * gpu.bf16_tflops * 1e12) * 1e3 + ovh_ms}
                    for L in (16, 256, 2048) for B in (1, 4)]
            pts += [{"kind": "decode", "L": 1, "B": B, "C": C, "heads": h, "kv_heads": kv, "head_dim": D,
                     "kernel": "paged_prefill",
                     "ms": decode_attention_bytes(B, C, h, kv, D) / (dec_eff[g] * (1 if B == 16 else 0.1)
                                                                   * gpu.hbm_tbps * 1e12) * 1e3 + ovh_ms}
                    for B in (1, 16) for C in (128, 2048)]
    return pts


def test_engine_prefill_points_price_the_steps_that_run_the_paged_prefill_kernel(g8, h200):
    """``--engine-attention``'s paged prefill kernel points on prefill chunks become
    ``attn_prefill_engine`` (compute), read at the model's query heads per KV head padded to a power of
    two; its points on decode rows (an earlier engine's graphed mixed steps) change nothing. This
    engine's steps that run the kernel read it: a graphed prefill (up to the largest token bucket) and
    an eager one of two or more chunks; an eager single prompt keeps cuDNN's table, and so do other
    engines. A mixed step's decodes, graphed or not, are priced as the decode kernel's."""
    from costmodels.opcost import op_time
    from costmodels.steps import launch_for
    from costmodels.synthetic import build_graph as build

    ovh = h200.overhead_us * 1e-3
    eff, dec_eff = {4: 0.2, 8: 0.1}, {4: 0.25, 8: 0.125}
    calib = {"meta": {"device_name": "NVIDIA H200", "date": "2026-12-04"},
             "attn_prefill_engine": _prefill_engine_points(eff, dec_eff, ovh)}
    out = merge(h200, calib)
    assert out.id == f"{h200.id}+pre-2026-12-04" and out.meta["merged"]["attn_prefill_engine_points"] == len(calib["attn_prefill_engine"])
    back = read_profile_json(out)
    assert back.attn_prefill_engine.values == out.attn_prefill_engine.values
    chunks_only = merge(h200, {**calib, "attn_prefill_engine": [p for p in calib["attn_prefill_engine"]
                                                                if p["kind"] == "prefill"]})
    assert chunks_only.attn_prefill_engine.values == out.attn_prefill_engine.values
    assert out.attn_causal.values == h200.attn_causal.values
    launch = launch_for(out, "shiftplan", "compile")
    qwen = build(load_config("qwen2-vl-7b"))  # 28 query heads over 4 KV heads: a group of 7, run as 8
    for graph, group in ((g8, 4), (qwen, 8)):
        eng, other = CostModel(graph, "h200", profile=out, launch=launch), CostModel(graph, "h200", profile=out)
        attn = next(r for r in eng._recs[eng.decoders[0].name] if r.kind == "attention")
        real = attn.heads / attn.kv_heads
        for shape in (StepShape.prefill([512]), StepShape.prefill([1600, 1600])):  # graphed; eager, two chunks
            c, _, _ = op_time(attn, shape, 1, 1, eng.rates, eng.profile, paged=True)
            assert c == pytest.approx(attn.flops(shape) * group / real / (eng.rates.attn_flops * eff[group]) * 1e3, rel=1e-6)
            assert c != op_time(attn, shape, 1, 1, eng.rates, eng.profile)[0]  # not cuDNN's table
        layer = eng.decoders[0]

        def attn_part(cm, shape):
            return cm.block_time(layer, shape).total_ms - cm.block_time(layer, replace(shape, pairs=0.0, kv=0.0)).total_ms

        for shape in (StepShape.prefill([512]), StepShape.prefill([1600, 1600]), StepShape.prefill([3000])):
            paged = shape.seqs >= 2 or shape.tokens <= 2048
            priced = op_time(attn, shape, 1, 1, eng.rates, eng.profile, paged=paged)
            want = max(priced[0], priced[1]) - max(op_time(attn, replace(shape, pairs=0.0, kv=0.0), 1, 1, eng.rates,
                                                            eng.profile)[:2])
            assert attn_part(eng, shape) == pytest.approx(want, rel=1e-6)
            assert attn_part(other, shape) == pytest.approx(attn_part(CostModel(graph, "h200", profile=h200), shape))
        # a graphed mixed step: its chunks in this kernel, its decodes priced as a decode step's (the decode kernel)
        mixed, dec = StepShape.from_sequences([300] + [1] * 16, [300] + [128] * 15 + [2048])
        pre = StepShape.prefill([300])
        both, chunk, decodes = (op_time(attn, s, 1, 1, eng.rates, eng.profile, paged=p)
                                for s, p in ((mixed, True), (pre, True), (dec, False)))
        assert both[:2] == pytest.approx((chunk[0] + decodes[0], chunk[1] + decodes[1]), rel=1e-9)
        assert chunk[0] != op_time(attn, pre, 1, 1, eng.rates, eng.profile)[0]  # the chunk: this kernel's table


def test_paged_prefill_calibration_cases_are_what_a_step_graph_hands_the_kernel():
    """``gpu_bench.paged_prefill_case`` (the calibration's and the launch sweep's inputs): B sequences of
    n new tokens after C - n cached keys, each one's blocks in order in a table row as wide as a step
    graph's key bucket, its programs cut at ``block_m`` tokens; a decode row is one token of C keys."""
    from costmodels.gpu_bench import paged_prefill_case
    from plans.engine_shapes import keys_bucket

    q, k, v, table, t0, nq, ctx, seq_of, row0 = paged_prefill_case(3, 40, 100, 8, 2, 16, 16, device="cpu")
    assert q.shape == (120, 8, 16) and k.shape == v.shape == (3 * 7 * 16 + 1, 2, 16)
    assert table.shape == (3, keys_bucket(100) // 16) and table[1, :7].tolist() == list(range(7, 14))
    assert not table[:, 7:].any() and t0.tolist() == [0, 40, 80] and nq.tolist() == [40] * 3 and ctx.tolist() == [100] * 3
    assert seq_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and row0.tolist() == [0, 16, 32, 40, 56, 72, 80, 96, 112]
    *_, dseq, drow = paged_prefill_case(4, 1, 2048, 8, 2, 16, 16, device="cpu")
    assert dseq.tolist() == [0, 1, 2, 3] and drow.tolist() == [0, 1, 2, 3]
