"""Rotary position embeddings: 1-D (Llama, incl. llama3 scaling) and Qwen2-VL's M-RoPE.

M-RoPE: positions are ``[3, T]`` (temporal, height, width rows). The ``D/2`` frequencies are cut
into ``mrope_section`` pieces; piece i takes its angles from row ``i % 3``. Text tokens carry the
same value in all three rows, so M-RoPE reduces to 1-D RoPE for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from executors.config import ModelArgs


def rope_frequencies(tc: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """``inv_freq [D/2]`` and the attention scaling of an HF text config's rope type."""
    rp = getattr(tc, "rope_parameters", None) or {}
    rope_type = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    if rope_type in ("default", "mrope"):
        base = rp.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    f, scale = ROPE_INIT_FUNCTIONS[rope_type](tc, torch.device("cpu"))
    return f.float(), float(scale)


def inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """The model's rotary frequencies (computed once from the HF config, see ``model_args``)."""
    return torch.tensor(args.rope_inv_freq, dtype=torch.float32), args.rope_scale


def cos_sin(pos: torch.Tensor, freq: torch.Tensor, scale: float,
            mrope_section: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``pos`` [T] or [3, T] -> cos, sin ``[T, D]`` (fp32)."""
    freq = freq.to(pos.device)
    if pos.dim() == 1:
        ang = pos[:, None].float() * freq  # [T, D/2]
    else:
        a3 = pos[..., None].float() * freq  # [3, T, D/2]
        if mrope_section:
            chunks = a3.split(list(mrope_section), dim=-1)
            ang = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
        else:
            ang = a3[0]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos() * scale, ang.sin() * scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, D]`` rotated by ``cos/sin [T, D]`` (computed in fp32, cast back)."""
    xf = x.float()
    out = xf * cos[:, None, :] + rotate_half(xf) * sin[:, None, :]
    return out.to(x.dtype)
