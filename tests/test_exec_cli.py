"""Points 1 and 9: `plan run`, `plan export-onnx`, backends (eager, compile, tensorrt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import executors
from executors import Request, Sampling
from planner.cli import main
from plans.errors import UserError
from plans.schema import save_plan
from tests.tiny.helpers import check_against_oracle, config, make_plan, save_checkpoint, save_tokenizer


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    d = tmp_path_factory.mktemp("llama")
    return d, save_checkpoint("llama", d, seed=2)


def test_plan_run_tokens_tp2_matches_hf(llama_ckpt: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, oracle = llama_ckpt
    plan = tmp_path / "p.plan.yaml"
    save_plan(make_plan("llama", tp=2), plan)
    assert main(["run", str(plan), "--tokens", "5, 6, 7, 8", "--weights", str(ckpt), "-n", "6"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    toks = [int(t) for t in line.removeprefix("tokens: ").split()]
    full = oracle(input_ids=__import__("torch").tensor([[5, 6, 7, 8] + toks[:-1]])).logits[0]
    assert toks == full[3:].argmax(-1).tolist()


def test_plan_run_prompt_with_local_tokenizer(llama_ckpt: tuple, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """--prompt goes through the tokenizer found next to the weights; text comes back."""
    ckpt, _ = llama_ckpt
    tok_dir = tmp_path / "tok"
    save_tokenizer(tok_dir)
    plan = tmp_path / "p.plan.yaml"
    save_plan(make_plan("llama"), plan)
    assert main(["run", str(plan), "--prompt", "w5 w6 w7 w8", "--weights", str(ckpt), "--tokenizer", str(tok_dir),
                 "-n", "4"]) == 0
    out = capsys.readouterr().out
    assert main(["run", str(plan), "--tokens", "5,6,7,8", "--weights", str(ckpt), "-n", "4"]) == 0
    ids = capsys.readouterr().out.split("tokens:")[1].split()
    assert out.split("tokens:")[1].splitlines()[0].split() == ids
    assert "text: " + " ".join(f"w{i}" for i in ids) in out


def test_plan_run_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan = tmp_path / "p.plan.yaml"
    save_plan(make_plan("qwen2_vl"), plan)
    assert main(["run", str(plan), "--prompt", "hello"]) == 2
    assert "--prompt needs a tokenizer" in capsys.readouterr().err
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    assert main(["run", str(plan), "--tokens", "3,4", "--image", str(bad)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["run", str(plan), "--tokens", "3,x"]) == 2
    assert "'x' is not an integer" in capsys.readouterr().err


def test_plan_run_reads_an_image_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    img = tmp_path / "a.png"
    Image.new("RGB", (60, 90), (200, 30, 40)).save(img)
    plan = tmp_path / "p.plan.yaml"
    save_plan(make_plan("qwen2_vl"), plan)
    assert main(["run", str(plan), "--tokens", "7,8", "--image", str(img), "-n", "3"]) == 0
    assert len(capsys.readouterr().out.split("tokens:")[1].split()) == 3


def test_export_onnx_stage_matches_pytorch(llama_ckpt: tuple, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from executors.onnx_export import example_inputs, stage_graph

    ckpt, _ = llama_ckpt
    plan = tmp_path / "p.plan.yaml"
    save_plan(make_plan("llama", pp=2, tp=2), plan)
    out = tmp_path / "stage1.onnx"
    assert main(["export-onnx", str(plan), "--stage", "1", "-o", str(out), "--weights", str(ckpt)]) == 0
    g = stage_graph(make_plan("llama", pp=2, tp=2), 1, ckpt, config("llama"))
    x, pos = example_inputs(g, 13)  # a length other than the traced one: T is dynamic
    ref = g(x, pos).detach().numpy()
    got = ort.InferenceSession(str(out)).run(None, {"x": x.numpy(), "pos": pos.numpy()})[0]
    assert got.shape == (13, 128)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    assert main(["export-onnx", str(plan), "--stage", "5", "-o", str(out)]) == 2


def test_plan_bench_reports_latency_and_throughput(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    plan = tmp_path / "p.plan.yaml"
    save_plan(make_plan("qwen2"), plan)
    out, trace = tmp_path / "bench.json", tmp_path / "trace.json"
    assert main(["bench", str(plan), "--requests", "3", "--input-tokens", "9", "--output-tokens", "5",
                 "--json", str(out), "--trace", str(trace)]) == 0
    figs = json.loads(out.read_text())
    assert figs["requests"] == 3 and figs["mesh"] == "single" and "step_trace" not in figs
    assert 0 < figs["ttft_ms_p50"] <= figs["ttft_ms_p90"]
    assert figs["output_tok_s"] > 0 and figs["tpot_ms_p50"] > 0
    assert "ttft_ms_p90:" in capsys.readouterr().out
    # --trace: the run's steps (the warm-up's left out): every prompt token and every new one but the last,
    # plus at most one look-ahead decode a request (queued before its last token was read)
    t = json.loads(trace.read_text())
    assert 3 * (9 + 5 - 1) <= sum(s["tokens"] for s in t["steps"]) <= 3 * (9 + 5)
    assert t["summary"]["all"]["steps"] == len(t["steps"]) and {"prefill", "decode"} <= set(t["summary"])


def test_tensorrt_backend_names_the_extra() -> None:
    try:
        import torch_tensorrt  # noqa: F401

        pytest.skip("torch-tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(UserError, match=r"shiftplan\[tensorrt\]"):
        executors.load(make_plan("llama", backend="tensorrt"))


def test_compile_backend_matches_hf(llama_ckpt: tuple) -> None:
    ckpt, oracle = llama_ckpt
    req = Request(tokens=[3, 4, 5, 6, 7])
    with executors.load(make_plan("llama"), weights=ckpt, backend="compile", keep_logits=True) as eng:
        assert eng.backend == "compile"
        res = eng.generate([req, Request(tokens=[9, 10])], max_new_tokens=6, sampling=Sampling(stop_on_eos=False))[0]
    assert check_against_oracle(oracle, req.tokens, res) < 1e-4


def test_compile_backend_vision_tower_matches_hf(tmp_path: Path) -> None:
    """The compile backend also compiles the vision blocks' halves around their eager attention
    (Qwen2.5-VL: windows and one full-attention block); the image request still matches HF."""
    from tests.tiny.helpers import IMAGE_TOKEN, random_image

    oracle = save_checkpoint("qwen2_5_vl", tmp_path, seed=6)
    img = random_image((8, 12), 3)
    req = Request(tokens=[7, 118, IMAGE_TOKEN, 119, 8, 9], images=[img])
    with executors.load(make_plan("qwen2_5_vl"), weights=tmp_path, backend="compile", keep_logits=True) as eng:
        tower = eng.local.model.vision
        assert all(getattr(b.pre, "func", None) is getattr(tower.blocks[0].pre, "func", 0) for b in tower.blocks)
        res = eng.generate([req], max_new_tokens=4, sampling=Sampling(stop_on_eos=False))[0]
    assert check_against_oracle(oracle, req.tokens, res, [img]) < 1e-4


def test_unknown_all_reduce_is_a_user_error() -> None:
    """``all_reduce`` names how small all-reduces run; anything else stops the load with one message."""
    with pytest.raises(UserError, match="all_reduce 'ring': choose one of auto, nccl"):
        executors.load(make_plan("llama"), all_reduce="ring")
