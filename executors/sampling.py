"""Sampling on the device that holds the logits.

Greedy when ``temperature == 0``. Otherwise Gumbel-max: ``argmax(logits / T + g)`` over the top-k
logits, with ``g = -log(-log u)`` and ``u`` uniform, which draws exactly from ``softmax(logits / T)``
restricted to the top k. The uniforms come from a counter-based hash of ``(seed, request, position,
token id)`` (splitmix64 on int64 tensors), not from a stateful generator, so

* a request's tokens do not depend on what it was batched with, nor on the device;
* the whole batch is sampled by a handful of kernels, with no copy of the logits to the host.
"""

from __future__ import annotations

import torch

from executors.batch import to_device

_MASK = (1 << 64) - 1
_GOLDEN_U, _M1_U, _M2_U = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's constants


def _signed(u: int) -> int:
    """A 64-bit pattern as the int64 that torch stores."""
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN, _M1, _M2 = _signed(_GOLDEN_U), _signed(_M1_U), _signed(_M2_U)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def uniforms(row_keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[S, V]`` float64 uniforms in (0, 1), one per (row key, token id)."""
    ids = torch.arange(vocab, device=row_keys.device, dtype=torch.int64)
    z = splitmix64(splitmix64(row_keys[:, None] * _GOLDEN + ids[None, :]))
    return (_shr(z, 11).double() + 0.5) / float(1 << 53)


def _mix(z: int) -> int:
    """splitmix64 on a Python int (the same finaliser as ``splitmix64``), modulo 2^64."""
    z = ((z ^ (z >> 30)) * _M1_U) & _MASK
    z = ((z ^ (z >> 27)) * _M2_U) & _MASK
    return z ^ (z >> 31)


def row_key(seed: int, request: int, position: int) -> int:
    """One int64 key per sampled row: the hash of (seed, request, position), as a signed int64."""
    return _signed(_mix((_mix((seed * 1_000_003 + request) & _MASK) * _GOLDEN_U + position) & _MASK))


def sample(logits: torch.Tensor, temperature: float, top_k: int, keys: list[int]) -> torch.Tensor:
    """``logits [S, V]`` -> ``[S]`` token ids on the logits' device; ``keys``: ``row_key`` per row."""
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    if temperature <= 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k > 0:
        kth = x.topk(min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    u = uniforms(to_device(keys, x.device), x.shape[-1])
    return (x.double() - torch.log(-torch.log(u))).argmax(-1)
