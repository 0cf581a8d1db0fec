"""A plan too large for the machine it is about to run on is refused before any rank starts
(``executors.fits``), with the figures; the bounds it uses never exceed what the engine holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import executors
from executors import Request, Sampling, fits
from executors.config import model_args
from executors.engine import Engine, default_blocks
from graph.hf_config import load_config
from planner.cli import main
from plans.errors import UserError
from plans.schema import load_plan
from tests.tiny.helpers import config, hf_model, make_plan

ROOT = Path(__file__).resolve().parents[1]
BIG = ROOT / "plans" / "qwen2.5-32b-8xh200.plan.yaml"


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_parameters_equal_hf_for_text_models(name: str) -> None:
    """The oracle: HF's own parameter count of the same config."""
    want = sum(p.numel() for p in hf_model(name).parameters())
    assert fits.parameters(model_args(config(name))) == want


@settings(max_examples=40, deadline=None, derandomize=True)
@given(arch=st.sampled_from(["llama", "qwen2", "mistral"]), heads=st.sampled_from([2, 4, 8]), group=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([8, 16, 24]), width=st.integers(1, 24), inter=st.integers(8, 256),
       layers=st.integers(1, 5), vocab=st.integers(16, 300), tie=st.booleans(), bias=st.booleans())
def test_parameters_equal_hf_on_any_text_config(arch: str, heads: int, group: int, head_dim: int, width: int,
                                               inter: int, layers: int, vocab: int, tie: bool, bias: bool) -> None:
    """The oracle on drawn configs: HF's own model built on the meta device (GQA groups, a head size
    other than hidden / heads, tied heads, Llama's optional attention bias; transformers asks for a
    hidden size that is a multiple of the head count)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {"architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                              "mistral": "MistralForCausalLM"}[arch]], "model_type": arch, "hidden_size": heads * width,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": heads // group, "head_dim": head_dim, "vocab_size": vocab,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": tie}
    cfg["attention_bias"] = cfg["mlp_bias"] = bias  # Llama's; Mistral's and Qwen2's models ignore them
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"}))
    assert fits.parameters(model_args(cfg)) == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_parameters_bound_vision_models_from_below(name: str) -> None:
    """The tower's norms, patch embedding and merger are left out: a lower bound, and a close one."""
    want = sum(p.numel() for p in hf_model(name).parameters())
    got = fits.parameters(model_args(config(name)))
    assert 0.5 * want < got <= want


@pytest.mark.parametrize("preset,published", [("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496)])
def test_parameters_of_published_models(preset: str, published: int) -> None:
    assert fits.parameters(model_args(load_config(preset=preset))) == published


def test_kv_bound_is_what_the_engine_allocates() -> None:
    """The KV lower bound equals the cache the ranks allocate, summed over a replica's ranks (pp2 x tp2)."""
    import torch

    plan = make_plan("llama", pp=2, tp=2)
    a = model_args(config("llama"))
    blocks = default_blocks(plan, a)
    with executors.load(plan) as eng:
        eng.generate([Request(tokens=[1, 2, 3])], max_new_tokens=1, sampling=Sampling())
        assert eng.num_blocks == blocks
    per_token = 2 * a.layers * a.kv_heads * a.head_dim * torch.float32.itemsize  # every layer, K and V, all heads
    assert fits.replica_bytes(plan, a, blocks).kv == blocks * plan.scheduler.block_size * per_token


def test_a_plan_too_large_for_this_machine_is_refused_before_any_rank_starts(monkeypatch, capsys) -> None:
    """The shipped Qwen2.5-32B plan (dp2 x sp4) on CPU ranks of a 24 GB machine: exit code 2, one message
    with the figures (65.5 GB of weights, held by each of a replica's four SP ranks), no rank spawned."""
    monkeypatch.setattr(fits, "available_host_bytes", lambda: 24 * 10**9)
    monkeypatch.setattr(Engine, "_spawn", lambda self: pytest.fail("ranks were started"))
    assert main(["run", str(BIG), "--tokens", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "does not fit in this machine's memory on CPU ranks" in err
    assert "65.5 GB of weights (32.76 B parameters in bf16; each of its 4 sequence-parallel ranks" in err and "24.0 GB is available" in err
    assert "--max-context" not in err  # the weights alone do not fit: a shorter context would not help
    assert "Traceback" not in err


def test_shorter_sequences_are_suggested_when_the_cache_is_what_does_not_fit(monkeypatch) -> None:
    plan = load_plan(BIG)
    a = model_args(load_config(preset=plan.model.preset))
    r = fits.replica_bytes(plan, a, default_blocks(plan, a))
    monkeypatch.setattr(fits, "available_host_bytes", lambda: plan.mesh.dp * plan.mesh.sp * r.weights + 1)
    with pytest.raises(UserError, match=r"--max-context N"):
        fits.check_fits(plan, a, default_blocks(plan, a), "cpu")
    fits.check_fits(plan, a, default_blocks(plan, a), "cpu", local_ranks=False)  # torchrun: nodes share the ranks


def test_gpu_bound_is_per_rank(monkeypatch) -> None:
    """On GPUs a replica's KV cache spreads over its ranks (sp4 here) and its weights over its pp x tp
    shards (each SP rank holds the whole shard): refused below that, run at it; and the bound is below
    what the plan's own memory model gives a GPU."""
    plan = load_plan(BIG)
    a = model_args(load_config(preset=plan.model.preset))
    blocks = default_blocks(plan, a)
    r = fits.replica_bytes(plan, a, blocks)
    per_gpu = r.weights + r.kv / 4
    monkeypatch.setattr(fits, "gpu_bytes", lambda: int(per_gpu) - 1)
    with pytest.raises(UserError, match=r"a GPU over its 4 rank\(s\), and the largest GPU here has"):
        fits.check_fits(plan, a, blocks, "cuda")
    monkeypatch.setattr(fits, "gpu_bytes", lambda: int(per_gpu) + 1)
    fits.check_fits(plan, a, blocks, "cuda")
    assert per_gpu <= (plan.memory_gb.weights + plan.memory_gb.kv) * 1e9 * 1.001  # the plan's per-GPU figures
