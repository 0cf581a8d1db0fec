"""Qwen2-VL / Qwen2.5-VL vision tower: patch embedding, 2-D rotary ViT blocks, 2x2 patch merger.

Qwen2.5-VL differs by RMSNorm, a SwiGLU MLP with biases, and window attention: patches are
reordered window by window (windows of ``window_size / patch / merge`` merged tokens per side),
blocks attend within a window except the ``fullatt_block_indexes`` blocks (within a frame), and
the merged output is put back in raster order.

Input: ``pixels [N, C * t_patch * p * p]`` (the HF processor's flattened patches, grouped by
``merge x merge`` blocks) and each image's patch grid ``(t, h, w)``; output ``[N / merge^2,
out_dim]`` LLM embeddings. Attention is full within each frame of ``h * w`` patches. The tower is
held whole by every GPU that runs it (the plan's ``vision.placement`` decides which ones and how
images are split among them, see ``executors.stage``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from executors.config import VisionArgs
from executors.parallel import all_reduce
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
    def __init__(self, v: VisionArgs, src: WeightSource, dtype: torch.dtype, device: torch.device,
                 tp_group: Any = None, tp_rank: int = 0, tp_size: int = 1):
        """With ``tp_size > 1`` the blocks are TP-sharded (heads and MLP columns split, proj and
        MLP-out rows split, all-reduce over ``tp_group``); patch embed and merger stay whole."""
        self.v, self.dtype, self.device = v, dtype, device
        self.group, self.tp = tp_group, tp_size
        hd = v.embed_dim // v.num_heads
        E = v.embed_dim

        def get(n: str, runs: list[tuple[int, int]] | None = None, dim: int = 0) -> torch.Tensor:
            return src.rows("visual." + n, runs, dim).to(device, dtype)

        self.patch_w = get("patch_embed.proj.weight").reshape(v.embed_dim, -1)
        nh, nf = v.num_heads // tp_size, v.mlp_dim // tp_size
        h0, f0 = tp_rank * nh * hd, tp_rank * nf
        heads = [(part * E + h0, part * E + h0 + nh * hd) for part in range(3)]  # q, k, v rows of my heads
        cols = {"attn.qkv.weight": (heads, 0), "attn.qkv.bias": (heads, 0), "attn.proj.weight": ([(h0, h0 + nh * hd)], 1),
                "mlp.fc1.weight": ([(f0, f0 + nf)], 0), "mlp.fc1.bias": ([(f0, f0 + nf)], 0),
                "mlp.fc2.weight": ([(f0, f0 + nf)], 1), "mlp.down_proj.weight": ([(f0, f0 + nf)], 1)}
        for n in ("gate", "up"):
            cols[f"mlp.{n}_proj.weight"] = cols[f"mlp.{n}_proj.bias"] = ([(f0, f0 + nf)], 0)
        self.blocks = []
        for i in range(v.depth):
            b = f"blocks.{i}."
            self.blocks.append({k: get(b + k, *cols[k]) if (tp_size > 1 and k in cols) else get(b + k)
                                for k in block_keys(v)})
        self.merger = {k: get("merger." + k) for k in merger_keys(v)}
        half = hd // 2
        self.inv_freq = 1.0 / (v.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))

    def _norm(self, x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
        if self.v.qwen25:
            xf = x.float()
            return w[name + ".weight"] * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return F.layer_norm(x, (self.v.embed_dim,), w[name + ".weight"], w[name + ".bias"], 1e-6)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(x, self.group) if self.tp > 1 else x

    def _mlp(self, h: torch.Tensor, b: dict) -> torch.Tensor:
        """Column-parallel in, row-parallel out; the out bias is added once, after the all-reduce."""
        if self.v.qwen25:
            g = _act(self.v.act, F.linear(h, b["mlp.gate_proj.weight"], b["mlp.gate_proj.bias"]))
            y = F.linear(g * F.linear(h, b["mlp.up_proj.weight"], b["mlp.up_proj.bias"]), b["mlp.down_proj.weight"])
            return self._reduce(y) + b["mlp.down_proj.bias"]
        y = F.linear(_act(self.v.act, F.linear(h, b["mlp.fc1.weight"], b["mlp.fc1.bias"])), b["mlp.fc2.weight"])
        return self._reduce(y) + b["mlp.fc2.bias"]

    def __call__(self, pixels: torch.Tensor, grid: list[tuple[int, int, int]]) -> torch.Tensor:
        v = self.v
        x = F.linear(pixels.to(self.device, self.dtype), self.patch_w)  # [N, E]
        pos = vision_pos(grid, v.merge).float()
        ang = torch.cat([pos[:, :1] * self.inv_freq, pos[:, 1:] * self.inv_freq], dim=-1)
        ang = torch.cat([ang, ang], dim=-1).to(self.device)
        frames = [h * w for t, h, w in grid for _ in range(t)]
        windows = frames
        unit = v.merge**2
        if v.qwen25:
            order, windows = window_order(grid, v.merge, v.window_size // v.merge // v.patch_size)
            order = order.to(self.device)
            x = x.reshape(-1, unit, v.embed_dim)[order].reshape(-1, v.embed_dim)
            ang = ang.reshape(-1, unit, ang.shape[-1])[order].reshape(-1, ang.shape[-1])
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [N, 1, hd]
        heads, hd = v.num_heads // self.tp, v.embed_dim // v.num_heads
        for i, b in enumerate(self.blocks):
            spans = frames if (not v.qwen25 or i in v.fullatt_blocks) else windows
            h = self._norm(x, b, "norm1")
            q, k, val = F.linear(h, b["attn.qkv.weight"], b["attn.qkv.bias"]).reshape(-1, 3, heads, hd).unbind(1)
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
            outs = []
            for qs, ks, vs in zip(q.split(spans), k.split(spans), val.split(spans)):
                o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                                   vs.transpose(0, 1)[None], scale=1.0 / math.sqrt(hd))
                outs.append(o[0].transpose(0, 1).reshape(qs.shape[0], -1))
            x = x + self._reduce(F.linear(torch.cat(outs), b["attn.proj.weight"])) + b["attn.proj.bias"]
            x = x + self._mlp(self._norm(x, b, "norm2"), b)
        m = self.merger
        x = self._norm(x, m, "ln_q").reshape(-1, v.embed_dim * unit)
        out = F.linear(F.gelu(F.linear(x, m["mlp.0.weight"], m["mlp.0.bias"])), m["mlp.2.weight"], m["mlp.2.bias"])
        if v.qwen25:
            out = out[torch.argsort(order)]
        return out


def window_order(grid: list[tuple[int, int, int]], merge: int, win: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL windows: the merged-token order that lists tokens window by window (``win x win``
    merged tokens, windows clipped at the image edge), and each window's length in patches."""
    order: list[torch.Tensor] = []
    lens: list[int] = []
    base = 0
    for t, h, w in grid:
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        for ti in range(t):
            for wy in range(0, gh, win):
                for wx in range(0, gw, win):
                    blk = idx[ti, wy:wy + win, wx:wx + win].flatten()
                    order.append(blk + base)
                    lens.append(blk.numel() * merge**2)
        base += t * gh * gw
    return torch.cat(order), lens


def block_keys(v: VisionArgs) -> tuple[str, ...]:
    attn = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias")
    if v.qwen25:
        return ("norm1.weight", "norm2.weight") + attn + tuple(
            f"mlp.{n}_proj.{k}" for n in ("gate", "up", "down") for k in ("weight", "bias"))
    return ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias") + attn + (
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def merger_keys(v: VisionArgs) -> tuple[str, ...]:
    ln = ("ln_q.weight",) if v.qwen25 else ("ln_q.weight", "ln_q.bias")
    return ln + ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")


def vision_shapes(v: VisionArgs) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of the tower (for seeded random weights)."""
    E, M, F_ = v.embed_dim, v.embed_dim * v.merge**2, v.mlp_dim
    shapes = {"norm1.weight": (E,), "norm1.bias": (E,), "norm2.weight": (E,), "norm2.bias": (E,),
              "attn.qkv.weight": (3 * E, E), "attn.qkv.bias": (3 * E,), "attn.proj.weight": (E, E),
              "attn.proj.bias": (E,), "mlp.fc1.weight": (F_, E), "mlp.fc1.bias": (F_,), "mlp.fc2.weight": (E, F_),
              "mlp.fc2.bias": (E,), "mlp.gate_proj.weight": (F_, E), "mlp.gate_proj.bias": (F_,),
              "mlp.up_proj.weight": (F_, E), "mlp.up_proj.bias": (F_,), "mlp.down_proj.weight": (E, F_),
              "mlp.down_proj.bias": (E,)}
    merger = {"ln_q.weight": (E,), "ln_q.bias": (E,), "mlp.0.weight": (M, M), "mlp.0.bias": (M,),
              "mlp.2.weight": (v.out_dim, M), "mlp.2.bias": (v.out_dim,)}
    s: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)}
    s.update({"visual.merger." + k: merger[k] for k in merger_keys(v)})
    for i in range(v.depth):
        s.update({f"visual.blocks.{i}.{k}": shapes[k] for k in block_keys(v)})
    return s
