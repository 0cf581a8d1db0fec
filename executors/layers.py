"""Modules read from a checkpoint, and loading a meta module tree in place.

A ``Checkpointed`` module's ``weight`` (and ``bias``) is the row-concatenation of checkpoint
tensors ``<part>.weight`` for its ``parts`` (fused QKV, gate/up), each narrowed to the index runs
``take[i]`` along ``dim``. Models are built on the meta device with whole shapes; the parallel
styles (``executors.parallelize``) narrow ``take`` and the meta shapes to a rank's shard; ``load``
then reads exactly those runs from a ``WeightSource`` and puts real tensors in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from executors.parallel import OneShotAllReduce, all_reduce
from executors.quant import Fp8Weight, cat, linear, read_linear
from executors.weights import Runs, WeightSource
from plans.errors import UserError


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: ``w * x / sqrt(mean(x^2) + eps)``, normalised in fp32, cast back, then scaled."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def param(*shape: int) -> nn.Parameter:
    """An inference parameter (no gradient) of ``shape``, on the default device (meta while building)."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Checkpointed(nn.Module):
    """A module whose ``weight`` (and ``bias``) is the concatenation along dim 0 of the checkpoint
    tensors ``<part>.weight`` for ``part in parts``, each narrowed to the index runs ``take[i]``
    along ``dim`` (None: whole). Parallel styles set ``take``/``dim`` and the meta shapes; ``load``
    reads exactly those runs."""

    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts
        self.take: tuple[Runs | None, ...] = (None,) * len(parts)
        self.dim = 0  # 0: rows (column-parallel, vocab-parallel); 1: columns (row-parallel)
        self.tied: str | None = None  # read this part instead when the checkpoint lacks parts[0] (tied lm_head)
        self.whole: tuple[int, ...] | None = None  # the unsharded weight's shape, once a style has narrowed it


class Linear(Checkpointed):
    """``y = x W^T (+ b)``, ``W [out, in]`` plain or FP8 (``scale [out]``, ``executors.quant``).
    Row-parallel (``group`` set): the partial products are all-reduced before the bias is added."""

    def __init__(self, d_in: int, d_out: int, parts: tuple[str, ...], bias: bool = False):
        super().__init__(parts)
        self.weight = param(d_out, d_in)
        self.register_parameter("bias", param(d_out) if bias else None)
        self.register_buffer("scale", None)
        self.group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.partial(x))

    def partial(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """This rank's term of the product: ``forward`` before the all-reduce and bias (unsharded:
        the whole product, bias included). ``finish`` completes it. ``gated``: ``x`` is ``[gate |
        up]`` and the input ``silu(gate) * up`` (``quant.linear``)."""
        if self.group is None:
            return linear(x, self.weight, self.bias, self.scale, gated)
        return linear(x, self.weight, scale=self.scale, gated=gated)

    def finish(self, y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``partial``'s output summed over the group, plus the bias (``+ residual``)."""
        if self.group is not None:
            y = all_reduce(y, self.group)
            y = y if self.bias is None else y + self.bias
        return y if residual is None else y + residual


class RMSNorm(Checkpointed):
    def __init__(self, dim: int, eps: float, part: str):
        super().__init__((part,))
        self.eps = eps
        self.weight = param(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor, src: Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, rms(h))`` with ``h = residual + src.finish(x)``, ``x`` being ``src.partial``'s output.
        Where ``src`` sums through symmetric memory, the all-reduce, the add and this norm are one
        kernel (``parallel.OneShotAllReduce.add_norm``)."""
        if isinstance(src.group, OneShotAllReduce) and src.bias is None:
            return src.group.add_norm(x, residual, self.weight, self.eps)
        h = src.finish(x, residual)
        return h, self(h)


class LayerNorm(Checkpointed):
    def __init__(self, dim: int, eps: float, part: str):
        super().__init__((part,))
        self.eps = eps
        self.weight = param(dim)
        self.bias = param(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _read(src: WeightSource, names: list[str], takes: tuple[Runs | None, ...], dim: int) -> torch.Tensor:
    parts = [src.rows(n, t, dim) for n, t in zip(names, takes)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def check_whole(src: WeightSource, names: list[str], whole: tuple[int, ...], where: str) -> None:
    """UserError unless the checkpoint tensors ``names``, concatenated along dim 0, have the shape
    ``whole`` the model config gives: a rank reads only its runs, which a larger tensor (a checkpoint
    of another size of the model) would also hold."""
    shapes = [tuple(src.shape(n)) for n in names]
    same_rest = all(len(s) == len(whole) and s[1:] == whole[1:] for s in shapes)
    if not same_rest or sum(s[0] for s in shapes) != whole[0]:
        got = " + ".join(f"{n} {s}" for n, s in zip(names, shapes))
        raise UserError(f"weights: {got} where the model config gives {whole} for {where or 'the model'} "
                        "(a checkpoint of another model or size?)")


def load(model: nn.Module, src: WeightSource, device: torch.device, dtype: torch.dtype,
         fp8: bool = False) -> nn.Module:
    """Replace every meta parameter of ``model`` by the rows ``parallelize`` assigned to this rank,
    read from ``src`` (only those rows; a single run of an in-memory source is a view, so one GPU
    shares storage with it), on ``device`` in ``dtype``. Decoder ``Linear`` weights become FP8 when
    ``fp8`` (checkpoint scales, else quantized now); an FP8 checkpoint is dequantized otherwise.
    Buffers move to ``device``. UserError when a checkpoint tensor has another shape than the
    model's config gives (``check_whole``: the whole tensor, not only this rank's runs)."""
    for name, m in model.named_modules():
        if not isinstance(m, Checkpointed):
            continue
        weights = [p + ".weight" for p in m.parts]
        if m.tied is not None and not src.has(weights[0]):
            weights = [m.tied + ".weight"]
        want = tuple(m.weight.shape)
        check_whole(src, weights, m.whole or want, name)
        if isinstance(m, Linear):
            w = cat([read_linear(src, n, t, m.dim, fp8, dtype, device) for n, t in zip(weights, m.take)])
            if isinstance(w, Fp8Weight):
                w, m.scale = w.q, w.scale
        else:
            w = _read(src, weights, m.take, m.dim).to(device, dtype)
        if tuple(w.shape) != want:
            raise UserError(f"weights: {', '.join(weights)} give {tuple(w.shape)} for {name or 'the model'} on "
                            f"this rank; the model config gives {want}")
        m.weight = nn.Parameter(w, requires_grad=False)
        if getattr(m, "bias", None) is not None:  # column-parallel biases follow the rows; row-parallel ones are whole
            takes = m.take if m.dim == 0 else (None,) * len(m.parts)
            m.bias = nn.Parameter(_read(src, [p + ".bias" for p in m.parts], takes, 0).to(device, dtype),
                                  requires_grad=False)
    for m in model.modules():
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.to(device)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise UserError(f"weights: no checkpoint tensor was read for {', '.join(left[:3])}")
    return model
