"""Resolve a plan's model to the numbers the executors need (pure HF-config arithmetic).

``ModelArgs`` is read from the HF config dict (``graph.hf_config.load_config``), through the
transformers config class so rope parameters are normalised the same way the HF model sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from plans.errors import UserError
from plans.schema import Plan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_dtypes(plan: Plan) -> tuple[torch.dtype, torch.dtype, bool]:
    """``(compute dtype, KV-cache dtype, FP8 weights?)`` of a plan. FP8 weights compute in the KV
    dtype when that is fp32/bf16/fp16, else bf16; an FP8 KV cache stores e4m3 (scale 1). INT4
    weights are not run (UserError)."""
    w, kv = plan.model.weights_dtype, plan.model.kv_dtype
    if w not in DTYPES and w != "fp8":
        raise UserError(f"the executor runs weights in fp32, bf16, fp16 or fp8; plan {plan.name} asks for {w}")
    kv_t = torch.float8_e4m3fn if kv == "fp8" else DTYPES[kv]
    compute = DTYPES[w] if w in DTYPES else DTYPES.get(kv, torch.bfloat16)
    return compute, kv_t, w == "fp8"
DENSE_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
VL_ARCHS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


@dataclass(frozen=True)
class VisionArgs:
    """Qwen2-VL vision tower: patches of ``in_ch * t_patch * patch**2`` values -> ``embed_dim``;
    ``depth`` blocks; the merger folds ``merge**2`` patches into one LLM token of ``out_dim``."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    out_dim: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    merge: int
    act: str
    rope_theta: float = 10000.0
    qwen25: bool = False  # Qwen2.5-VL: RMSNorm, SwiGLU MLP, window attention except in fullatt blocks
    window_size: int = 0  # px
    fullatt_blocks: tuple[int, ...] = ()

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class ModelArgs:
    """A Llama-style decoder (Llama 3.x, Qwen2/2.5, Mistral, the Qwen2-VL language model)."""

    arch: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    rms_eps: float
    max_positions: int
    qkv_bias: bool
    tie_embeddings: bool
    o_bias: bool = False  # Llama's attention_bias: o_proj has one too (Qwen2's QKV bias does not)
    sliding_window: int | None = None  # keys a query attends to in the layers that use a window (None: no layer does)
    mlp_bias: bool = False  # Llama's mlp_bias: gate_proj, up_proj and down_proj
    hf_text_config: Any = field(repr=False, compare=False, default=None)  # transformers config (rope)
    mrope_section: tuple[int, ...] | None = None
    vision: VisionArgs | None = None
    image_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_inv_freq: tuple[float, ...] = ()  # [D/2], from the config's rope type (llama3 scaling etc.)
    rope_scale: float = 1.0

    def portable(self) -> "ModelArgs":
        """A copy without the transformers config object (what workers receive)."""
        return replace(self, hf_text_config=None)

    @property
    def is_vl(self) -> bool:
        return self.vision is not None


def limit_context(a: ModelArgs, max_context: int | None) -> ModelArgs:
    """``a`` serving at most ``max_context`` tokens a sequence (prompt + output; None: the model's
    own context, ``max_position_embeddings``): the engine rejects longer requests and captures its
    step graphs only up to that many keys (``executors.graphs``), so a deployment of short contexts
    warms up in a fraction of the time. UserError when the model attends within a sliding window
    shorter than the context served (the executor's attention has no window)."""
    if max_context is not None:
        if max_context < 1:
            raise UserError(f"max_context {max_context}: give at least 1 token")
        a = replace(a, max_positions=min(a.max_positions, max_context))
    w = a.sliding_window
    if w is not None and a.max_positions > w:  # within the window, full attention is the same
        raise UserError(f"the model's config attends within a sliding window of {w:,} tokens, and the executor "
                        f"attends over the whole context: past {w:,} tokens its outputs would differ. Serve at most "
                        f"{w:,} tokens a sequence (--max-context {w}; load(max_context={w}))")
    return a


def hf_config_object(cfg: dict[str, Any]) -> Any:
    """The transformers config object of an HF config dict (no hub access)."""
    from transformers import AutoConfig

    mt = cfg.get("model_type")
    if not mt:
        raise UserError("model config has no 'model_type'; cannot build the model")
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(mt, **kw)
    except (ValueError, KeyError) as e:
        raise UserError(f"model config of type '{mt}' is not understood by transformers: {e}") from None


def _eos(c: Any) -> tuple[int, ...]:
    e = getattr(c, "eos_token_id", None)
    if e is None:
        return ()
    return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)


def model_args(cfg: dict[str, Any]) -> ModelArgs:
    """Read ModelArgs from an HF config dict; UserError for architectures we cannot run."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                   "mistral": "MistralForCausalLM", "qwen2_vl": "Qwen2VLForConditionalGeneration",
                                   "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}.get(
        cfg.get("model_type", ""), str(cfg.get("model_type")))
    if arch not in DENSE_ARCHS + VL_ARCHS:
        raise UserError(f"the executor cannot run architecture '{arch}'; supported: {', '.join(DENSE_ARCHS + VL_ARCHS)}")
    full = hf_config_object(cfg)
    tc = getattr(full, "text_config", None) or full
    if not hasattr(tc, "hidden_size"):
        tc = full
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    rp = getattr(tc, "rope_parameters", None) or {}
    mrope = rp.get("mrope_section") if isinstance(rp, dict) else None
    if mrope is None and arch in VL_ARCHS:
        rs = getattr(tc, "rope_scaling", None) or {}
        mrope = rs.get("mrope_section")
    vision = None
    if arch in VL_ARCHS:
        vc = full.vision_config
        common = dict(depth=vc.depth, num_heads=vc.num_heads, patch_size=vc.patch_size,
                      temporal_patch_size=vc.temporal_patch_size, in_channels=vc.in_channels,
                      merge=vc.spatial_merge_size, act=vc.hidden_act)
        if arch == "Qwen2_5_VLForConditionalGeneration":
            vision = VisionArgs(embed_dim=vc.hidden_size, mlp_dim=vc.intermediate_size, out_dim=vc.out_hidden_size,
                                qwen25=True, window_size=vc.window_size,
                                fullatt_blocks=tuple(vc.fullatt_block_indexes), **common)
        else:
            vision = VisionArgs(embed_dim=vc.embed_dim, mlp_dim=int(vc.embed_dim * vc.mlp_ratio),
                                out_dim=vc.hidden_size, **common)
    tie = bool(getattr(full, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
    window, types = getattr(tc, "sliding_window", None), getattr(tc, "layer_types", None)
    window = window if window and (types is None or "sliding_attention" in types) else None  # Mistral: every layer
    args = ModelArgs(
        arch=arch, hidden=tc.hidden_size, heads=heads, kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        head_dim=head_dim, intermediate=tc.intermediate_size, layers=tc.num_hidden_layers, vocab=tc.vocab_size,
        rms_eps=tc.rms_norm_eps, max_positions=tc.max_position_embeddings,
        qkv_bias=arch in ("Qwen2ForCausalLM",) + VL_ARCHS or (arch == "LlamaForCausalLM" and
                                                             bool(getattr(tc, "attention_bias", False))),
        tie_embeddings=tie, o_bias=arch == "LlamaForCausalLM" and bool(getattr(tc, "attention_bias", False)),
        mlp_bias=arch == "LlamaForCausalLM" and bool(getattr(tc, "mlp_bias", False)), sliding_window=window,
        hf_text_config=tc, mrope_section=tuple(mrope) if mrope else None, vision=vision,
        image_token_id=getattr(full, "image_token_id", None), eos_token_ids=_eos(tc) or _eos(full),
    )
    from executors.rope import rope_frequencies

    freq, scale = rope_frequencies(tc, head_dim)
    return replace(args, rope_inv_freq=tuple(freq.tolist()), rope_scale=scale)


def plan_config(plan: Plan, base_dir: str | Path | None = None) -> dict[str, Any]:
    """The HF config dict a plan names (preset, or a config path relative to ``base_dir``)."""
    from graph.hf_config import load_config

    if plan.model.preset:
        return load_config(preset=plan.model.preset)
    if plan.model.config:
        p = Path(plan.model.config)
        if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
            p = Path(base_dir) / p  # relative to the plan file, else to the working directory
        return load_config(config=p)
    raise UserError(f"plan {plan.name}: model has neither preset nor config")


# ModelArgs fields that change what the model computes (not ``max_positions``, a serving limit, nor
# the stop tokens), named as a user would know them
SAME_MODEL_FIELDS = {"arch": "architecture", "hidden": "hidden_size", "heads": "num_attention_heads",
                     "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate": "intermediate_size",
                     "layers": "num_hidden_layers", "vocab": "vocab_size", "rms_eps": "rms_norm_eps",
                     "qkv_bias": "QKV bias", "o_bias": "attention_bias", "mlp_bias": "mlp_bias",
                     "tie_embeddings": "tie_word_embeddings", "mrope_section": "mrope_section",
                     "vision": "vision_config", "image_token_id": "image_token_id",
                     "rope_inv_freq": "rope frequencies (rope_theta, rope scaling)", "rope_scale": "rope attention scale",
                     "sliding_window": "sliding_window"}


def check_checkpoint_config(a: ModelArgs, weights: str | Path, plan: Plan) -> None:
    """UserError when a checkpoint's own ``config.json`` describes another model than the plan's:
    same tensor shapes can hide another rope base or scaling, norm epsilon or tied head (Llama 3 and
    3.1 differ only in rope scaling), which would run without an error and give other tokens. A
    checkpoint without a config, or with one this transformers cannot read, is not checked."""
    import math

    from graph.hf_config import read_config

    path = Path(weights) / "config.json"
    if not path.is_file():
        return
    try:
        theirs = model_args(read_config(path))
    except UserError:
        return
    diff = []
    for f, label in SAME_MODEL_FIELDS.items():
        x, y = getattr(theirs, f), getattr(a, f)
        same = (len(x) == len(y) and all(math.isclose(u, v, rel_tol=1e-6) for u, v in zip(x, y))) \
            if f == "rope_inv_freq" else x == y
        if not same:
            diff.append(f"{label}: " + ("other values" if f in ("rope_inv_freq", "vision") else f"{x} here, {y} in the plan"))
    if diff:
        source = f"preset {plan.model.preset}" if plan.model.preset else f"config {plan.model.config}"
        raise UserError(f"weights {Path(weights)}: its config.json describes another model than plan {plan.name} "
                        f"({source}): {'; '.join(diff)}. Compile the plan from this checkpoint's config "
                        f"(model: config: {path})")
