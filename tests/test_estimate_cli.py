"""`plan estimate` and `plan calibrate` on the command line: JSON contract, text output,
roofline note, errors with arithmetic (exit 2, no traceback)."""

import json
from pathlib import Path

import pytest

from planner.cli import main

EX = Path(__file__).resolve().parent.parent / "examples"
L8 = str(EX / "llama-3.1-8b-1xh100.yaml")
L70_H200 = str(EX / "llama-3.1-70b-8xh200.yaml")
L70_H100 = str(EX / "llama-3.1-70b-2x8xh100.yaml")


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_contract(capsys):
    code, out, err = run(capsys, "estimate", L8, "--batch", "8", "--isl", "1024", "--osl", "128", "--json")
    assert code == 0, err
    d = json.loads(out)
    for key in ("ttft_ms", "tpot_ms", "output_tok_s", "combined_tok_s", "memory_gb", "max_batch",
                "shift_crossover_tokens", "profile"):
        assert key in d
    assert set(d["memory_gb"]) >= {"weights", "kv", "activations"}
    assert d["profile"].startswith("h100-") and d["roofline"] is False
    assert d["ttft_ms"] > d["tpot_ms"] > 0
    assert d["combined_tok_s"] == pytest.approx(d["output_tok_s"] * (1024 + 128) / 128, rel=1e-3)
    assert d["memory_gb"]["weights"] == pytest.approx(8.03 * 2, rel=0.01)
    assert d["max_batch"] > 8 and d["shift_crossover_tokens"] is None


def test_text_output_and_roofline_note(capsys):
    code, out, _ = run(capsys, "estimate", L8, "--roofline", "--batch", "4")
    assert code == 0
    assert "TTFT" in out and "TPOT" in out and "max batch" in out
    assert "roofline:h100" in out and "no calibration profile" in out


def test_sp_reports_shift_crossover(capsys):
    code, out, err = run(capsys, "estimate", L70_H200, "--tp", "2", "--sp", "4", "--batch", "32", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert isinstance(d["shift_crossover_tokens"], int) and 16 < d["shift_crossover_tokens"] < 65536
    assert d["memory_gb"]["shift_copy"] == pytest.approx(d["memory_gb"]["weights"] / 4, rel=0.01)
    code, out, _ = run(capsys, "estimate", L70_H200, "--tp", "2", "--sp", "4")
    assert "shift crossover" in out


@pytest.mark.parametrize("args, needle", [
    (["--tp", "3"], "64 query heads are not divisible by tp*sp = 3 (64 % 3 = 1)"),
    (["--tp", "2", "--sp", "3"], "64 query heads are not divisible by tp*sp = 2*3 = 6 (64 % 6 = 4)"),
    (["--tp", "8", "--pp", "4"], "mesh needs dp*pp*tp*sp = 1*4*8*1 = 32 GPUs; the hardware has 8"),
    (["--tp", "1"], "weights need 141.1 GB per GPU at tp=1"),
    (["--tp", "8", "--batch", "0"], "must be >= 1"),
])
def test_impossible_mesh_errors_show_arithmetic(capsys, args, needle):
    code, out, err = run(capsys, "estimate", L70_H200, *args)
    assert code == 2
    assert needle in " ".join(err.split())
    assert "Traceback" not in err


def test_weights_do_not_fit_on_h100(capsys):
    code, _, err = run(capsys, "estimate", L70_H100, "--tp", "1")
    assert code == 2
    msg = " ".join(err.split())
    assert "weights need 141.1 GB per GPU at tp=1" in msg and "H100 has 80 GB" in msg


def test_inline_gpu_runs_on_roofline(capsys, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(
        "name: inline\nmodel: {preset: llama-3.1-8b}\n"
        "hardware:\n  gpu: {name: mygpu, bf16_tflops: 500, hbm_gb: 48, hbm_tbps: 2.0, link_gbps: 100}\n"
        "  gpus_per_node: 2\nworkload: {arrival_rate: 1.0}\n")
    code, out, err = run(capsys, "estimate", str(spec), "--tp", "2", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["profile"] == "roofline:mygpu" and d["roofline"] is True
    assert d["memory_gb"]["capacity"] == 48


def test_missing_spec_is_a_clean_error(capsys, tmp_path):
    code, _, err = run(capsys, "estimate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "Traceback" not in err


def test_calibrate_without_gpu_is_a_clean_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "calibrate", "--quick")
    assert code == 2
    assert "needs a CUDA GPU" in err and "Traceback" not in err


def test_estimate_with_a_warm_graph_cache_imports_no_torch(capsys):
    import subprocess
    import sys

    assert main(["estimate", L8, "--json"]) == 0  # warms the graph cache in this process if needed
    capsys.readouterr()
    code = ("import sys; from planner.cli import main; rc = main(['estimate', %r, '--tp', '1', '--json']); "
            "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'transformers' not in sys.modules, 'transformers imported'" % L8)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"ttft_ms"' in r.stdout


def test_images_add_encoder_time_to_ttft(capsys):
    vl = str(EX / "qwen2-vl-7b-1xh100.yaml")
    _, out, _ = run(capsys, "estimate", vl, "--batch", "4", "--isl", "1500", "--json")
    text = json.loads(out)
    code, out, err = run(capsys, "estimate", vl, "--batch", "4", "--isl", "1500", "--images", "1",
                         "--image-tokens", "1024", "--json")
    assert code == 0, err
    img = json.loads(out)
    assert img["ttft_ms"] > text["ttft_ms"] * 1.1
    assert img["tpot_ms"] == pytest.approx(text["tpot_ms"])
    assert img["memory_gb"]["weights"] == pytest.approx(text["memory_gb"]["weights"] + 0.676 * 2, rel=0.01)
    code, _, err = run(capsys, "estimate", L8, "--images", "1", "--image-tokens", "64")
    assert code == 2 and "no vision tower" in err
    code, _, err = run(capsys, "estimate", vl, "--images", "2", "--image-tokens", "1000", "--isl", "1000")
    assert code == 2 and "2 x 1000 = 2000" in err
