"""Check an HF config dict before tracing, so a bad config gets a named error, not a traceback.

Pure Python (no torch). Checks what the tracer relies on: positive integer sizes (layers and
vision blocks at most ``MAX_LAYERS``; a positive context when one is given), heads that
divide the hidden size, KV heads that divide the query heads, a model_type that matches the
architecture, and for the VL models a vision_config whose sizes fit together.
"""

from __future__ import annotations

from typing import Any

from graph.hf_config import text_config
from plans.errors import UserError

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
TEXT_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


MAX_LAYERS = 4096  # decoder layers or vision blocks: 30x the deepest model shipped; tracing is linear in them


def _pos_int(d: dict[str, Any], key: str, where: str, required: bool = True, most: int | None = None) -> int | None:
    if key not in d or d[key] is None:
        if required:
            raise UserError(f"model config: {where}'{key}' is missing")
        return None
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"model config: {where}'{key}' must be a positive integer, got {v!r}")
    if most is not None and v > most:
        raise UserError(f"model config: {where}'{key}' is {v:,}; at most {most:,} are supported")
    return v


def check_config(cfg: dict[str, Any], architecture: str) -> None:
    """Raise ``UserError`` naming the first problem of ``cfg`` for ``architecture``."""
    want = MODEL_TYPES.get(architecture)
    got = cfg.get("model_type")
    if want and got != want:
        raise UserError(f"model config: architecture {architecture} needs model_type '{want}', "
                        f"the config says {got!r}")
    tc = text_config(cfg)
    h, heads, _, _, _ = (_pos_int(tc, k, "", most=MAX_LAYERS if k == "num_hidden_layers" else None)
                         for k in TEXT_REQUIRED)
    assert h is not None and heads is not None
    _pos_int(tc, "max_position_embeddings", "", required=False)  # the context: 0 or -5 is no context
    kv = _pos_int(tc, "num_key_value_heads", "", required=False) or heads
    hd = _pos_int(tc, "head_dim", "", required=False)
    if hd is None and h % heads:
        raise UserError(f"model config: hidden_size {h} is not a multiple of num_attention_heads {heads} "
                        f"({h} / {heads} = {h / heads:.3g}) and no head_dim is given")
    if heads % kv:
        raise UserError(f"model config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv} "
                        f"({heads} / {kv} = {heads / kv:.3g})")
    if want in ("qwen2_vl", "qwen2_5_vl"):
        _check_vision(cfg, want, h)


def _check_vision(cfg: dict[str, Any], model_type: str, text_hidden: int) -> None:
    vc = cfg.get("vision_config")
    if not isinstance(vc, dict):
        raise UserError(f"model config: a {model_type} model needs a 'vision_config' object")
    w = "vision_config."
    dim_key = "embed_dim" if model_type == "qwen2_vl" else "hidden_size"
    dim = _pos_int(vc, dim_key, w, required=False) or 1280
    heads = _pos_int(vc, "num_heads", w, required=False) or 16
    depth = _pos_int(vc, "depth", w, required=False, most=MAX_LAYERS) or 32
    patch = _pos_int(vc, "patch_size", w, required=False) or 14
    merge = _pos_int(vc, "spatial_merge_size", w, required=False) or 2
    _pos_int(vc, "temporal_patch_size", w, required=False)
    if dim % heads:
        raise UserError(f"model config: {w}{dim_key} {dim} is not a multiple of {w}num_heads {heads} "
                        f"({dim} / {heads} = {dim / heads:.3g})")
    if model_type == "qwen2_vl":
        out = _pos_int(vc, "hidden_size", w, required=False)
        if out is not None and out != text_hidden:
            raise UserError(f"model config: {w}hidden_size {out} (the merger's output) must equal the "
                            f"language model's hidden_size {text_hidden}")
        return
    out = _pos_int(vc, "out_hidden_size", w, required=False)
    if out is not None and out != text_hidden:
        raise UserError(f"model config: {w}out_hidden_size {out} must equal the language model's "
                        f"hidden_size {text_hidden}")
    window = _pos_int(vc, "window_size", w, required=False)
    if window is not None and window % (patch * merge):
        raise UserError(f"model config: {w}window_size {window} is not a multiple of patch_size * "
                        f"spatial_merge_size = {patch} * {merge} = {patch * merge}")
    full = vc.get("fullatt_block_indexes", [])
    if not isinstance(full, list) or any(not isinstance(i, int) or not 0 <= i < depth for i in full):
        raise UserError(f"model config: {w}fullatt_block_indexes must list block numbers in 0..{depth - 1}, "
                        f"got {full!r}")
