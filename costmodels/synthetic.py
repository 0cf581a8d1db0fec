"""An analytic OpGraph of a Llama-style decoder (and a Qwen2-VL vision tower) from an HF
config dict, without torch.

Used by the cost-model tests, by the accuracy benchmark to cross-check the traced graph,
and as a fallback when tracing is not available. Per decoder layer (T tokens, S pairs,
K KV tokens, B sequences; h hidden, H heads, g KV heads, d head dim, I intermediate):

    input norm | q (h -> H d), k, v (h -> g d) | rope | attention F = 4 H d S | o (H d -> h)
    | add | post norm | gate, up (h -> I) | silu*mul | down (I -> h) | add

the lm_head scores the last token of each sequence only (M = B). Vision block (Qwen2-VL):
LayerNorm | qkv (D -> 3D) | rope | full attention | proj | add | LayerNorm | fc1 (D -> rD)
| QuickGELU | fc2 | add; the merger maps 4 patches (T/4 rows of 4D) to the LM hidden size.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from graph.hf_config import architecture, config_sha256, text_config
from graph.opgraph import Affine, Block, ModelInfo, OpGraph, OpNode


def model_info(cfg: dict[str, Any]) -> ModelInfo:
    tc = text_config(cfg)
    h, heads = int(tc["hidden_size"]), int(tc["num_attention_heads"])
    vc = cfg.get("vision_config")
    vision = None
    if isinstance(vc, dict):
        vh = int(vc.get("embed_dim", vc.get("hidden_size", 1280)))
        vision = {"depth": int(vc["depth"]), "hidden": vh, "heads": int(vc["num_heads"]),
                  "mlp_ratio": float(vc.get("mlp_ratio", 4)), "patch_size": int(vc.get("patch_size", 14)),
                  "temporal_patch_size": int(vc.get("temporal_patch_size", 2)),
                  "in_chans": int(vc.get("in_chans", vc.get("in_channels", 3))),
                  "spatial_merge_size": int(vc.get("spatial_merge_size", 2)),
                  "out_hidden": int(vc.get("hidden_size", h) if "embed_dim" in vc else vc.get("out_hidden_size", h))}
    return ModelInfo(architecture=architecture(cfg), hidden=h, layers=int(tc["num_hidden_layers"]), heads=heads,
                     kv_heads=int(tc.get("num_key_value_heads", heads)),
                     head_dim=int(tc.get("head_dim") or h // heads), intermediate=int(tc["intermediate_size"]),
                     vocab=int(tc["vocab_size"]), max_context=int(tc.get("max_position_embeddings", 4096)),
                     tie_embeddings=bool(tc.get("tie_word_embeddings", False)), vision=vision)


class _Builder:
    def __init__(self) -> None:
        self.g = nx.DiGraph()
        self.blocks: list[Block] = []
        self._last: str | None = None

    def block(self, name: str, kind: str, tower: str, index: int, ops: list[OpNode]) -> None:
        for op in ops:
            op.block = name
            self.g.add_node(op.name, op=op)
            if self._last is not None:
                self.g.add_edge(self._last, op.name)
            self._last = op.name
        self.blocks.append(Block(name=name, kind=kind, tower=tower, index=index,
                                 params=sum(o.params for o in ops), ops=[o.name for o in ops]))


def _mm(name: str, k: int, n: int, shard: str, rows: Affine, bias: bool = False, kind: str = "matmul") -> OpNode:
    w = k * n + (n if bias else 0)
    return OpNode(name=name, kind=kind, module=name, block="", params=w, weight_elems=w,
                  flops=rows.scale(2.0 * k * n), act_read=rows.scale(k), act_written=rows.scale(n),
                  shard=shard, shape={"k": k, "n": n})


def _ew(name: str, kind: str, width: int, shard: str = "replicated", params: int = 0, reads: int = 1,
        rows: Affine = Affine(tokens=1)) -> OpNode:
    return OpNode(name=name, kind=kind, module=name, block="", params=params, weight_elems=params,
                  act_read=rows.scale(width * reads), act_written=rows.scale(width), shard=shard,
                  shape={"width": width}, flops=rows.scale(4.0 * width))


def _attn(name: str, heads: int, kv_heads: int, d: int, causal: bool) -> OpNode:
    return OpNode(name=name, kind="attention", module=name, block="", flops=Affine(pairs=4.0 * heads * d),
                  act_read=Affine(tokens=(heads + 2 * kv_heads) * d), act_written=Affine(tokens=heads * d),
                  kv_read=Affine(kv=2.0 * kv_heads * d), kv_written=Affine(tokens=2.0 * kv_heads * d),
                  shard="heads", shape={"heads": heads, "kv_heads": kv_heads, "head_dim": d, "causal": causal})


def decoder_ops(p: str, i: ModelInfo, qkv_bias: bool) -> list[OpNode]:
    h, H, g, d, inter = i.hidden, i.heads, i.kv_heads, i.head_dim, i.intermediate
    tok = Affine(tokens=1)
    return [
        _ew(f"{p}.input_layernorm", "norm", h, params=h),
        _mm(f"{p}.self_attn.q_proj", h, H * d, "column", tok, qkv_bias),
        _mm(f"{p}.self_attn.k_proj", h, g * d, "column", tok, qkv_bias),
        _mm(f"{p}.self_attn.v_proj", h, g * d, "column", tok, qkv_bias),
        _ew(f"{p}.self_attn.rope", "rope", (H + g) * d, shard="heads", reads=2),
        _attn(f"{p}.self_attn.attn", H, g, d, True),
        _mm(f"{p}.self_attn.o_proj", H * d, h, "row", tok),
        _ew(f"{p}.residual1", "elementwise", h, reads=2),
        _ew(f"{p}.post_attention_layernorm", "norm", h, params=h),
        _mm(f"{p}.mlp.gate_proj", h, inter, "column", tok),
        _mm(f"{p}.mlp.up_proj", h, inter, "column", tok),
        _ew(f"{p}.mlp.act", "activation", inter, shard="column", reads=2),
        _mm(f"{p}.mlp.down_proj", inter, h, "row", tok),
        _ew(f"{p}.residual2", "elementwise", h, reads=2),
    ]


def vision_block_ops(p: str, v: dict[str, Any]) -> list[OpNode]:
    D, nh = v["hidden"], v["heads"]
    r = int(D * v["mlp_ratio"])
    tok = Affine(tokens=1)
    return [
        _ew(f"{p}.norm1", "norm", D, params=2 * D),
        _mm(f"{p}.attn.qkv", D, 3 * D, "column", tok, True),
        _ew(f"{p}.attn.rope", "rope", 2 * D, shard="heads", reads=2),
        _attn(f"{p}.attn.attn", nh, nh, D // nh, False),
        _mm(f"{p}.attn.proj", D, D, "row", tok, True),
        _ew(f"{p}.residual1", "elementwise", D, reads=2),
        _ew(f"{p}.norm2", "norm", D, params=2 * D),
        _mm(f"{p}.mlp.fc1", D, r, "column", tok, True),
        _ew(f"{p}.mlp.act", "activation", r, shard="column"),
        _mm(f"{p}.mlp.fc2", r, D, "row", tok, True),
        _ew(f"{p}.residual2", "elementwise", D, reads=2),
    ]


def build_graph(cfg: dict[str, Any]) -> OpGraph:
    """Analytic OpGraph of a Llama/Qwen2-style model (and Qwen2-VL vision tower) config."""
    info = model_info(cfg)
    qkv_bias = "qwen" in info.architecture.lower()
    b = _Builder()
    v = info.vision
    if v:
        pe_k = v["in_chans"] * v["temporal_patch_size"] * v["patch_size"] ** 2
        b.block("visual.patch_embed", "vision_patch_embed", "vision", 0,
                [_mm("visual.patch_embed.proj", pe_k, v["hidden"], "replicated", Affine(tokens=1),
                     kind="patch_embed")])
        for j in range(v["depth"]):
            b.block(f"visual.blocks.{j}", "vision_block", "vision", j + 1, vision_block_ops(f"visual.blocks.{j}", v))
        m = v["spatial_merge_size"] ** 2
        quarter = Affine(tokens=1.0 / m)
        b.block("visual.merger", "merger", "vision", v["depth"] + 1, [
            _ew("visual.merger.ln_q", "norm", v["hidden"], params=2 * v["hidden"]),
            _mm("visual.merger.mlp.0", m * v["hidden"], m * v["hidden"], "column", quarter, True),
            _ew("visual.merger.mlp.1", "activation", m * v["hidden"], shard="column", rows=quarter),
            _mm("visual.merger.mlp.2", m * v["hidden"], v["out_hidden"], "row", quarter, True),
        ])
    h = info.hidden
    emb = OpNode(name="embed_tokens", kind="embedding", module="model.embed_tokens", block="",
                 params=info.vocab * h, weight_elems=info.vocab * h, act_read=Affine(tokens=1),
                 act_written=Affine(tokens=h), shard="vocab", shape={"width": h})
    b.block("embed", "embedding", "text", 0, [emb])
    for j in range(info.layers):
        b.block(f"layers.{j}", "decoder", "text", j + 1, decoder_ops(f"layers.{j}", info, qkv_bias))
    b.block("norm", "final_norm", "text", info.layers + 1, [_ew("norm", "norm", h, params=h)])
    seqs = Affine(seqs=1)
    head = _mm("lm_head", h, info.vocab, "vocab", seqs, kind="lm_head")
    if info.tie_embeddings:
        head.params = 0
    b.block("lm_head", "lm_head", "text", info.layers + 2, [head])
    return OpGraph(info=info, graph=b.g, blocks=b.blocks, config_sha256=config_sha256(cfg))
