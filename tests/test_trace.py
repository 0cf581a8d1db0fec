"""The tracer: published parameter counts, graph structure, TP shards, and FLOPs against
``torch.utils.flop_counter.FlopCounterMode`` on real HF forwards of small configs."""

from __future__ import annotations

import networkx as nx
import pytest

from graph.hf_config import load_config
from graph.opgraph import OpGraph, StepShape
from graph.trace import trace_config
from graph.vision_windows import approx_window_pairs, attention_pairs, full_pairs, tokens, window_pairs
from plans.errors import UserError

PUBLISHED = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "qwen2-vl-7b": 8_291_375_616,
    "qwen2.5-vl-72b": 73_410_777_344,
}
COSTED = ("matmul", "attention", "lm_head", "patch_embed")  # what FlopCounterMode counts


@pytest.fixture(scope="module")
def graphs() -> dict[str, OpGraph]:
    return {name: trace_config(load_config(preset=name)) for name in [*PUBLISHED, "qwen2.5-7b"]}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_total_params_match_published(graphs, name):
    got, want = graphs[name].total_params, PUBLISHED[name]
    assert abs(got - want) <= 0.005 * want, f"{name}: {got:,} vs published {want:,}"


def test_qwen2_vl_vision_params(graphs):
    g = graphs["qwen2-vl-7b"]
    vision = sum(b.params for b in g.blocks if b.tower == "vision")
    assert abs(vision - 675_759_104) <= 0.005 * 675_759_104
    assert {b.kind for b in g.blocks if b.tower == "vision"} == {"vision_patch_embed", "vision_block", "merger"}


def test_block_layout_llama(graphs):
    g = graphs["llama-3.1-70b"]
    kinds = [b.kind for b in g.blocks]
    assert kinds == ["embedding"] + ["decoder"] * 80 + ["final_norm", "lm_head"]
    assert [b.name for b in g.blocks_of("decoder")][:2] == ["layers.0", "layers.1"]
    # every layer is the same block, renamed
    l0 = [n.split(".", 2)[2] for n in g.blocks_of("decoder")[0].ops]
    l79 = [n.split(".", 2)[2] for n in g.blocks_of("decoder")[79].ops]
    assert l0 == l79 and "self_attn.q_proj" in l0 and "mlp.down_proj" in l0
    assert g.op("layers.79.self_attn.q_proj").module == "model.layers.79.self_attn.q_proj"
    assert g.info.layers == 80 and g.info.heads == 64 and g.info.kv_heads == 8 and g.info.head_dim == 128


def test_graph_is_a_dataflow_dag(graphs):
    for name in ("llama-3.1-8b", "qwen2.5-vl-72b"):
        g = graphs[name]
        assert nx.is_directed_acyclic_graph(g.graph)
        assert nx.is_weakly_connected(g.graph)
        order = {n: i for i, n in enumerate(nx.topological_sort(g.graph))}
        assert order["embed_tokens"] < order["layers.0.self_attn.q_proj"] < order["layers.1.input_layernorm"]
        assert order[f"layers.{g.info.layers - 1}.mlp.down_proj"] < order["norm"] < order["lm_head"]
        assert nx.has_path(g.graph, "layers.0.mlp.down_proj", "layers.1.self_attn.q_proj")
        # each node belongs to exactly the block that lists it
        listed = [n for b in g.blocks for n in b.ops]
        assert sorted(listed) == sorted(g.graph.nodes)
        assert all(g.op(n).block == b.name for b in g.blocks for n in b.ops)
    vl = graphs["qwen2.5-vl-72b"]
    assert nx.has_path(vl.graph, "visual.blocks.31.mlp.down_proj", "layers.0.self_attn.q_proj")
    assert vl.op("visual.blocks.3.attn.qkv").module == "model.visual.blocks.3.attn.qkv"


def test_shards_match_hf_tp_plan(graphs):
    """Our dataflow-derived TP split agrees with the tensor-parallel plan transformers ships."""
    from graph.families import hf_config, text_part

    for name in ("llama-3.1-8b", "qwen2.5-7b", "qwen2-vl-7b"):
        g = graphs[name]
        plan = text_part(hf_config(load_config(preset=name))).base_model_tp_plan
        checked = 0
        for pattern, style in plan.items():
            if not pattern.startswith("layers.*.") or style not in ("colwise", "rowwise"):
                continue
            op = g.op("layers.0." + pattern[len("layers.*."):])
            assert op.shard == {"colwise": "column", "rowwise": "row"}[style], (name, pattern, op.shard)
            checked += 1
        assert checked == 7
        assert g.op("layers.0.self_attn.attn").shard == "heads"
        assert g.op("layers.0.input_layernorm").shard == "replicated"
        assert g.op("layers.0.mlp.act_fn").shard == "column"
        assert g.op("embed_tokens").shard == "vocab" and g.op("lm_head").shard == "vocab"


def test_costs_are_affine_in_the_step(graphs):
    g = graphs["llama-3.1-8b"]
    h, hd, heads, kvh = 4096, 128, 32, 8
    q = g.op("layers.0.self_attn.q_proj")
    assert q.flops.tokens == 2 * h * h and q.flops.const == 0 and q.shape == {"k": h, "n": h}
    assert q.weight_elems == h * h and q.act_read.tokens == h and q.act_written.tokens == h
    att = g.op("layers.0.self_attn.attn")
    assert att.flops.pairs == 4 * heads * hd and att.flops.tokens == 0
    assert att.kv_read.kv == 2 * kvh * hd and att.kv_written.tokens == 2 * kvh * hd
    assert att.shape["heads"] == heads and att.shape["kv_heads"] == kvh and att.shape["causal"] is True
    lm = g.op("lm_head")
    assert lm.kind == "lm_head" and lm.flops.seqs == 2 * h * 128256 and lm.flops.tokens == 0
    emb = g.op("embed_tokens")
    assert emb.flops(StepShape(100)) == 0 and emb.act_read.tokens == h and emb.weight_elems == 0
    # element-wise ops, priced as one fused kernel each (elements per token)
    norm, res = g.op("layers.0.input_layernorm"), g.op("layers.0.residual1")
    assert (norm.act_read.tokens, norm.act_written.tokens, norm.params) == (h, h, h)
    assert (res.act_read.tokens, res.act_written.tokens) == (2 * h, h)
    act = g.op("layers.0.mlp.act_fn")  # silu(gate) * up as one kernel: reads gate and up, writes one
    assert (act.act_read.tokens, act.act_written.tokens, act.shard) == (2 * 14336, 14336, "column")
    assert "layers.0.mlp.mul" not in g.graph and list(g.graph.successors(act.name)) == ["layers.0.mlp.down_proj"]
    rope = g.op("layers.0.self_attn.rope")  # reads q, k and the cos/sin rows; writes q, k
    assert rope.act_read.tokens == (heads + kvh) * hd + 2 * hd and rope.act_written.tokens == (heads + kvh) * hd
    assert att.shape["sliding_window"] is None
    # qwen2: q/k/v carry a bias (model_type qwen2), o_proj does not
    qw = graphs["qwen2.5-7b"]
    assert qw.op("layers.0.self_attn.k_proj").params == 3584 * 512 + 512
    assert qw.op("layers.0.self_attn.o_proj").params == 3584 * 3584


def test_qwen25_vl_window_flags(graphs):
    g = graphs["qwen2.5-vl-72b"]
    v = g.info.vision
    assert v is not None and v["depth"] == 32 and v["window_size"] == 112 and v["out_hidden"] == 8192
    for i in range(32):
        shape = g.op(f"visual.blocks.{i}.attn.attn").shape
        assert shape["window"] is (i not in (7, 15, 23, 31)), i
        assert shape["causal"] is False
    assert all(g.op(f"visual.blocks.{i}.attn.attn").shape["window"] is False for i in range(32)
               for g in [graphs["qwen2-vl-7b"]])
    assert g.op("visual.merger.mlp.2").shape == {"k": 5120, "n": 8192}
    shards = {n: g.op(f"visual.blocks.0.{n}").shard for n in
              ("norm1", "attn.qkv", "attn.rope", "attn.attn", "attn.proj", "residual1", "mlp.gate_proj",
               "mlp.act_fn", "mlp.down_proj", "residual2")}
    assert shards == {"norm1": "replicated", "attn.qkv": "column", "attn.rope": "heads", "attn.attn": "heads",
                      "attn.proj": "row", "residual1": "replicated", "mlp.gate_proj": "column",
                      "mlp.act_fn": "column", "mlp.down_proj": "row",
                      "residual2": "replicated"}
    v2 = graphs["qwen2-vl-7b"]
    assert [v2.op(f"visual.blocks.0.mlp.{n}").shard for n in ("fc1", "act", "fc2")] == ["column", "column", "row"]
    # vision rope takes q and k out of the fused qkv output: it reads those two thirds (+ cos, sin)
    rope = v2.op("visual.blocks.0.attn.rope")
    assert (rope.act_read.tokens, rope.act_written.tokens) == (2 * 1280 + 2 * 80, 2 * 1280)


@pytest.mark.parametrize("which", ["tiny-qwen2.5-vl", "qwen2-vl-7b"])
def test_one_export_equals_two_size_fit(which, graphs):
    """Costs read off one export (value / T) equal a fit over two export sizes with zero const."""
    cfg = TINY_VL25 if which.startswith("tiny") else load_config(preset=which)
    one = graphs[which] if which in graphs else trace_config(cfg)
    two = trace_config(cfg, check_linear=True)  # raises if any op has a constant term
    assert list(one.graph.nodes) == list(two.graph.nodes)
    for n in one.graph.nodes:
        a, b = one.op(n), two.op(n)
        for f in ("flops", "act_read", "act_written", "kv_read", "kv_written"):
            assert getattr(a, f) == pytest.approx(getattr(b, f)), (n, f)


def test_unsupported_architecture_is_refused():
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    with pytest.raises(UserError) as e:
        trace_config(cfg)
    assert "GPT2LMHeadModel" in str(e.value) and "LlamaForCausalLM" in str(e.value)
    with pytest.raises(UserError, match="model_type 'bert'"):
        trace_config({"model_type": "bert"})


_BAD_TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
             "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
             "vocab_size": 1000}
_BAD_VL = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 128,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "intermediate_size": 64,
           "vocab_size": 100, "vision_config": {"depth": 1, "embed_dim": 30, "num_heads": 4, "hidden_size": 128}}


@pytest.mark.parametrize("cfg,needle", [
    (dict(_BAD_TINY, num_attention_heads=3), "256 / 3 = 85.3"),
    (dict(_BAD_TINY, num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(_BAD_TINY, hidden_size="big"), "'hidden_size' must be a positive integer, got 'big'"),
    (dict(_BAD_TINY, num_hidden_layers=0), "'num_hidden_layers' must be a positive integer, got 0"),
    (dict(_BAD_TINY, model_type="qwen2"), "needs model_type 'llama'"),
    ({k: v for k, v in _BAD_TINY.items() if k != "vocab_size"}, "'vocab_size' is missing"),
    (_BAD_VL, "vision_config.embed_dim 30 is not a multiple of vision_config.num_heads 4"),
    ({k: v for k, v in _BAD_VL.items() if k != "vision_config"}, "needs a 'vision_config'"),
    (dict(_BAD_TINY, hidden_act="no-such-activation"), "cannot trace LlamaForCausalLM from this config"),
], ids=["heads", "kv-heads", "type", "layers", "model-type", "missing", "vision-heads", "no-vision", "act"])
def test_bad_configs_give_named_errors(cfg, needle):
    with pytest.raises(UserError) as e:
        trace_config(cfg)
    assert needle in str(e.value)


def test_window_pairs_arithmetic():
    # 12 x 20 patches -> 6 x 10 merged tokens; 4x4-merged windows: rows [4, 2], cols [4, 4, 2]
    sizes = [r * c * 4 for r in (4, 2) for c in (4, 4, 2)]
    assert window_pairs([(1, 12, 20)], 112, 14, 2) == sum(s * s for s in sizes)
    assert full_pairs([(1, 12, 20), (2, 4, 4)]) == 240 ** 2 + 2 * 16 ** 2
    assert tokens([(1, 12, 20), (2, 4, 4)]) == 272
    # 16 x 16 patches = 4 full windows of 64 patches: the patch-count estimate is exact there
    assert window_pairs([(1, 16, 16)], 112, 14, 2) == approx_window_pairs([256], 64) == 4 * 64 ** 2
    assert approx_window_pairs([240], 64) >= window_pairs([(1, 12, 20)], 112, 14, 2)
    info = {"window_size": 112, "patch_size": 14, "spatial_merge_size": 2}
    assert attention_pairs({"window": True}, [(1, 16, 16)], info) == 4 * 64 ** 2
    assert attention_pairs({"window": False}, [(1, 16, 16)], info) == 256 ** 2


# ---- FLOPs against FlopCounterMode on real forwards -----------------------------------------
# Eager attention: FlopCounterMode then counts QK^T and PV as two batched matmuls over *all*
# (query, key) pairs -- no causal saving -- so a prefill of L tokens is evaluated with S = L*L
# pairs per sequence; a decode at context c has S = c either way.

TINY_TEXT = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
             "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
             "vocab_size": 1000, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _graph_flops(g: OpGraph, s: StepShape, tower: str = "text") -> float:
    return sum(g.op(n).flops(s) for b in g.blocks if b.tower == tower for n in b.ops if g.op(n).kind in COSTED)


def _eager_model(cfg: dict, cls_name: str):
    import torch
    import transformers

    from graph.families import hf_config

    conf = hf_config(cfg)
    for c in (conf, getattr(conf, "text_config", None), getattr(conf, "vision_config", None)):
        if c is not None:
            c._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(conf).float().eval()


@pytest.mark.parametrize("arch,model_type,extra", [
    ("LlamaForCausalLM", "llama", {}),
    ("LlamaForCausalLM", "llama", {"attention_bias": True, "mlp_bias": True}),
    ("Qwen2ForCausalLM", "qwen2", {"tie_word_embeddings": True}),
    ("MistralForCausalLM", "mistral", {"sliding_window": 16}),
])
def test_text_flops_match_flop_counter(arch, model_type, extra):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dict(TINY_TEXT, architectures=[arch], model_type=model_type, **extra)
    g = trace_config(cfg)
    m = _eager_model(cfg, arch)
    assert g.total_params == sum(p.numel() for p in m.parameters())  # tied lm_head counted once
    assert g.op("lm_head").shape.get("tied", False) is bool(extra.get("tie_word_embeddings"))
    assert g.op("layers.1.self_attn.attn").shape["sliding_window"] == extra.get("sliding_window")
    B, L = 2, 12  # within the sliding window: the reference attends over every pair too
    with torch.no_grad():
        fc = FlopCounterMode(display=False)
        with fc:
            out = m(input_ids=torch.randint(0, 1000, (B, L)), use_cache=True, logits_to_keep=1)
        prefill = fc.get_total_flops()
        fc = FlopCounterMode(display=False)
        with fc:
            m(input_ids=torch.randint(0, 1000, (B, 1)), past_key_values=out.past_key_values, use_cache=True,
              logits_to_keep=1)
        decode = fc.get_total_flops()
    ours_prefill = _graph_flops(g, StepShape(tokens=B * L, pairs=B * L * L, kv=B * L, seqs=B))
    ours_decode = _graph_flops(g, StepShape.decode([L + 1] * B))
    assert abs(ours_prefill / prefill - 1) < 0.01, (ours_prefill, prefill)
    assert abs(ours_decode / decode - 1) < 0.01, (ours_decode, decode)


TINY_VL = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 128,
           "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "vocab_size": 1000, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}, "tie_word_embeddings": False,
           "vision_config": {"depth": 2, "embed_dim": 64, "mlp_ratio": 4, "num_heads": 4, "hidden_size": 128,
                             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}}
TINY_VL25 = dict(TINY_VL, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
                 vision_config={"depth": 3, "hidden_size": 64, "intermediate_size": 96, "num_heads": 4,
                                "out_hidden_size": 128, "patch_size": 14, "spatial_merge_size": 2,
                                "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1],
                                "hidden_act": "silu"})


@pytest.mark.parametrize("cfg", [TINY_VL, TINY_VL25], ids=["qwen2-vl", "qwen2.5-vl"])
def test_vision_flops_match_flop_counter(cfg):
    """Vision tower FLOPs for two images; Qwen2.5-VL blocks 0 and 2 windowed, block 1 full."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    g = trace_config(cfg)
    m = _eager_model(cfg, cfg["architectures"][0])
    assert g.total_params == sum(p.numel() for p in m.parameters())
    vis_params = sum(p.numel() for n, p in m.named_parameters() if "visual" in n)
    assert sum(b.params for b in g.blocks if b.tower == "vision") == vis_params
    grids = [(1, 12, 20), (1, 4, 6)]
    n = int(tokens(grids))
    px = torch.randn(n, 3 * 2 * 14 * 14)
    with torch.no_grad():
        fc = FlopCounterMode(display=False)
        with fc:
            m.model.visual(px, grid_thw=torch.tensor(grids))
        counted = fc.get_total_flops()
    v = g.info.vision
    ours = 0.0
    for b in g.blocks:
        if b.tower != "vision":
            continue
        for name in b.ops:
            op = g.op(name)
            if op.kind not in COSTED:
                continue
            pairs = attention_pairs(op.shape, grids, v) if op.kind == "attention" else 0.0
            ours += op.flops(StepShape(tokens=n, pairs=pairs, kv=n, seqs=len(grids)))
    assert abs(ours / counted - 1) < 0.01, (ours, counted)
