"""Paged KV cache and packed variable-length attention over it.

Cache of one layer on one rank: ``k, v [num_blocks * block_size, kv_local, D]`` (a slot is
``block * block_size + offset``), in the plan's KV dtype (FP8 e4m3 with scale 1: values are cast
on write and widened on read). A step writes its new keys at ``slots`` (negative = padding,
skipped), then gathers every key it may read at ``key_slots`` and runs one masked SDPA over the
packed batch (block-diagonal causal mask, see ``executors.batch``). A micro-batch of decodes (one
query per sequence) instead gathers each sequence's keys into ``[S, L_max]`` and runs S
single-query attentions, so its work grows with the longest context, not with all contexts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from executors.batch import MicroBatch

if TYPE_CHECKING:
    from executors.dense import AttnMeta


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, meta: "AttnMeta",
           kv_of_q: torch.Tensor | None) -> torch.Tensor:
    """``q [T, hq, D]``, new ``k, v [T, hkv, D]`` -> ``[T, hq * D]``.

    Packed: one SDPA over all T queries and the K gathered keys with the block-diagonal causal
    mask (work ``T x K``). Decodes (``meta.seq_keys``, one query per sequence): a batch of S
    single-query SDPAs over each sequence's own keys padded to ``L_max`` (work ``S x L_max``).
    ``kv_of_q [hq]`` maps each local query head to its local KV head (replicated KV); None when
    query head j reads KV head ``j // (hq / hkv)`` (plain GQA), which SDPA does without copying
    the keys per query head (``enable_gqa``).
    """
    dst = torch.where(meta.slots >= 0, meta.slots, cache.k.shape[0] - 1)  # padding -> scratch slot
    _store(cache.k, dst, k)
    _store(cache.v, dst, v)
    if meta.seq_keys is not None:
        S, L = meta.seq_keys.shape
        K = _gather(cache.k, meta.seq_keys.flatten(), kv_of_q).to(q.dtype)  # [S * L, h, D]
        V = _gather(cache.v, meta.seq_keys.flatten(), kv_of_q).to(q.dtype)
        K, V = K.view(S, L, -1, K.shape[-1]).transpose(1, 2), V.view(S, L, -1, V.shape[-1]).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, :, None], K, V, attn_mask=meta.seq_mask[:, None, None],
                                             enable_gqa=K.shape[1] != q.shape[1])  # [S, hq, 1, D]
        return out.reshape(q.shape[0], -1)
    K = _gather(cache.k, meta.key_slots, kv_of_q).to(q.dtype)  # [K, hq or hkv, D]
    V = _gather(cache.v, meta.key_slots, kv_of_q).to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], K.transpose(0, 1)[None], V.transpose(0, 1)[None],
                                         attn_mask=meta.mask[None, None], enable_gqa=K.shape[1] != q.shape[1])
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def decode_keys(mb: MicroBatch, scratch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(seq_keys [S, L_max], seq_mask [S, L_max])`` when every sequence of ``mb`` has exactly
    one query token (its last position, so it reads all its keys); else None."""
    S = int(mb.sample_idx.numel())
    if mb.num_tokens != S or S == 0 or not torch.equal(mb.seq, torch.arange(S)):
        return None
    lens = torch.bincount(mb.key_seq, minlength=S)
    start = torch.cumsum(lens, 0) - lens
    i = torch.arange(int(lens.max()))
    valid = i[None, :] < lens[:, None]
    idx = (start[:, None] + i[None, :]).clamp(max=mb.key_slots.numel() - 1)
    return torch.where(valid, mb.key_slots[idx], scratch), valid
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
