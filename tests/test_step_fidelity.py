"""bench/step_fidelity.py: a traced step's shape rebuilt from its records, its period on the engine's
timeline, and the sums by kind of step, by hand."""

from __future__ import annotations

import pytest

from bench import step_fidelity as sf
from costmodels.simulator.coster import SyntheticCoster
from graph.opgraph import StepShape


def rec(step, sent, answered, new, ctx, replica=0, images=0):
    return {"step": step, "replica": replica, "tokens": sum(new), "seqs": len(new), "new": [new], "ctx": [ctx],
            "images": images, "mode": ["tp"], "sent_ms": sent, "answered_ms": answered,
            "rank": {"forward_gpu_ms": 1.0, "sample_gpu_ms": 0.5, "images_gpu_ms": 0.0, "other": 9}}


def test_a_mixed_step_is_its_prefill_part_plus_its_decode_part():
    shape, dec = StepShape.from_sequences([5, 1, 1], [8, 20, 30])  # a 5-token chunk after 3 cached; two decodes
    p, d = StepShape.prefill([5], [3]), StepShape.decode([20, 30])
    assert dec == d
    assert (shape.tokens, shape.pairs, shape.kv, shape.seqs) == (7, p.pairs + 50, 8 + 50, 3)
    assert (shape.decode_seqs, shape.decode_kv) == (2, 50)
    assert StepShape.from_sequences([1, 1], [4, 6]) == (StepShape.decode([4, 6]), None)
    assert StepShape.from_sequences([4], [4]) == (StepShape.prefill([4]), None)


def test_periods_gaps_and_kinds():
    recs = [rec(1, 0.0, 10.0, [6, 4], [6, 4]),  # prefill
            rec(2, 5.0, 14.0, [1, 1], [7, 5]),  # decode sent ahead: its period starts at the last answer
            rec(3, 20.0, 30.0, [3, 1], [3, 8]),  # mixed, sent 6 ms after the last answer
            rec(4, 31.0, 40.0, [1], [4], images=1)]
    rows = sf.cost_steps(recs, SyntheticCoster())
    assert [r["kind"] for r in rows] == ["prefill", "decode", "mixed", "image"]
    assert [r["period_ms"] for r in rows] == [10.0, 4.0, 10.0, 9.0]
    assert [r["gap_ms"] for r in rows] == [0.0, 0.0, 6.0, 1.0]
    c = SyntheticCoster().tp  # affine: c + t*T + k*K
    assert rows[0]["predicted_ms"] == pytest.approx(c[0] + c[1] * 10 + c[2] * StepShape.prefill([6, 4]).pairs + c[3] * 10)
    assert all(r["gpu_ms"] == 1.5 for r in rows)
    s = sf.summarize(rows)
    assert s["all"]["steps"] == 4 and s["all"]["period_sum_ms"] == 33.0 and s["all"]["gap_sum_ms"] == 7.0
    assert s["all"]["predicted_over_period"] == pytest.approx(sum(r["predicted_ms"] for r in rows) / 33.0, abs=1e-3)
    assert s["decode"]["steps"] == 1 and s["decode"]["period_p50_ms"] == 4.0
    assert sf.compact(recs)[0]["rank"] == {"forward_gpu_ms": 1.0, "sample_gpu_ms": 0.5, "images_gpu_ms": 0.0}


def test_decode_steps_by_batch_and_spread_of_contexts():
    """``decode_by_batch``: decode steps grouped by batch band and by longest / mean context (the
    decodes' own keys, not a mixed step's prefill chunk), each group's medians and predicted / GPU."""
    recs = [rec(1, 0.0, 1.0, [1, 1], [100, 110]),  # batch 2, even
            rec(2, 1.0, 2.0, [1, 1], [100, 400]),  # batch 2, spread (400 >= 1.5 x 250)
            rec(3, 2.0, 3.0, [1] * 9, [50] * 8 + [500]),  # batch 9, spread
            rec(4, 3.0, 4.0, [7, 1], [7, 30])]  # mixed: not a decode step
    rows = sf.cost_steps(recs, SyntheticCoster())
    assert (rows[1]["decode_ctx_mean"], rows[1]["decode_ctx_max"]) == (250.0, 400)
    assert (rows[3]["decode_ctx_mean"], rows[3]["decode_ctx_max"]) == (30.0, 30)
    groups = sf.decode_by_batch(rows)
    assert [(g["batch"], g["spread"], g["steps"]) for g in groups] == [("1-7", False, 1), ("1-7", True, 1), ("8-15", True, 1)]
    assert groups[2]["ctx_max_p50"] == 500 and groups[2]["ctx_mean_p50"] == 100
    assert groups[0]["predicted_over_gpu"] == pytest.approx(rows[0]["predicted_ms"] / 1.5, abs=1e-3)
    assert len(sf.markdown_decode([("m c", "0.9", groups)])) == 2 + 3


def test_unreadable_or_mismatched_steps_files_are_usage_errors(tmp_path):
    """A steps file that is not gzipped JSON, or names a case its report lacks: one message, exit 2
    (``bench/step_fidelity.py`` and ``fidelity_2gpu.py --repredict``)."""
    import json

    from bench import fidelity_2gpu as fid

    report = tmp_path / "fidelity_2gpu.json"
    report.write_text(json.dumps({"models": {}, "duration_s": 1.0, "seed": 0}))
    (tmp_path / sf.STEPS_FILE).write_bytes(b"not gzip")
    for main, argv in ((sf.main, [str(report)]), (fid.main, ["--out", str(tmp_path / "o"), "--repredict", str(report)])):
        with pytest.raises(SystemExit) as bad:
            main(argv)
        assert bad.value.code == 2
    sf.write_steps(tmp_path / sf.STEPS_FILE, {"llama": {"single": {"0.2": []}}})
    with pytest.raises(SystemExit) as bad:
        sf.main([str(report)])
    assert bad.value.code == 2


def test_an_image_step_is_predicted_with_its_tower_time_where_the_record_names_patches():
    """A traced image step naming its images' patches is charged the tower as the simulator charges
    in-step encoding (``coster.vision_ms`` over the encoder's TP x replicas); without ``patches``
    (an older trace) or without an encoder (dedicated placement) only the LLM's part."""
    from types import SimpleNamespace

    coster = SyntheticCoster()
    old = rec(1, 0.0, 10.0, [6], [6], images=2)
    new = dict(old, patches=[1024, 4096])
    enc = SimpleNamespace(tp=2, dp=1)
    llm = sf.cost_steps([old], coster, enc)[0]["predicted_ms"]
    with_tower = sf.cost_steps([new], coster, enc)[0]["predicted_ms"]
    assert with_tower - llm == pytest.approx(coster.vision_ms((1024, 4096), tp=2, dp=1)) and with_tower > llm
    assert sf.cost_steps([new], coster, None)[0]["predicted_ms"] == llm
    assert sf.compact([new])[0]["patches"] == [1024, 4096]


def test_image_steps_split_into_the_tower_and_the_llms_part():
    """``image_split``: the image steps whose tower was predicted, each part's predicted / GPU sums (the
    tower against ``images_gpu_ms``, the rest against forward + sampling); steps without patches, and
    other kinds, are left out; no such step: None."""
    from types import SimpleNamespace

    coster, enc = SyntheticCoster(), SimpleNamespace(tp=1, dp=1)
    a = dict(rec(1, 0.0, 10.0, [6], [6], images=1), patches=[1024])
    b = dict(rec(2, 10.0, 30.0, [8, 1], [8, 40], images=1), patches=[4096, 1024])
    a["rank"] = dict(a["rank"], images_gpu_ms=2.0)
    b["rank"] = dict(b["rank"], images_gpu_ms=6.0)
    old = rec(3, 30.0, 40.0, [5], [5], images=1)  # no patches: its tower unpriced
    rows = sf.cost_steps([a, b, old, rec(4, 40.0, 41.0, [1], [9])], coster, enc)
    tower = coster.vision_ms((1024,), tp=1, dp=1) + coster.vision_ms((4096, 1024), tp=1, dp=1)
    llm = sum(r["predicted_ms"] - r["tower_predicted_ms"] for r in rows[:2])
    x = sf.image_split(rows)
    assert x["steps"] == 2 and x["tower_gpu_sum_ms"] == 8.0 and x["llm_gpu_sum_ms"] == 3.0  # 2 x (1.0 + 0.5)
    assert x["tower_predicted_over_gpu"] == pytest.approx(tower / 8.0, abs=1e-3)
    assert x["llm_predicted_over_gpu"] == pytest.approx(llm / 3.0, abs=1e-3)
    assert sf.image_split(rows[2:]) is None
    assert len(sf.markdown_images([("m c", "0.9", x), ("m c", "0.2", None)])) == 3


def test_resume_with_other_settings_or_an_unreadable_report_is_a_usage_error_that_keeps_the_report(tmp_path, capsys):
    """``fidelity_2gpu.py --resume`` against a report run with another duration (or unreadable):
    exit 2 naming what differs, and the report is left as it was (it used to start afresh,
    dropping the report's other models)."""
    import json

    from bench import fidelity_2gpu as fid

    report = tmp_path / "fidelity_2gpu.json"
    text = json.dumps({"models": {"llama": {"cases": {}}}, "rate_fractions": [0.2, 0.5, 0.9], "duration_s": 12.0,
                       "backend": "eager", "max_rate": 4.0, "seed": 0})
    report.write_text(text)
    with pytest.raises(SystemExit) as bad:
        fid.main(["--out", str(tmp_path), "--tiny", "--resume", "--duration", "10", "--models", "llama"])
    assert bad.value.code == 2 and "duration_s 12.0 there, 10.0 here" in capsys.readouterr().err
    assert report.read_text() == text
    report.write_text("{not json")
    with pytest.raises(SystemExit) as bad:
        fid.main(["--out", str(tmp_path), "--tiny", "--resume", "--models", "llama"])
    assert bad.value.code == 2 and report.read_text() == "{not json"


def test_a_resumed_run_keeps_finished_cases_but_those_named_to_rerun(tmp_path, capsys):
    """``fidelity_2gpu.kept_cases``: a resumed run keeps the old report's cases it runs that finished
    without an error, less those ``--rerun`` names; ``--rerun`` without ``--resume`` is a usage error."""
    from bench import fidelity_2gpu as fid

    old = {"models": {"llama": {"cases": {"single": {"rates": []}, "tp2": {"error": "timeout"}, "dp2": {"rates": []}}}}}
    assert list(fid.kept_cases(old, "llama", ["single", "tp2", "dp2"], set())) == ["single", "dp2"]
    assert list(fid.kept_cases(old, "llama", ["single", "tp2"], {"single"})) == []
    assert fid.kept_cases(None, "llama", ["single"], set()) == {} and fid.kept_cases(old, "qwen2-vl", ["single"], set()) == {}
    with pytest.raises(SystemExit) as bad:
        fid.main(["--out", str(tmp_path), "--tiny", "--rerun", "single"])
    assert bad.value.code == 2 and "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:  # a name that matches no case: said, nothing run
        fid.main(["--out", str(tmp_path), "--tiny", "--resume", "--models", "llama", "--rerun", "singel"])
    assert bad.value.code == 2 and "singel names no case" in capsys.readouterr().err


def test_a_reports_steps_file_is_named_after_it():
    """``steps_beside``: ``fidelity_2gpu.json``'s steps are ``STEPS_FILE``; a committed variant's its own."""
    from pathlib import Path

    assert sf.steps_beside(Path("d/fidelity_2gpu.json")) == Path("d") / sf.STEPS_FILE
    assert sf.steps_beside(Path("d/fidelity_2gpu.vl_single.json")) == Path("d/fidelity_2gpu.vl_single.steps.json.gz")
