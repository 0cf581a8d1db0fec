"""Supported architectures: which HF classes make up each distinct block type.

For every supported architecture a ``Family`` builds, on the meta device, small *wrapper*
modules that chain exactly one instance of each distinct block type of a tower:

* text tower:   ``embed_tokens -> layer -> norm -> lm_head``   (input: token ids ``(1, T)``)
* vision tower: ``patch_embed -> block -> merger``             (input: patches ``(N, C*t*p*p)``)

The tracer exports each wrapper with ``torch.export`` and replicates ``layer`` / ``block``
once per layer. Rotary tables (cos, sin) are wrapper inputs: the model computes them once per
step, outside the blocks. The vision wrapper holds a constant ``cu_seqlens = [0, N]`` (one
image) so the HF vision attention's per-image split is static and export needs no
data-dependent guard. torch / transformers are imported inside the functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from plans.errors import UserError

SUPPORTED = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)


@dataclass(frozen=True)
class Family:
    """How to build the blocks of one architecture.

    ``module``: the transformers modeling module (dotted, under ``transformers.models``);
    ``layer_cls``/``norm_cls``: decoder layer and RMSNorm class names;
    ``text_prefix``: HF module path of the text model (``model`` or ``model.language_model``);
    ``vision``: ``"qwen2_vl"`` / ``"qwen2_5_vl"`` or None.
    """

    architecture: str
    module: str
    layer_cls: str
    norm_cls: str
    text_prefix: str
    vision: str | None = None


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LlamaForCausalLM", "llama.modeling_llama", "LlamaDecoderLayer", "LlamaRMSNorm", "model"),
    "MistralForCausalLM": Family("MistralForCausalLM", "mistral.modeling_mistral", "MistralDecoderLayer",
                                 "MistralRMSNorm", "model"),
    "Qwen2ForCausalLM": Family("Qwen2ForCausalLM", "qwen2.modeling_qwen2", "Qwen2DecoderLayer", "Qwen2RMSNorm", "model"),
    "Qwen2VLForConditionalGeneration": Family("Qwen2VLForConditionalGeneration", "qwen2_vl.modeling_qwen2_vl",
                                              "Qwen2VLDecoderLayer", "Qwen2VLRMSNorm", "model.language_model",
                                              vision="qwen2_vl"),
    "Qwen2_5_VLForConditionalGeneration": Family("Qwen2_5_VLForConditionalGeneration",
                                                 "qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLDecoderLayer",
                                                 "Qwen2_5_VLRMSNorm", "model.language_model", vision="qwen2_5_vl"),
}
VISION_PREFIX = "model.visual"


def family_of(cfg: dict[str, Any]) -> Family:
    """The Family of an HF config dict, or a UserError naming the architecture and the supported ones."""
    archs = cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch in FAMILIES:
        return FAMILIES[arch]
    what = f"architecture '{arch}'" if arch else f"model_type '{cfg.get('model_type')}' (no 'architectures' key)"
    raise UserError(f"unsupported {what}; the tracer supports: {', '.join(SUPPORTED)}")


def hf_config(cfg: dict[str, Any]) -> Any:
    """The transformers config object of ``cfg`` (sdpa attention everywhere).

    Built with the architecture's own config class (imported directly: much faster than
    ``AutoConfig``, which loads the mapping of every model type).
    """
    import copy
    import importlib

    fam = family_of(cfg)
    d = copy.deepcopy(cfg)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise UserError("model config has no 'model_type'; cannot build it with transformers")
    pkg = fam.module.split(".")[0]
    cls_name = fam.layer_cls.replace("DecoderLayer", "Config")
    try:
        cls = getattr(importlib.import_module(f"transformers.models.{pkg}.configuration_{pkg}"), cls_name)
        conf = cls(**d)
    except Exception as e:  # transformers' strict config validation raises its own error types
        msg = " ".join(str(e).split())
        raise UserError(f"transformers cannot build a '{model_type}' config from it: {msg}") from None
    for c in (conf, getattr(conf, "text_config", None), getattr(conf, "vision_config", None)):
        if c is not None:
            c._attn_implementation = "sdpa"
    return conf


def text_part(conf: Any) -> Any:
    """The text (decoder) config of a config object."""
    tc = getattr(conf, "text_config", None)
    return tc if tc is not None else conf


def head_dim(tc: Any) -> int:
    hd = getattr(tc, "head_dim", None)
    return int(hd) if hd else tc.hidden_size // tc.num_attention_heads


def _modeling(fam: Family) -> Any:
    import importlib

    return importlib.import_module(f"transformers.models.{fam.module}")


def text_wrapper(fam: Family, conf: Any) -> Callable[[int], tuple[Any, tuple[Any, ...]]]:
    """A function ``T -> (module, example_args)`` for the text wrapper at T tokens (meta device).

    The module is built once; only the example inputs depend on T:
    ids ``(1, T)`` int64, cos/sin ``(1, T, head_dim)``.
    """
    import torch
    from torch import nn

    m = _modeling(fam)
    tc = text_part(conf)
    layer_cls = getattr(m, fam.layer_cls)
    norm_cls = getattr(m, fam.norm_cls)

    class TextWrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(tc.vocab_size, tc.hidden_size)
            self.layer = layer_cls(tc, 0)
            self.norm = norm_cls(tc.hidden_size, eps=tc.rms_norm_eps)
            self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)

        def forward(self, ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            h = self.layer(self.embed_tokens(ids), attention_mask=None, position_embeddings=(cos, sin))
            if isinstance(h, tuple):  # older layers return (hidden,) tuples
                h = h[0]
            return self.lm_head(self.norm(h))

    with torch.device("meta"):
        mod = TextWrapper()
    hd = head_dim(tc)

    def make(t: int) -> tuple[Any, tuple[Any, ...]]:
        with torch.device("meta"):
            args = (torch.zeros(1, t, dtype=torch.long), torch.zeros(1, t, hd), torch.zeros(1, t, hd))
        return mod, args

    return make


def vision_wrapper(fam: Family, conf: Any) -> Callable[[int], tuple[Any, tuple[Any, ...]]]:
    """A function ``N -> (module, example_args)`` for the vision wrapper at N patches of one image.

    Inputs: patches ``(N, C*t*p*p)``, cos/sin ``(N, head_dim)``; N must be a multiple of
    ``spatial_merge_size**2``. The attention runs over the whole image (no window).
    """
    import torch
    from torch import nn

    m = _modeling(fam)
    vc = conf.vision_config
    if fam.vision == "qwen2_vl":
        dim, heads = vc.embed_dim, vc.num_heads
        patch = m.PatchEmbed(patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                             in_channels=vc.in_channels, embed_dim=vc.embed_dim)
        block_cls = m.Qwen2VLVisionBlock
        merger_f = lambda: m.PatchMerger(dim=vc.hidden_size, context_dim=vc.embed_dim,  # noqa: E731
                                         spatial_merge_size=vc.spatial_merge_size)
    else:
        dim, heads = vc.hidden_size, vc.num_heads
        patch = None
        block_cls = m.Qwen2_5_VLVisionBlock
        merger_f = lambda: m.Qwen2_5_VLPatchMerger(dim=vc.out_hidden_size, context_dim=vc.hidden_size,  # noqa: E731
                                                   spatial_merge_size=vc.spatial_merge_size)

    class VisionWrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0
            if fam.vision == "qwen2_vl":
                self.patch_embed = patch
            else:
                self.patch_embed = m.Qwen2_5_VisionPatchEmbed(
                    patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                    in_channels=vc.in_channels, embed_dim=vc.hidden_size)
            self.block = block_cls(vc)
            self.merger = merger_f()

        def forward(self, px: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            cu = torch.tensor([0, self.n], dtype=torch.int32)
            h = self.patch_embed(px)
            h = self.block(h, cu_seqlens=cu, position_embeddings=(cos, sin))
            return self.merger(h)

    with torch.device("meta"):
        mod = VisionWrapper()
    hd = dim // heads
    cin = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size

    def make(n: int) -> tuple[Any, tuple[Any, ...]]:
        mod.n = n
        with torch.device("meta"):
            args = (torch.zeros(n, cin), torch.zeros(n, hd), torch.zeros(n, hd))
        return mod, args

    return make
