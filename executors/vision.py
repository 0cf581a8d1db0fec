"""Qwen2-VL / Qwen2.5-VL vision tower: patch embedding, 2-D rotary ViT blocks, 2x2 patch merger.

Qwen2.5-VL differs by RMSNorm, a SwiGLU MLP with biases, and window attention: patches are
reordered window by window (windows of ``window_size / patch / merge`` merged tokens per side),
blocks attend within a window except the ``fullatt_block_indexes`` blocks (within a frame), and
the merged output is put back in raster order.

Input: ``pixels [N, C * t_patch * p * p]`` (the HF processor's flattened patches, grouped by
``merge x merge`` blocks) and each image's patch grid ``(t, h, w)``; output ``[N / merge^2,
out_dim]`` LLM embeddings. Attention is full within each frame of ``h * w`` patches. The plan's
``vision.placement`` decides which GPUs run the tower, whole or TP-sharded, and how images are
split among them (``executors.encoders``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from executors.batch import to_device
from executors.config import VisionArgs
from executors.layers import Checkpointed, LayerNorm, Linear, RMSNorm, param
from executors.rope import rotate_half

T = TypeVar("T")


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


class PatchEmbed(Checkpointed):
    """``pixels [N, C t p p] -> [N, E]``: the checkpoint's ``Conv3d`` weight ``[E, C, t, p, p]`` with
    stride = kernel is one matmul over flattened patches."""

    def __init__(self, v: VisionArgs):
        super().__init__(("visual.patch_embed.proj",))
        self.weight = param(v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight.reshape(self.weight.shape[0], -1))


def _norm(v: VisionArgs, part: str) -> nn.Module:
    """Qwen2.5-VL: RMSNorm; Qwen2-VL: LayerNorm (eps 1e-6 both)."""
    return RMSNorm(v.embed_dim, 1e-6, part) if v.qwen25 else LayerNorm(v.embed_dim, 1e-6, part)


class VisionAttention(nn.Module):
    """Full attention within each span (a frame, or a Qwen2.5-VL window) of ``x [N, E]``, 2-D
    rotary on q and k. ``qkv [3 E, E]`` stacks q, k and v rows; TP narrows each to this rank's
    ``heads`` (``executors.parallelize.VISION_TP_PLAN``) and all-reduces ``proj``."""

    def __init__(self, v: VisionArgs, p: str):
        super().__init__()
        E = v.embed_dim
        self.heads, self.head_dim = v.num_heads, E // v.num_heads
        self.qkv = Linear(E, 3 * E, (p + "qkv",), bias=True)
        self.proj = Linear(E, E, (p + "proj",), bias=True)

    def qkv_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x [N, E]`` -> ``q, k, v [N, heads, hd]``, rotary applied to q and k in fp32."""
        q, k, val = self.qkv(x).reshape(-1, 3, self.heads, self.head_dim).unbind(1)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        return q, k, val

    def attend(self, q: torch.Tensor, k: torch.Tensor, val: torch.Tensor, spans: list[int]) -> torch.Tensor:
        """Full attention within each span: ``q, k, v [N, heads, hd]`` -> ``[N, heads * hd]``."""
        hd = self.head_dim
        outs = []
        for length, count in equal_runs(spans):  # one SDPA per run of equal spans (a batch of same-size images)
            n = length * count
            qs, ks, vs = (t[:n].view(count, length, self.heads, hd).transpose(1, 2) for t in (q, k, val))
            q, k, val = q[n:], k[n:], val[n:]
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=1.0 / math.sqrt(hd))  # [count, heads, length, hd]
            outs.append(o.transpose(1, 2).reshape(n, -1))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: list[int]) -> torch.Tensor:
        return self.proj(self.attend(*self.qkv_rope(x, cos, sin), spans))


class VisionMLP(nn.Module):
    """Qwen2-VL: ``fc2(act(fc1 x))``; Qwen2.5-VL: ``down_proj(act(gate_proj x) * up_proj x)``, all
    with biases (column-parallel in, row-parallel out: the out bias is added after the all-reduce)."""

    def __init__(self, v: VisionArgs, p: str):
        super().__init__()
        E, Fd = v.embed_dim, v.mlp_dim
        self.act, self.swiglu = v.act, v.qwen25
        if v.qwen25:
            self.gate_proj = Linear(E, Fd, (p + "gate_proj",), bias=True)
            self.up_proj = Linear(E, Fd, (p + "up_proj",), bias=True)
            self.down_proj = Linear(Fd, E, (p + "down_proj",), bias=True)
        else:
            self.fc1 = Linear(E, Fd, (p + "fc1",), bias=True)
            self.fc2 = Linear(Fd, E, (p + "fc2",), bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(_act(self.act, self.gate_proj(h)) * self.up_proj(h))
        return self.fc2(_act(self.act, self.fc1(h)))


class VisionBlock(nn.Module):
    def __init__(self, v: VisionArgs, i: int):
        super().__init__()
        p = f"visual.blocks.{i}."
        self.norm1, self.norm2 = _norm(v, p + "norm1"), _norm(v, p + "norm2")
        self.attn = VisionAttention(v, p + "attn.")
        self.mlp = VisionMLP(v, p + "mlp.")

    def pre(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Norm, QKV and rotary: ``x [N, E]`` -> ``q, k, v [N, heads, hd]`` (only tensors in and
        out: the compile backend compiles it, ``executors.backends``)."""
        return self.attn.qkv_rope(self.norm1(x), cos, sin)

    def post(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Attention output projection, residual, norm, MLP, residual (compiled like ``pre``)."""
        x = x + self.attn.proj(o)
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: list[int]) -> torch.Tensor:
        """Attention between ``pre`` and ``post`` stays eager: its span list is Python data."""
        return self.post(x, self.attn.attend(*self.pre(x, cos, sin), spans))


class Merger(nn.Module):
    """``merge^2`` neighbouring patches ``[N, E]`` -> ``[N / merge^2, out_dim]``: norm, then
    ``fc2(gelu(fc1 .))`` over the concatenated ``E merge^2`` features."""

    def __init__(self, v: VisionArgs):
        super().__init__()
        M = v.embed_dim * v.merge**2
        self.ln_q = _norm(v, "visual.merger.ln_q")
        self.fc1 = Linear(M, M, ("visual.merger.mlp.0",), bias=True)
        self.fc2 = Linear(M, v.out_dim, ("visual.merger.mlp.2",), bias=True)
        self.M = M

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.ln_q(x).reshape(-1, self.M))))


class VisionTower(nn.Module):
    """The tower as a module tree (built on meta, loaded like the decoder, see
    ``executors.encoders.load_tower``); with TP the blocks are sharded by
    ``executors.parallelize.VISION_TP_PLAN`` (heads and MLP columns split, proj and MLP-out rows
    split, all-reduce over the stage's GPUs); patch embedding and merger stay whole."""

    def __init__(self, v: VisionArgs):
        super().__init__()
        self.v = v
        self.patch_embed = PatchEmbed(v)
        self.blocks = nn.ModuleList(VisionBlock(v, i) for i in range(v.depth))
        self.merger = Merger(v)
        half = v.embed_dim // v.num_heads // 2
        inv = 1.0 / (v.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32, device="cpu") / half))
        self.register_buffer("inv_freq", inv, persistent=False)  # [hd/4]: row and column angles

    def prepare(self, grid: list[tuple[int, int, int]]) -> TowerInputs:
        """What the blocks need besides the patches, for images of patch grids ``grid`` (made on the
        tower's device from the grid alone, so a CUDA graph of ``encode`` can hold them fixed)."""
        v = self.v
        dev = self.inv_freq.device
        pos = to_device(vision_pos(grid, v.merge).float(), dev)
        ang = torch.cat([pos[:, :1] * self.inv_freq, pos[:, 1:] * self.inv_freq], dim=-1)
        ang = torch.cat([ang, ang], dim=-1)
        frames = [h * w for t, h, w in grid for _ in range(t)]
        windows, order = frames, None
        if v.qwen25:
            order, windows = window_order(grid, v.merge, v.window_size // v.merge // v.patch_size)
            order = to_device(order, dev)
            unit = v.merge**2
            ang = ang.reshape(-1, unit, ang.shape[-1])[order].reshape(-1, ang.shape[-1])
        return TowerInputs(ang.cos()[:, None], ang.sin()[:, None], frames, windows, order)

    def encode(self, pixels: torch.Tensor, t: TowerInputs) -> torch.Tensor:
        """``pixels [N, patch_dim]`` (on the tower's device) -> ``[N / merge^2, out_dim]``; only
        device work, with fixed shapes for fixed ``t`` (``executors.tower_graphs`` captures it)."""
        v = self.v
        x = self.patch_embed(pixels)  # [N, E]
        if t.order is not None:  # Qwen2.5-VL: window by window
            x = x.reshape(-1, v.merge**2, v.embed_dim)[t.order].reshape(-1, v.embed_dim)
        for i, block in enumerate(self.blocks):
            x = block(x, t.cos, t.sin, t.frames if (not v.qwen25 or i in v.fullatt_blocks) else t.windows)
        out = self.merger(x)
        if t.order is not None:
            out = out[torch.argsort(t.order)]
        return out

    def forward(self, pixels: torch.Tensor, grid: list[tuple[int, int, int]]) -> torch.Tensor:
        """``pixels [N, patch_dim]`` of images with patch grids ``grid`` -> ``[N / merge^2, out_dim]``."""
        return self.encode(pixels.to(self.inv_freq.device), self.prepare(grid))


@dataclass(frozen=True)
class TowerInputs:
    """The tower's inputs besides the patches, fixed by the image grids: rotary ``cos, sin [N, 1,
    hd]``; the attention spans of full blocks (``frames``: each frame's patches) and of window blocks
    (``windows``; Qwen2-VL: the frames again); Qwen2.5-VL's window order of merged tokens (else None)."""

    cos: torch.Tensor
    sin: torch.Tensor
    frames: list[int]
    windows: list[int]
    order: torch.Tensor | None


def equal_runs(spans: list[T]) -> list[tuple[T, int]]:
    """``spans`` as ``(value, count)`` runs of consecutive equal values: ``[4, 4, 4, 2, 4]`` ->
    ``[(4, 3), (2, 1), (4, 1)]`` (spans' lengths, or image grids)."""
    runs: list[tuple[T, int]] = []
    for n in spans:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


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
