"""Memory per GPU: weights under a mesh, shift's second copy, KV bytes per token with GQA
replication, activations, and the KV capacity that follows."""

import pytest

from costmodels.memory import USABLE_FRACTION
from costmodels.model import CostModel
from costmodels.synthetic import build_graph
from graph.hf_config import load_config


@pytest.fixture(scope="module")
def g70():
    return build_graph(load_config("llama-3.1-70b"))


@pytest.fixture(scope="module")
def cm70(g70):
    return CostModel(g70, "h200")


def test_weights_split_over_tp(cm70):
    params = 70.553706496e9
    for tp in (1, 2, 4, 8):
        m = cm70.memory(pp=1, tp=tp, sp=1)
        assert m.weights_gb == pytest.approx(params * 2 / tp / 1e9, rel=0.002)
        assert m.shift_copy_gb == 0.0


def test_shift_copy_is_weights_over_p(cm70):
    m = cm70.memory(pp=1, tp=2, sp=4)
    assert m.weights_gb == pytest.approx(70.5537 * 2 / 2, rel=0.002)
    assert m.shift_copy_gb == pytest.approx(70.5537 * 2 / 8, rel=0.002)


def test_kv_bytes_per_token_with_gqa_replication(cm70):
    # 80 layers, 8 KV heads of 128, bf16: 2 * 80 * g_gpu * 128 * 2
    assert cm70.memory(pp=1, tp=2, sp=1).kv_bytes_per_token == 2 * 80 * 4 * 128 * 2
    assert cm70.memory(pp=1, tp=8, sp=1).kv_bytes_per_token == 2 * 80 * 1 * 128 * 2
    # 16 GPUs > 8 KV heads: each GPU still holds one (replicated) KV head
    assert cm70.memory(pp=1, tp=4, sp=4).kv_bytes_per_token == 2 * 80 * 1 * 128 * 2
    # a pipeline stage holds only its layers
    assert cm70.memory(pp=2, tp=8, sp=1).kv_bytes_per_token == 2 * 40 * 1 * 128 * 2


def test_fp8_kv_halves_bytes(g70):
    bf16 = CostModel(g70, "h200").memory(pp=1, tp=8, sp=1)
    fp8 = CostModel(g70, "h200", kv_dtype="fp8").memory(pp=1, tp=8, sp=1)
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token / 2
    assert fp8.kv_tokens == pytest.approx(2 * bf16.kv_tokens, rel=0.001)


def test_kv_capacity_arithmetic(cm70):
    m = cm70.memory(pp=1, tp=8, sp=1)
    free = 141 * USABLE_FRACTION - m.weights_gb - m.shift_copy_gb - m.activations_gb
    assert m.kv_tokens == int(free * 1e9 // m.kv_bytes_per_token)
    assert m.total_gb == pytest.approx(m.weights_gb + m.activations_gb + m.kv_gb)
    assert m.total_gb <= 141 * USABLE_FRACTION and m.capacity_gb == 141


def test_pipeline_stages_raise_capacity(cm70):
    one = cm70.memory(pp=1, tp=4, sp=1)
    two = cm70.memory(pp=2, tp=4, sp=1)
    assert two.weights_gb < 0.55 * one.weights_gb
    assert two.kv_tokens > 2 * one.kv_tokens
    first = cm70.memory(pp=2, tp=4, sp=1, stage_layers=(0, 39), with_embedding=True, with_lm_head=False)
    last = cm70.memory(pp=2, tp=4, sp=1, stage_layers=(40, 79), with_embedding=False, with_lm_head=True)
    assert min(first.kv_tokens, last.kv_tokens) == two.kv_tokens


def test_activations_grow_with_step_tokens(cm70):
    small = cm70.memory(pp=1, tp=8, sp=1, max_batch_tokens=2048)
    big = cm70.memory(pp=1, tp=8, sp=1, max_batch_tokens=32768)
    assert big.activations_gb > small.activations_gb > 0.5  # includes library workspace
    assert big.kv_tokens < small.kv_tokens
    # SP splits the step's tokens: less activation memory per GPU
    assert cm70.memory(pp=1, tp=2, sp=4, max_batch_tokens=32768).activations_gb < \
        cm70.memory(pp=1, tp=2, sp=1, max_batch_tokens=32768).activations_gb


def test_vision_weights_counted_when_placed():
    cm = CostModel(build_graph(load_config("qwen2-vl-7b")), "h100")
    without = cm.memory(pp=1, tp=1, sp=1)
    with_v = cm.memory(pp=1, tp=1, sp=1, with_vision=True)
    assert with_v.weights_gb - without.weights_gb == pytest.approx(0.6758 * 2, rel=0.01)


def test_tied_embeddings_counted_once():
    cfg = dict(load_config("qwen2.5-7b"), tie_word_embeddings=True)
    g = build_graph(cfg)
    untied = CostModel(build_graph(load_config("qwen2.5-7b")), "h100").memory(pp=1, tp=1, sp=1)
    tied = CostModel(g, "h100").memory(pp=1, tp=1, sp=1)
    assert untied.weights_gb - tied.weights_gb == pytest.approx(152064 * 3584 * 2 / 1e9, rel=0.01)


def test_weights_that_do_not_fit_leave_no_kv():
    cm = CostModel(build_graph(load_config("llama-3.1-405b")), "h100")
    m = cm.memory(pp=1, tp=1, sp=1)
    assert m.weights_gb > 800 and m.kv_tokens == 0 and not m.fits
