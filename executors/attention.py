"""Paged KV cache and packed variable-length attention over it.

Cache of one layer on one rank: ``k, v [num_blocks * block_size, kv_local, D]`` (a slot is
``block * block_size + offset``), in the plan's KV dtype (FP8 e4m3 with scale 1: values are cast
on write and widened on read). A step writes its new keys at ``slots`` (negative = padding,
skipped), then gathers every key it may read at ``key_slots`` and runs one masked SDPA over the
packed batch (block-diagonal causal mask, see ``executors.batch``). A micro-batch of decodes (one
query per sequence) instead gathers each sequence's keys into ``[S, L_max]`` and runs S
single-query attentions, so its work grows with the longest context, not with all contexts.

On CUDA the packed mask is never built: each sequence of a prefill or mixed micro-batch runs its
own fused SDPA (flash / memory-efficient kernels; causal, aligned bottom-right when the chunk
follows cached keys; or every sequence in one Triton launch through the block table, when
``executors.paged_prefill`` serves the step), and decodes run as a grouped matmul over ``[S, L_max]`` keys (GQA groups
read their KV head once). Both need no host synchronisation, so decode steps replay as CUDA graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from executors import paged_decode, paged_prefill
from executors.batch import MicroBatch, to_device

if TYPE_CHECKING:
    from executors.model import AttnMeta


class LayerCache:
    """``slots`` usable slots plus one scratch slot at the end that padding tokens write to."""

    def __init__(self, slots: int, kv_local: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.k = torch.zeros(slots + 1, kv_local, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)


# SDPA over prefill chunks, whose lengths change from step to step, stays off cuDNN's backend, which
# builds an execution plan for each new shape (flashinfer measured 55-70 ms a build): on an H200,
# eager prefill steps of Qwen2-VL-7B (2,000-4,500 tokens) served at random lengths ran 30-70 ms
# longer than predicted (the trace of bench/results/fidelity_2gpu.vl_single.md), the same shapes
# repeated ran as predicted (bench/results/step_profile.md), and the GPU's idle gaps while serving
# overlapped SDPA calls (bench/results/step_profile.serving.md). Flash, memory-efficient and math
# kernels need no plan: off cuDNN, the model's share of such steps' GPU time went from 0.69 to 0.89
# (41 and 46 traced steps), where steps of two or more prefills (the paged kernel) stayed at 0.90.
# (The vision tower keeps cuDNN: its shapes are captured once per image grid, executors/tower_graphs.py.)
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A whole prompt of PROMPT_CUDNN_MIN tokens or more is the exception: on Hopper cuDNN's kernel runs
# its causal attention at about twice the flash backend's rate (a 4,033-token Qwen2-VL-7B prompt:
# 28 layers in 14.2 ms through flash against 7.1 through cuDNN, bench/results/step_profile.pinned_cudnn.md:
# its forward 88-90 ms against 93-97 on flash and 87.3 predicted), so it
# runs on cuDNN at a length padded up to ``prompt_bucket`` (eight buckets an octave, at most 1/8
# more keys): the plans are few, built once each, at warm-up (``warm_prompt_plans``).
PROMPT_CUDNN_MIN = 512
CUDNN_DTYPES = (torch.bfloat16, torch.float16)  # what cuDNN's SDPA takes


def sdpa_backends():
    """A context in which SDPA picks among ``SDPA_BACKENDS`` only (``torch.nn.attention.sdpa_kernel``)."""
    return sdpa_kernel(SDPA_BACKENDS)


def prompt_bucket(n: int) -> int:
    """The padded length of a whole prompt of ``n`` tokens run on cuDNN: ``n`` rounded up to a multiple
    of ``2^(floor(log2 n) - 3)`` (eight buckets an octave: 4,033 -> 4,096, 4,097 -> 4,608); ``n`` itself
    below ``PROMPT_CUDNN_MIN`` (no padding; the plan-free backends)."""
    if n < PROMPT_CUDNN_MIN:
        return n
    g = 1 << (n.bit_length() - 4)
    return -(-n // g) * g


def prompt_buckets(max_tokens: int) -> list[int]:
    """Every ``prompt_bucket`` from ``PROMPT_CUDNN_MIN`` up to the one holding ``max_tokens``."""
    out, n = [], PROMPT_CUDNN_MIN
    while n <= max_tokens:
        out.append(prompt_bucket(n))
        n = out[-1] + 1
    return out


def warm_prompt_plans(shapes: set[tuple[int, int, int]], dtype: torch.dtype, device: torch.device,
                      max_tokens: int) -> int:
    """Have cuDNN build its plan for a whole prompt of each ``prompt_bucket`` length up to
    ``max_tokens`` (a step's budget: no prompt chunk is longer), for each ``(query heads, key heads,
    head dim)`` of ``shapes``, so no served step waits on one (``causal_prompt``). The number of
    calls made; none off CUDA or in a dtype cuDNN does not serve."""
    if device.type != "cuda" or dtype not in CUDNN_DTYPES:
        return 0
    calls = 0
    for hq, hkv, D in sorted(shapes):
        for n in prompt_buckets(max_tokens):
            k = torch.zeros(1, hkv, n, D, dtype=dtype, device=device)
            causal_prompt(torch.zeros(1, hq, n, D, dtype=dtype, device=device), k, k)
            calls += 1
    return calls


def causal_prompt(qs: torch.Tensor, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Causal attention of a whole prompt: ``qs [1, hq, n, D]`` over its own keys ``K, V [1, hkv, n, D]``
    -> ``[1, hq, n, D]``. On CUDA from ``PROMPT_CUDNN_MIN`` tokens, zero-padded at the end to
    ``prompt_bucket(n)`` and run on cuDNN first (padded keys come after every real query, so the causal
    mask keeps them out of its rows; the padded rows are dropped)."""
    n = qs.shape[2]
    if qs.is_cuda and n >= PROMPT_CUDNN_MIN and qs.dtype in CUDNN_DTYPES and not _cudnn_failed:
        try:
            return padded_causal(qs, K, V, prompt_bucket(n), [SDPBackend.CUDNN_ATTENTION])
        except RuntimeError as e:  # cuDNN does not take these inputs here: the plan-free kernels from now on
            _cudnn_failed.append(f"{type(e).__name__}: {e}"[:300])
    return padded_causal(qs, K, V, n, SDPA_BACKENDS)


_cudnn_failed: list[str] = []  # why cuDNN's SDPA refused a prompt on this process (then it is not asked again)


def padded_causal(qs: torch.Tensor, K: torch.Tensor, V: torch.Tensor, length: int, backends: list) -> torch.Tensor:
    """``causal_prompt``'s SDPA: the prompt's queries, keys and values zero-padded at the end to
    ``length``, SDPA's backends limited to ``backends`` (their priority order left as it is: the
    tower's SDPA calls keep theirs), the first ``n`` rows kept."""
    n = qs.shape[2]
    pad = (0, 0, 0, length - n)
    if length > n:
        qs, K, V = F.pad(qs, pad), F.pad(K, pad), F.pad(V, pad)
    with sdpa_kernel(backends):
        o = F.scaled_dot_product_attention(qs, K, V, is_causal=True, enable_gqa=K.shape[1] != qs.shape[1])
    return o[:, :, :n]


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


# Compiled layers call attention eagerly: on an H200, compiling the decode path's block gather and
# grouped matmul with dynamic shapes made a batch-32 decode step 2.5x slower (bench/engine_speed.py).
@torch.compiler.disable
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
    if not paged_decode.store_kv_or_none(cache.k, cache.v, meta.slots, k, v):
        dst = torch.where(meta.slots >= 0, meta.slots, cache.k.shape[0] - 1)  # padding -> scratch slot
        _store(cache.k, dst, k)
        _store(cache.v, dst, v)
    if meta.prefill is not None or meta.seqs is not None:
        out = None
        if meta.prefill is not None:  # every listed sequence in one launch (the stage chose the kernel)
            try:
                out = paged_prefill.attend(q, cache.k, cache.v, meta.prefill)
            except Exception:
                if meta.seqs is None:  # a captured step's inputs: no per-sequence spans to fall back on
                    raise
        if out is None:
            out = _attend_per_sequence(q, k, v, cache, meta, kv_of_q)
        if meta.dec_rows is not None:  # a mixed step's decodes: one batched call, not one per sequence
            out[meta.dec_rows] = _attend_decode_grouped(q[meta.dec_rows], cache, meta, kv_of_q)
        return out
    if meta.table is not None:
        return _attend_decode_grouped(q, cache, meta, kv_of_q)
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


def _attend_decode_grouped(q: torch.Tensor, cache: LayerCache, meta: "AttnMeta",
                           kv_of_q: torch.Tensor | None) -> torch.Tensor:
    """Decodes: ``q [S, hq, D]``, each sequence's keys through its block-table row
    ``meta.table [S, L / bs]`` -> ``[S, hq * D]``.

    On CUDA in bf16/fp16 with plain GQA, the Triton kernel of ``executors.paged_decode`` reads each
    sequence's keys in place. Otherwise the keys are gathered whole blocks at a time (a copy of
    contiguous ``bs * hkv * D`` runs, at copy bandwidth) and query heads are grouped by their KV
    head (``G = hq / hkv``):
    ``scores [S, hkv, G, L] = q [S, hkv, G, D] @ K^T [S, hkv, D, L]``, masked, softmax in fp32,
    ``@ V [S, hkv, L, D]``; each KV head is read once per sequence."""
    hq, D = q.shape[1], q.shape[2]
    if paged_decode.available(q, cache.k, kv_of_q):
        out = paged_decode.paged_decode_or_none(q, cache.k, cache.v, meta.table, meta.seq_lens, meta.block_size)
        if out is not None:
            return out
    bs = meta.block_size
    K, V = _gather_blocks(cache.k, meta.table, bs, kv_of_q), _gather_blocks(cache.v, meta.table, bs, kv_of_q)
    S, L, hkv = K.shape[0], K.shape[1], K.shape[2]
    K = K.to(q.dtype).transpose(1, 2)  # [S, hkv, L, D]
    V = V.to(q.dtype).transpose(1, 2)
    qg = q.view(S, hkv, hq // hkv, D)
    scores = torch.matmul(qg, K.transpose(-1, -2)).float() * D ** -0.5  # [S, hkv, G, L]
    scores = scores.masked_fill(~meta.seq_mask[:, None, None, :], float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(q.dtype), V)  # [S, hkv, G, D]
    return out.reshape(S, hq * D)


def _gather_blocks(cache: torch.Tensor, table: torch.Tensor, bs: int, heads: torch.Tensor | None) -> torch.Tensor:
    """``[S, nb * bs, h, D]``: the cache blocks of each block-table row ``table [S, nb]``, in order
    (the cache's last row is the scratch slot, outside every block)."""
    S, nb = table.shape
    h, D = cache.shape[1], cache.shape[2]
    blocks = _bytes(cache)[:-1].view(-1, bs, h, D)
    x = blocks.index_select(0, table.flatten()).view(S, nb * bs, h, D)
    if heads is not None:
        x = x.index_select(2, heads)
    return x.view(cache.dtype) if cache.dtype == torch.float8_e4m3fn else x


def _attend_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                         meta: "AttnMeta", kv_of_q: torch.Tensor | None) -> torch.Tensor:
    """One fused SDPA per sequence of the micro-batch (``meta.seqs``). A chunk of ``n`` queries at
    positions ``lo .. lo+n-1`` reads keys ``0 .. lo+n-1``: with ``lo == 0`` its own new keys
    (causal), else the cached ones (causal aligned bottom-right; one query needs no mask)."""
    hq, D = q.shape[1], q.shape[2]
    out = torch.zeros(q.shape[0], hq * D, dtype=q.dtype, device=q.device)  # padding rows stay 0
    with sdpa_backends():
        for t0, n, k0, ctx in meta.seqs:
            _attend_one(q, k, v, cache, meta, kv_of_q, out, t0, n, k0, ctx)
    return out


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, meta: "AttnMeta",
                kv_of_q: torch.Tensor | None, out: torch.Tensor, t0: int, n: int, k0: int, ctx: int) -> None:
    """Sequence ``(t0, n, k0, ctx)``'s rows of ``out`` (``_attend_per_sequence``)."""
    hq, D = q.shape[1], q.shape[2]
    qs = q[t0:t0 + n].transpose(0, 1)[None]  # [1, hq, n, D]
    if ctx == n and cache.k.dtype == q.dtype:  # a first chunk: its keys are the ones just computed
        K, V = k[t0:t0 + n], v[t0:t0 + n]
        if kv_of_q is not None:
            K, V = K.index_select(1, kv_of_q), V.index_select(1, kv_of_q)
    else:
        rows = meta.key_slots[k0:k0 + ctx]
        K = _gather(cache.k, rows, kv_of_q).to(q.dtype)
        V = _gather(cache.v, rows, kv_of_q).to(q.dtype)
    K, V = K.transpose(0, 1)[None], V.transpose(0, 1)[None]  # [1, hkv, ctx, D]
    if n == ctx:
        o = causal_prompt(qs, K, V)
    elif n == 1:
        o = F.scaled_dot_product_attention(qs, K, V, enable_gqa=K.shape[1] != hq)
    else:
        if K.shape[1] != hq:  # the bottom-right causal kernels take equal head counts
            K, V = K.repeat_interleave(hq // K.shape[1], 1), V.repeat_interleave(hq // V.shape[1], 1)
        o = F.scaled_dot_product_attention(qs, K, V, attn_mask=causal_lower_right(n, ctx))
    out[t0:t0 + n] = o[0].transpose(0, 1).reshape(n, hq * D)


def split_decodes(mb: MicroBatch, spans: list[tuple[int, int, int, int]], block: int,
                  device: torch.device) -> tuple[list[tuple[int, int, int, int]], dict]:
    """A prefill or mixed micro-batch on CUDA: its sequences with one query (decodes) leave the
    per-sequence path and attend together through the block table, as a decode micro-batch does.
    Returns the remaining spans and the ``AttnMeta`` fields of the decodes (none if fewer than 2):
    ``dec_rows [S_d]`` their token rows, ``table [S_d, nb]``, ``seq_lens [S_d]``, ``seq_mask
    [S_d, nb * block]`` (the torch path's key mask)."""
    dec = [j for j, (_t0, n, _k0, _ctx) in enumerate(spans) if n == 1]
    if len(dec) < 2 or len(mb.blocks) != len(spans):
        return spans, {}
    rows = [mb.blocks[j] for j in dec]
    nb = max(len(r) for r in rows)
    table = torch.tensor([r + [0] * (nb - len(r)) for r in rows], dtype=torch.long)
    lens = torch.tensor([spans[j][3] for j in dec])
    mask = torch.arange(nb * block)[None, :] < lens[:, None]
    gone = set(dec)
    keep = [sp for j, sp in enumerate(spans) if j not in gone]
    return keep, {"dec_rows": to_device([spans[j][0] for j in dec], device), "table": to_device(table, device),
                  "seq_lens": to_device(lens, device), "seq_mask": to_device(mask, device), "block_size": block}


def prefill_inputs(mb: MicroBatch, spans: list[tuple[int, int, int, int]], seqs: list[tuple[int, int, int, int]],
                   block: int, device: torch.device) -> "paged_prefill.PrefillInputs | None":
    """The paged prefill kernel's inputs for ``seqs`` (``spans``, or what ``split_decodes`` left of
    them), or None when the micro-batch does not name every sequence's blocks."""
    if len(mb.blocks) != len(spans):
        return None
    row = {sp[0]: j for j, sp in enumerate(spans)}  # a span's first token row names its sequence
    return paged_prefill.PrefillInputs.build(seqs, [mb.blocks[row[sp[0]]] for sp in seqs], block, device)


def sequence_spans(mb: MicroBatch) -> list[tuple[int, int, int, int]]:
    """Per sequence of ``mb``: ``(first token, tokens, first key in key_slots, keys)``."""
    S = int(mb.seq.max()) + 1 if mb.num_tokens else 0
    n = torch.bincount(mb.seq, minlength=S).tolist()
    ctx = torch.bincount(mb.key_seq, minlength=S).tolist()
    spans, t, k = [], 0, 0
    for j in range(S):
        spans.append((t, n[j], k, ctx[j]))
        t += n[j]
        k += ctx[j]
    return spans


def decode_keys(mb: MicroBatch, scratch: int, block: int, width: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(seq_keys [S, L], seq_mask [S, L])`` for a decode micro-batch (every sequence has one query,
    its last position, so it reads all its keys), else None. Sequence i's keys are its blocks
    expanded, ``blocks[i][p // block] * block + p % block`` for ``p < ctx[i]``; ``L`` is the longest
    context, or ``width`` when given (at least that long); padding points at the scratch slot."""
    if not mb.decode:
        return None
    keys, valid = mb.key_grid(block, width)
    return torch.where(valid, keys, scratch), valid


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
