"""FP8 weights and KV cache in the executor (``executors.quant``): the oracle is HF transformers
with the dequantized weights, so an FP8 plan must give its logits as closely as an fp32 one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import executors
from executors import Request, Sampling
from executors.quant import Fp8Weight, linear, quantize
from tests.tiny.helpers import check_against_oracle, make_plan, save_checkpoint

GREEDY = Sampling(stop_on_eos=False)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REQS = [Request(tokens=[5, 9, 17]), Request(tokens=list(range(30, 59))), Request(tokens=[3, 4, 11, 12, 40])]


def test_quantize_is_per_row_within_e4m3_precision() -> None:
    w = torch.randn(48, 64) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different range
    q = quantize(w)
    assert q.q.dtype == torch.float8_e4m3fn and q.scale.shape == (48,)
    err = (q.dequantize() - w).abs().amax(dim=1) / w.abs().amax(dim=1)
    assert err.max() <= 2.0**-4  # 3 mantissa bits: half an ulp of the row maximum
    x = torch.randn(5, 64)
    want = F.linear(x, q.dequantize())
    assert (linear(x, q) - want).abs().max() / want.abs().max() < 1e-6


def _fp8_checkpoint(src: Path, dst: Path, oracle: torch.nn.Module) -> None:
    """Rewrite a checkpoint's decoder linears as FP8 + ``weight_scale [out, 1]`` and give the
    oracle the dequantized weights."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    out = {}
    for f in src.glob("*.safetensors"):
        for n, t in load_file(f).items():
            if n.endswith(".weight") and n.split(".")[-2] in LINEARS:
                q = quantize(t)
                out[n], out[n + "_scale"] = q.q, q.scale[:, None]
            else:
                out[n] = t
        save_file(out, dst / f.name, metadata={"format": "pt"})
    sd = oracle.state_dict()
    with torch.no_grad():
        for n, t in out.items():
            if n.endswith("_scale"):
                w = n[: -len("_scale")]
                sd[w].copy_(Fp8Weight(out[w], t.reshape(-1)).dequantize())


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    d = tmp_path_factory.mktemp("fp8")
    oracle = save_checkpoint("llama", d / "bf", seed=11)
    _fp8_checkpoint(d / "bf", d / "fp8", oracle)
    return d / "fp8", oracle


@pytest.mark.parametrize("mesh", [dict(), dict(tp=2), dict(sp=2, tp=2, shift=True, threshold=8), dict(pp=2)])
def test_fp8_checkpoint_matches_hf_on_every_mesh(mesh: dict, fp8_ckpt: tuple) -> None:
    """Scales from the checkpoint: every mesh computes with the same FP8 weights (fp32 compute,
    as the plan's KV dtype is fp32) and matches HF on the dequantized weights within 1e-4."""
    ckpt, oracle = fp8_ckpt
    plan = make_plan("llama", max_batch_tokens=16, **mesh)
    plan.model.weights_dtype = "fp8"
    with executors.load(plan, weights=ckpt, keep_logits=True, kv_blocks=64) as eng:
        if eng.local is not None:
            w = eng.local.model.layers[0].layouts["tp"]
            assert w.attn.qkv.weight.dtype == torch.float8_e4m3fn and w.mlp.down.weight.dtype == torch.float8_e4m3fn
        results = eng.generate(REQS, max_new_tokens=16, sampling=GREEDY)
    for req, res in zip(REQS, results):
        assert res.error is None, res.error
        assert check_against_oracle(oracle, req.tokens, res) < 1e-4


def test_fp8_checkpoint_runs_in_a_bf16_plan_dequantized(fp8_ckpt: tuple) -> None:
    ckpt, oracle = fp8_ckpt
    plan = make_plan("llama")
    with executors.load(plan, weights=ckpt, keep_logits=True, kv_blocks=64) as eng:
        assert eng.local.model.layers[0].layouts["tp"].attn.qkv.weight.dtype == torch.float32
        results = eng.generate(REQS[:1], max_new_tokens=8, sampling=GREEDY)
    assert check_against_oracle(oracle, REQS[0].tokens, results[0]) < 1e-4


def test_online_quantization_of_an_fp32_checkpoint(tmp_path: Path) -> None:
    """An fp32 checkpoint under an FP8 plan is quantized at load (one rank: whole rows), which is
    the oracle's quantization of the full matrices."""
    oracle = save_checkpoint("qwen2", tmp_path, seed=12)
    with torch.no_grad():
        for n, p in oracle.named_parameters():
            if n.endswith(".weight") and n.split(".")[-2] in LINEARS:
                p.copy_(quantize(p).dequantize())
    plan = make_plan("qwen2")
    plan.model.weights_dtype = "fp8"
    with executors.load(plan, weights=tmp_path, keep_logits=True, kv_blocks=64) as eng:
        results = eng.generate(REQS, max_new_tokens=16, sampling=GREEDY)
    for req, res in zip(REQS, results):
        assert check_against_oracle(oracle, req.tokens, res) < 1e-4


def test_fp8_kv_cache_stores_e4m3_and_stays_close(tmp_path: Path) -> None:
    """KV in FP8 (compute bf16 then): the cache holds one byte per value; logits stay within 6%
    of HF fp32's (e4m3 keeps 3 mantissa bits) on the first 4 steps, teacher forced."""
    from tests.tiny.helpers import oracle_logits

    oracle = save_checkpoint("llama", tmp_path, seed=13)
    plan = make_plan("llama", tp=1)
    plan.model.weights_dtype, plan.model.kv_dtype = "bf16", "fp8"
    with executors.load(plan, weights=tmp_path, keep_logits=True, kv_blocks=64) as eng:
        cache = eng.local.model.caches[0]
        assert cache.k.dtype == torch.float8_e4m3fn and cache.k.element_size() == 1
        res = eng.generate(REQS[1:2], max_new_tokens=4, sampling=GREEDY)[0]
    full = list(res.prompt_tokens) + list(res.tokens)
    want = oracle_logits(oracle, full[:-1])[len(res.prompt_tokens) - 1:]
    rel = float((res.logits.float() - want).abs().max() / want.abs().max())
    assert rel < 0.06, rel


def test_fp8_checkpoint_with_wrong_scale_count_names_the_tensor(fp8_ckpt: tuple, tmp_path: Path) -> None:
    from executors.engine import WorkerError
    from plans.errors import UserError

    ckpt, _ = fp8_ckpt
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors":
            sd = load_file(f)
            sd["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(3, 1)
            save_file(sd, bad / f.name, metadata={"format": "pt"})
        else:
            (bad / f.name).write_bytes(f.read_bytes())
    plan = make_plan("llama")
    plan.model.weights_dtype = "fp8"
    with pytest.raises((UserError, WorkerError)) as err:
        executors.load(plan, weights=bad, kv_blocks=64)
    assert "model.layers.0.mlp.down_proj.weight" in str(err.value) and "3 scales" in str(err.value)
