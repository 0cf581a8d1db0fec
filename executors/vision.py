"""Qwen2-VL vision tower: patch embedding, 2-D rotary ViT blocks, 2x2 patch merger.

Input: ``pixels [N, C * t_patch * p * p]`` (the HF processor's flattened patches, grouped by
``merge x merge`` blocks) and each image's patch grid ``(t, h, w)``; output ``[N / merge^2,
out_dim]`` LLM embeddings. Attention is full within each frame of ``h * w`` patches. The tower is
held whole by every GPU that runs it (the plan's ``vision.placement`` decides which ones and how
images are split among them, see ``executors.stage``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from executors.config import VisionArgs
from executors.rope import rotate_half
from executors.weights import WeightSource


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh" if name.endswith("tanh") else "none")
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unsupported vision activation {name}")


def vision_pos(grid: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """``[N, 2]`` (row, col) of each patch, in merge-block order (as the processor lays them out)."""
    out = []
    for t, h, w in grid:
        hp = torch.arange(h)[:, None].expand(h, w)
        wp = torch.arange(w)[None, :].expand(h, w)
        shape = (h // merge, merge, w // merge, merge)
        hp = hp.reshape(shape).transpose(1, 2).flatten()
        wp = wp.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hp, wp], dim=-1).repeat(t, 1))
    return torch.cat(out)


class VisionTower:
    def __init__(self, v: VisionArgs, src: WeightSource, dtype: torch.dtype, device: torch.device):
        self.v, self.dtype, self.device = v, dtype, device

        def get(n: str) -> torch.Tensor:
            return src.rows("visual." + n).to(device, dtype)

        self.patch_w = get("patch_embed.proj.weight").reshape(v.embed_dim, -1)
        self.blocks = []
        for i in range(v.depth):
            b = f"blocks.{i}."
            self.blocks.append({k: get(b + k) for k in (
                "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight", "attn.qkv.bias",
                "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")})
        self.merger = {k: get("merger." + k) for k in (
            "ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")}
        hd = v.embed_dim // v.num_heads
        half = hd // 2
        self.inv_freq = 1.0 / (v.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))

    def __call__(self, pixels: torch.Tensor, grid: list[tuple[int, int, int]]) -> torch.Tensor:
        v = self.v
        x = F.linear(pixels.to(self.device, self.dtype), self.patch_w)  # [N, E]
        pos = vision_pos(grid, v.merge).float()
        ang = torch.cat([pos[:, :1] * self.inv_freq, pos[:, 1:] * self.inv_freq], dim=-1)
        ang = torch.cat([ang, ang], dim=-1).to(self.device)
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [N, 1, hd]
        frames = [h * w for t, h, w in grid for _ in range(t)]
        heads, hd = v.num_heads, v.embed_dim // v.num_heads
        for b in self.blocks:
            h = F.layer_norm(x, (v.embed_dim,), b["norm1.weight"], b["norm1.bias"], 1e-6)
            q, k, val = F.linear(h, b["attn.qkv.weight"], b["attn.qkv.bias"]).reshape(-1, 3, heads, hd).unbind(1)
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
            outs = []
            for qs, ks, vs in zip(q.split(frames), k.split(frames), val.split(frames)):
                o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                                   vs.transpose(0, 1)[None], scale=1.0 / math.sqrt(hd))
                outs.append(o[0].transpose(0, 1).reshape(qs.shape[0], -1))
            x = x + F.linear(torch.cat(outs), b["attn.proj.weight"], b["attn.proj.bias"])
            h = F.layer_norm(x, (v.embed_dim,), b["norm2.weight"], b["norm2.bias"], 1e-6)
            x = x + F.linear(_act(v.act, F.linear(h, b["mlp.fc1.weight"], b["mlp.fc1.bias"])),
                             b["mlp.fc2.weight"], b["mlp.fc2.bias"])
        m = self.merger
        x = F.layer_norm(x, (v.embed_dim,), m["ln_q.weight"], m["ln_q.bias"], 1e-6).reshape(-1, v.embed_dim * v.merge**2)
        return F.linear(F.gelu(F.linear(x, m["mlp.0.weight"], m["mlp.0.bias"])), m["mlp.2.weight"], m["mlp.2.bias"])


def vision_shapes(v: VisionArgs) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of the tower (for seeded random weights)."""
    E, M = v.embed_dim, v.embed_dim * v.merge**2
    s: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        "visual.merger.ln_q.weight": (E,), "visual.merger.ln_q.bias": (E,),
        "visual.merger.mlp.0.weight": (M, M), "visual.merger.mlp.0.bias": (M,),
        "visual.merger.mlp.2.weight": (v.out_dim, M), "visual.merger.mlp.2.bias": (v.out_dim,),
    }
    for i in range(v.depth):
        b = f"visual.blocks.{i}."
        s.update({b + "norm1.weight": (E,), b + "norm1.bias": (E,), b + "norm2.weight": (E,), b + "norm2.bias": (E,),
                  b + "attn.qkv.weight": (3 * E, E), b + "attn.qkv.bias": (3 * E,),
                  b + "attn.proj.weight": (E, E), b + "attn.proj.bias": (E,),
                  b + "mlp.fc1.weight": (v.mlp_dim, E), b + "mlp.fc1.bias": (v.mlp_dim,),
                  b + "mlp.fc2.weight": (E, v.mlp_dim), b + "mlp.fc2.bias": (E,)})
    return s
