"""FP8 (e4m3) weights for the decoder's linear layers, per output channel.

A weight ``W [out, in]`` is held as ``q [out, in]`` in ``float8_e4m3fn`` and ``scale [out]`` in
fp32 with ``W ~= q * scale[:, None]``, so ``y = x W^T = (x q^T) * scale``. Scales come from the
checkpoint when it is already FP8 (``<name>_scale`` beside ``<name>``, the layout of the
compressed-tensors / fbgemm FP8 checkpoints: ``[out]``, ``[out, 1]`` or one per tensor), else the
weights are quantized at load with ``scale = max|W_row| / 448`` over the rows this rank reads
(row-parallel shards then get their own scales, as in vLLM's online FP8). Embeddings, norms,
lm_head and the vision tower stay in the compute dtype.

Matmul (``kernel_for`` names the one a product takes): on GPUs with FP8 tensor cores (compute
capability >= 8.9), products of at most ``fp8_gemm.MAX_M`` rows (decode steps) run the Triton kernels
of ``executors.fp8_gemm``: W8A16 up to
``fp8_gemm.W8A16_MAX_M`` rows (the weight widened in registers), above that W8A8 with the activations
quantized per token to e4m3 (``executors.fp8_w8a8``, FP8 tensor cores); larger ones
``torch._scaled_mm`` with activations quantized per token (W8A8, dynamic);
elsewhere the weight is widened to the activation dtype (exact: e4m3 values are representable in
bf16/fp32) and the scale applied to the product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from executors import fp8_gemm, gemv
from plans.errors import UserError

if TYPE_CHECKING:
    from executors.weights import WeightSource

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass
class Fp8Weight:
    q: torch.Tensor  # [out, in] float8_e4m3fn
    scale: torch.Tensor  # [out] fp32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype)


Weight = torch.Tensor | Fp8Weight


def quantize(w: torch.Tensor) -> Fp8Weight:
    """Per-row FP8 of ``w [out, in]``: ``scale = max|row| / 448`` (rows of zeros get scale 1)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return Fp8Weight((wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)


def from_checkpoint(q: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> Fp8Weight:
    """An FP8 checkpoint tensor and its scale (``[out]``, ``[out, 1]`` or a single value)."""
    s = scale.float().reshape(-1)
    if s.numel() == 1:
        s = s.expand(q.shape[0]).clone()
    if s.numel() != q.shape[0]:
        raise UserError(f"FP8 checkpoint: '{name}' has {q.shape[0]} rows here but {s.numel()} scales in "
                        f"'{name}_scale'; expected one per row or one per tensor")
    return Fp8Weight(q.to(FP8), s)


def cat(parts: list[Weight]) -> Weight:
    """Row-concatenate weights of one kind (fused QKV, gate/up)."""
    if isinstance(parts[0], Fp8Weight):
        return Fp8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))
    return torch.cat(parts)


def to(w: Weight, device: torch.device, dtype: torch.dtype) -> Weight:
    """Move to ``device``; plain weights also take the compute ``dtype``."""
    if isinstance(w, Fp8Weight):
        return Fp8Weight(w.q.to(device), w.scale.to(device))
    return w.to(device, dtype)


def _scaled_mm_ok(x: torch.Tensor, w: Fp8Weight) -> bool:
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    out, k = w.q.shape
    return torch.cuda.get_device_capability(x.device) >= (8, 9) and k % 16 == 0 and out % 16 == 0


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """``x [..., in] @ W^T + b`` for a plain or FP8 weight (an e4m3 tensor ``w`` with ``scale [out]``
    is the FP8 weight ``Fp8Weight(w, scale)``); ``kernel_for`` names the kernel (module doc). A
    decode step's few rows go to the Triton kernels (the bf16 GEMV adds a bias in its epilogue, as
    Qwen's QKV has; FP8 products add it after). ``gated``:
    ``x [..., 2 in]`` is ``[gate | up]`` and the product's input ``silu(gate) * up`` (computed in the
    bf16 GEMV's loads where it serves, else first)."""
    if scale is not None:
        w = Fp8Weight(w, scale)

    def on_rows(f) -> torch.Tensor:  # f on x as [rows, in], back to x's leading dims
        return f(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    if isinstance(w, torch.Tensor) and gemv.wanted(x, w, gated, b):
        return on_rows(lambda r: torch.ops.shiftplan.gemv(r, w, gated, b))
    if gated:  # no GEMV for it: the gate first
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    if fp8_gemm.wanted(x, w.q, w.scale):
        y = on_rows(lambda r: torch.ops.shiftplan.fp8_linear(r, w.q, w.scale))
    elif _scaled_mm_ok(x, w):
        y = on_rows(lambda r: w8a8_rowwise(r, w))
    else:
        y = F.linear(x, w.q.to(x.dtype)) * w.scale.to(x.dtype)
    return y + b if b is not None else y


def kernel_for(x: torch.Tensor, w: Weight) -> str:
    """Which kernel ``linear(x, w)`` runs (a bias changes nothing): "triton_gemv" / "cublas" for a plain weight;
    ``fp8_gemm.kernel_name`` ("triton_w8a16", "triton_w8a8"), "scaled_mm_rowwise" or "dequant" for an
    FP8 one."""
    if isinstance(w, torch.Tensor):
        return "triton_gemv" if gemv.wanted(x, w) else "cublas"
    if fp8_gemm.wanted(x, w.q, w.scale):
        return fp8_gemm.kernel_name(x.numel() // x.shape[-1])
    return "scaled_mm_rowwise" if _scaled_mm_ok(x, w) else "dequant"


def w8a8_rowwise(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """``x [M, K]`` quantized per row (``xs = max|x_row| / 448``, e4m3) times ``w`` on FP8 tensor
    cores: ``torch._scaled_mm`` with scales ``xs [M, 1]`` and ``w.scale [1, N]``, out in ``x``'s dtype."""
    xs = (x.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [M, 1], activation dtype
    xq = (x / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(xq, w.q.t(), scale_a=xs.float(), scale_b=w.scale[None, :], out_dtype=x.dtype)


def read_linear(src: "WeightSource", name: str, runs: list[tuple[int, int]] | None, dim: int, fp8: bool,
                dtype: torch.dtype, device: torch.device) -> Weight:
    """This rank's slice of a linear weight (``runs`` along ``dim``: 0 column-, 1 row-parallel),
    as FP8 when ``fp8`` (from the checkpoint's scales, else quantized now) or in ``dtype`` (an FP8
    checkpoint is then dequantized)."""
    w = src.rows(name, runs, dim)
    if src.has(name + "_scale"):
        scale = src.rows(name + "_scale").float().reshape(-1)
        if scale.numel() > 1 and dim == 0 and runs is not None:
            scale = torch.cat([scale[a:b] for a, b in runs])
        q = from_checkpoint(w, scale, name)
        return to(q, device, dtype) if fp8 else q.dequantize(dtype).to(device)
    return to(quantize(w), device, dtype) if fp8 else w.to(device, dtype)
