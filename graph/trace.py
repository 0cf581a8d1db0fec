"""Trace an HF config into an ``OpGraph``: export one block per distinct block type, replicate.

Steps (all on the meta device, no weights, no memory):

1. ``graph.families`` builds a text wrapper (embed -> one decoder layer -> norm -> lm_head) and,
   for Qwen2-VL / Qwen2.5-VL, a vision wrapper (patch embed -> one vision block -> merger).
2. Each wrapper is exported once with ``torch.export`` (T = 32 tokens; N = 64 patches of one
   image) and ``graph.build_ops`` reads every logical op's FLOPs / activation elements per token
   off the exported shapes (value / T: all activations scale with the tokens). With
   ``check_linear=True`` each wrapper is exported at a second size too and the two are fitted as
   ``const + per_token * T``; a nonzero const (an op not proportional to the tokens) raises.
3. Attention is the op a shape cannot price: FLOPs = 4 * heads * head_dim * S (QK^T and PV, S
   attention pairs); reads q (heads*head_dim per token) and new k, v (2*kv_heads*head_dim per
   token), writes its output, writes the new tokens' K/V to the cache (2*kv_heads*head_dim*T)
   and reads the cached K/V (2*kv_heads*head_dim*K). Vision attention has no cache.
4. The lm_head runs once per sequence (serving engines keep only each sequence's last hidden
   state), so its per-token costs become per-sequence costs.
5. The decoder layer is replicated ``num_hidden_layers`` times (``layers.{i}.*``; attention
   ``shape["sliding_window"]`` is the layer's window or None) and the vision block ``depth``
   times (``visual.blocks.{i}.*``; Qwen2.5-VL attention has ``shape["window"]`` True except in
   ``fullatt_block_indexes``: ``graph.vision_windows.attention_pairs`` gives its pairs for given
   image grids); blocks are chained into one networkx DiGraph in dataflow order.

Memory fields are elements (``graph.opgraph``); the embedding's ``weight_elems`` is 0 because a
lookup reads only the gathered rows (``act_read`` = hidden per token), not the whole table. With
tied embeddings the lm_head has ``params`` 0 (counted once, in the embedding), ``shape["tied"]``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import networkx as nx

from graph.build_ops import FittedOp, extract, fit, proportional
from graph.families import VISION_PREFIX, Family, family_of, head_dim, hf_config, text_part
from graph.hf_config import config_sha256
from graph.opgraph import Affine, Block, ModelInfo, OpGraph, OpNode
from graph.validate import check_config
from plans.errors import UserError

TRACER_VERSION = 5
TEXT_SIZES = (32, 16)  # the first is used; the second only with check_linear
VISION_SIZES = (64, 16)  # multiples of spatial_merge_size**2

# wrapper segment -> block kind
TEXT_SEGMENTS = {"embed_tokens": "embedding", "layer": "decoder", "norm": "final_norm", "lm_head": "lm_head"}
VISION_SEGMENTS = {"patch_embed": "vision_patch_embed", "block": "vision_block", "merger": "merger"}


def trace_config(cfg: dict[str, Any], *, check_linear: bool = False) -> OpGraph:
    """The op graph of an HF config dict (a supported architecture, else ``UserError``).

    ``check_linear``: export every wrapper at two sizes and verify that all costs are
    proportional to the token count (slower; used by the tests).
    """
    fam = family_of(cfg)
    check_config(cfg, fam.architecture)
    t0 = time.perf_counter()
    conf = hf_config(cfg)
    tc = text_part(conf)
    from graph.families import text_wrapper, vision_wrapper

    try:
        text_ops = _measure(text_wrapper(fam, conf), TEXT_SIZES, check_linear)
        vision_ops = _measure(vision_wrapper(fam, conf), VISION_SIZES, check_linear) if fam.vision else None
    except UserError:
        raise
    except Exception as e:  # a config transformers accepts but cannot run: name it, no traceback
        msg = " ".join(str(e).split())[:500]
        raise UserError(f"cannot trace {fam.architecture} from this config: {type(e).__name__}: {msg}") from None
    info = _model_info(fam, conf, tc)
    g, blocks = _assemble(fam, info, text_ops, vision_ops, _sliding_windows(tc))
    return OpGraph(info=info, graph=g, blocks=blocks, config_sha256=config_sha256(cfg),
                   trace_seconds=round(time.perf_counter() - t0, 4))


def _measure(make: Callable[[int], tuple[Any, tuple[Any, ...]]], sizes: tuple[int, int],
             check_linear: bool) -> list[FittedOp]:
    import logging
    import warnings

    import torch

    measured = []
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for n in sizes if check_linear else sizes[:1]:
        mod, args = make(n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(mod, args, strict=False)
        measured.append(extract(ep))
    if not check_linear:
        return proportional(measured[0], sizes[0])
    fitted = fit(measured[1], measured[0], sizes[1], sizes[0])
    for op in fitted:
        for field in ("flops", "act_read", "act_written"):
            const, per = getattr(op, field)
            if abs(const) > 1e-6 * max(1.0, abs(per)):
                raise RuntimeError(f"{op.name}.{field} is not proportional to the tokens: {const} + {per}*T")
    return fitted


def _model_info(fam: Family, conf: Any, tc: Any) -> ModelInfo:
    vision = None
    if fam.vision:
        vc = conf.vision_config
        v2 = fam.vision == "qwen2_vl"
        hidden = vc.embed_dim if v2 else vc.hidden_size
        vision = {
            "depth": vc.depth,
            "hidden": hidden,
            "heads": vc.num_heads,
            "head_dim": hidden // vc.num_heads,
            "intermediate": int(hidden * vc.mlp_ratio) if v2 else vc.intermediate_size,
            "patch_size": vc.patch_size,
            "spatial_merge_size": vc.spatial_merge_size,
            "temporal_patch_size": vc.temporal_patch_size,
            "in_channels": vc.in_channels,
            "in_chans": vc.in_channels,  # the key costmodels.synthetic uses
            "window_size": None if v2 else vc.window_size,
            "fullatt_block_indexes": None if v2 else list(vc.fullatt_block_indexes),
            "out_hidden": vc.hidden_size if v2 else vc.out_hidden_size,
        }
    tie = bool(getattr(conf, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
    return ModelInfo(
        architecture=fam.architecture, hidden=tc.hidden_size, layers=tc.num_hidden_layers,
        heads=tc.num_attention_heads, kv_heads=tc.num_key_value_heads or tc.num_attention_heads,
        head_dim=head_dim(tc), intermediate=tc.intermediate_size, vocab=tc.vocab_size,
        max_context=int(getattr(tc, "max_position_embeddings", 0) or 0), tie_embeddings=tie, vision=vision)


def _sliding_windows(tc: Any) -> list[int | None]:
    """Per decoder layer: its sliding-window length, or None for full causal attention.

    transformers >= 5 records ``layer_types`` ("sliding_attention" / "full_attention") and clears
    ``sliding_window`` when the config disables it (Qwen2's ``use_sliding_window: false``).
    """
    sw = getattr(tc, "sliding_window", None)
    if getattr(tc, "use_sliding_window", True) is False:
        sw = None
    types = getattr(tc, "layer_types", None) or []
    out: list[int | None] = []
    for i in range(tc.num_hidden_layers):
        kind = types[i] if i < len(types) else ("sliding_attention" if sw else "full_attention")
        out.append(int(sw) if sw and kind == "sliding_attention" else None)
    return out


def _segment(name: str, segments: dict[str, str]) -> str:
    head = name.split(".", 1)[0]
    if head not in segments:
        raise RuntimeError(f"traced op '{name}' lies outside the known blocks {sorted(segments)}")
    return head


def _affine(pair: tuple[float, float], per: str = "tokens") -> Affine:
    c, t = pair
    return Affine(const=c, **{per: t})


def _shard(op: FittedOp, kind: str, within: dict[str, str]) -> str:
    """Megatron-style TP split, propagated along the block's dataflow.

    A matmul reading a column/heads-sharded op is row-parallel, else column-parallel; attention
    and rope are split by heads; an element-wise op whose inputs are all sharded keeps their
    split; norms, residual adds and anything reading the replicated stream stay replicated.
    """
    if kind == "embedding" or kind == "lm_head":
        return "vocab"
    if kind == "patch_embed":
        return "replicated"
    if kind in ("attention", "rope"):
        return "heads"
    ins = [within[p] for p in op.preds if p in within]
    if kind == "matmul":
        return "row" if any(s in ("column", "heads") for s in ins) else "column"
    if kind == "norm" or not ins or any(s in ("replicated", "row", "vocab") for s in ins):
        return "replicated"
    return "heads" if "heads" in ins else "column"


def _attention_costs(op: FittedOp, kv_heads: int, cached: bool) -> dict[str, Any]:
    h, d = op.shape["heads"], op.shape["head_dim"]
    g = kv_heads if cached else h
    out: dict[str, Any] = {
        "flops": Affine(pairs=4.0 * h * d),
        "act_read": Affine(tokens=float((h + 2 * g) * d)),
        "act_written": Affine(tokens=float(h * d)),
    }
    if cached:
        out["kv_read"] = Affine(kv=float(2 * g * d))
        out["kv_written"] = Affine(tokens=float(2 * g * d))
    return out


class _Template:
    """The fitted ops of one segment with their in-segment dataflow, shard and entry/exit ops."""

    def __init__(self, seg: str, kind: str, ops: list[FittedOp], all_names: dict[str, str]):
        self.seg, self.kind = seg, kind
        self.ops = ops
        names = {o.name for o in ops}
        self.entries = [o.name for o in ops if any(all_names.get(p) != seg for p in o.preds) or not o.preds]
        self.exits: list[str] = []
        self.shard: dict[str, str] = {}
        for o in ops:
            k = "lm_head" if kind == "lm_head" and o.kind == "matmul" else o.kind
            self.shard[o.name] = _shard(o, k, self.shard)
        self.internal_preds = {o.name: [p for p in o.preds if p in names] for o in ops}

    def rel(self, name: str) -> str:
        return name[len(self.seg) + 1:] if name.startswith(self.seg + ".") else ""


def _templates(ops: list[FittedOp], segments: dict[str, str]) -> list[_Template]:
    seg_of = {o.name: _segment(o.name, segments) for o in ops}
    order: list[str] = []
    for o in ops:
        if seg_of[o.name] not in order:
            order.append(seg_of[o.name])
    temps = [_Template(s, segments[s], [o for o in ops if seg_of[o.name] == s], seg_of) for s in order]
    # exits: ops of a segment read by a later segment (or the last op of the last segment)
    by_seg = {t.seg: t for t in temps}
    for o in ops:
        for p in o.preds:
            if seg_of[p] != seg_of[o.name] and p not in by_seg[seg_of[p]].exits:
                by_seg[seg_of[p]].exits.append(p)
    if not temps[-1].exits:
        temps[-1].exits = [temps[-1].ops[-1].name]
    return temps


def _assemble(fam: Family, info: ModelInfo, text_ops: list[FittedOp], vision_ops: list[FittedOp] | None,
              sliding: list[int | None]) -> tuple[nx.DiGraph, list[Block]]:
    g = nx.DiGraph()
    blocks: list[Block] = []
    text_prefix = fam.text_prefix

    def emit(t: _Template, block_name: str, op_prefix: str, hf_prefix: str, tower: str, index: int,
             extra_shape: dict[str, Any] | None = None) -> tuple[list[str], list[str]]:
        rename: dict[str, str] = {}
        names: list[str] = []
        params = 0
        for o in t.ops:
            rel = t.rel(o.name)
            name = f"{op_prefix}.{rel}" if rel else op_prefix
            rename[o.name] = name
            mrel = t.rel(o.module) if o.module != t.seg else ""
            module = f"{hf_prefix}.{mrel}" if mrel else hf_prefix
            kind = o.kind
            shape = dict(o.shape)
            fields: dict[str, Any] = {
                "flops": _affine(o.flops), "act_read": _affine(o.act_read), "act_written": _affine(o.act_written)}
            op_params = o.params
            weight = o.params if kind in ("matmul", "norm", "patch_embed") else 0
            if t.kind == "lm_head" and kind == "matmul":
                kind = "lm_head"
                fields = {k: _affine(v, "seqs") for k, v in
                          (("flops", o.flops), ("act_read", o.act_read), ("act_written", o.act_written))}
                if info.tie_embeddings:
                    op_params, shape["tied"] = 0, True
            if kind == "attention":
                fields.update(_attention_costs(o, info.kv_heads, cached=(tower == "text")))
                shape["causal"] = tower == "text"
                if tower == "text":  # KV heads as cached (an export may show them repeated to all heads)
                    shape["kv_heads"] = info.kv_heads
                if extra_shape:
                    shape.update(extra_shape)
            node = OpNode(name=name, kind=kind, module=module, block=block_name, params=op_params,
                          weight_elems=weight, shard=t.shard[o.name], shape=shape, **fields)  # type: ignore[arg-type]
            g.add_node(name, op=node)
            for p in t.internal_preds[o.name]:
                g.add_edge(rename[p], name)
            names.append(name)
            params += op_params
        blocks.append(Block(name=block_name, kind=t.kind, tower=tower, index=index,  # type: ignore[arg-type]
                            params=params, ops=names))
        return [rename[e] for e in t.entries], [rename[x] for x in t.exits]

    def link(exits: list[str], entries: list[str]) -> None:
        for x in exits:
            for e in entries:
                g.add_edge(x, e)

    vision_exits: list[str] = []
    if vision_ops is not None:
        assert info.vision is not None
        full = set(info.vision["fullatt_block_indexes"] or [])
        windowed = info.vision["window_size"] is not None
        wp = (info.vision["window_size"] // info.vision["patch_size"]) ** 2 if windowed else None
        prev: list[str] = []
        idx = 0
        for t in _templates(vision_ops, VISION_SEGMENTS):
            reps = info.vision["depth"] if t.seg == "block" else 1
            for i in range(reps):
                if t.seg == "block":
                    win = windowed and i not in full
                    extra = {"window": win, "window_patches": wp if win else None}
                    bname, hf = f"visual.blocks.{i}", f"{VISION_PREFIX}.blocks.{i}"
                else:
                    extra, bname, hf = None, f"visual.{t.seg}", f"{VISION_PREFIX}.{t.seg}"
                ent, ext = emit(t, bname, bname, hf, "vision", idx, extra)
                link(prev, ent)
                prev, idx = ext, idx + 1
        vision_exits = prev

    prev = []
    idx = 0
    for t in _templates(text_ops, TEXT_SEGMENTS):
        reps = info.layers if t.seg == "layer" else 1
        for i in range(reps):
            if t.seg == "layer":
                bname, hf = f"layers.{i}", f"{text_prefix}.layers.{i}"
            elif t.seg == "lm_head":
                bname, hf = "lm_head", "lm_head"
            else:
                bname, hf = ("embed" if t.seg == "embed_tokens" else t.seg), f"{text_prefix}.{t.seg}"
            op_prefix = "embed_tokens" if t.seg == "embed_tokens" else bname
            extra = {"sliding_window": sliding[i]} if t.seg == "layer" else None
            ent, ext = emit(t, bname, op_prefix, hf, "text", idx, extra)
            link(prev, ent)
            if t.seg == "layer" and i == 0 and vision_exits:
                link(vision_exits, ent)
            prev, idx = ext, idx + 1
    return g, blocks
