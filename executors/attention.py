"""Paged KV cache and packed variable-length attention over it.

Cache of one layer on one rank: ``k, v [num_blocks * block_size, kv_local, D]`` (a slot is
``block * block_size + offset``), in the plan's KV dtype (FP8 e4m3 with scale 1: values are cast
on write and widened on read). A step writes its new keys at ``slots`` (negative = padding,
skipped), then gathers every key it may read at ``key_slots`` and runs one masked SDPA over the
packed batch (block-diagonal causal mask, see ``executors.batch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from executors.batch import MicroBatch


class LayerCache:
    """``slots`` usable slots plus one scratch slot at the end that padding tokens write to."""

    def __init__(self, slots: int, kv_local: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(slots + 1, kv_local, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)


def packed_mask(mb: MicroBatch, t_pad: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[t_pad, K]``: query t may read key k. Padding queries read key 0 (discarded)."""
    T = mb.num_tokens
    seq = torch.full((t_pad,), -1, dtype=torch.long)
    seq[:T] = mb.seq
    idx = torch.zeros(t_pad, dtype=torch.long)
    idx[:T] = mb.tok_idx
    m = (mb.key_seq[None, :] == seq[:, None]) & (mb.key_pos[None, :] <= idx[:, None])
    m[T:, 0] = True
    return m.to(device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, slots: torch.Tensor,
           key_slots: torch.Tensor, mask: torch.Tensor, kv_of_q: torch.Tensor | None) -> torch.Tensor:
    """``q [T, hq, D]``, new ``k, v [T, hkv, D]`` -> ``[T, hq * D]``.

    ``kv_of_q [hq]`` maps each local query head to its local KV head (replicated KV); None when
    query head j reads KV head ``j // (hq / hkv)`` (plain GQA), which SDPA does without copying
    the keys per query head (``enable_gqa``).
    """
    dst = torch.where(slots >= 0, slots, cache.k.shape[0] - 1)  # padding -> scratch slot
    _store(cache.k, dst, k)
    _store(cache.v, dst, v)
    K = _gather(cache.k, key_slots, kv_of_q).to(q.dtype)  # [K, hq or hkv, D]
    V = _gather(cache.v, key_slots, kv_of_q).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K.transpose(0, 1)[None], V.transpose(0, 1)[None],
                                         attn_mask=mask[None, None], enable_gqa=K.shape[1] != q.shape[1])
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """An FP8 cache seen as bytes (CPU kernels do not index FP8 tensors); others as they are."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _store(cache: torch.Tensor, dst: torch.Tensor, x: torch.Tensor) -> None:
    _bytes(cache).index_copy_(0, dst, _bytes(x.to(cache.dtype)))


def _gather(cache: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor | None) -> torch.Tensor:
    x = _bytes(cache)[rows]
    if heads is not None:
        x = x.index_select(1, heads)
    return x.view(cache.dtype) if cache.dtype == torch.float8_e4m3fn else x
