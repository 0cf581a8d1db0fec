"""Ulysses' all-to-all over symmetric memory in one Triton kernel (NCCL's LL protocol), so that a step
in SP x TP mode can be captured in a CUDA graph (NCCL's all-to-all hung inside one here).

``x [W, ...]`` on each of the group's ``W`` ranks: chunk ``j`` goes to rank ``j``; the result's chunk
``i`` is the one rank ``i`` sent. The chunks are moved as 32-bit words (any dtype whose chunk is a
multiple of 4 bytes). Each word travels in one 64-bit store into the receiving rank's symmetric
buffer, its high half the call's sequence number (``seq << 32 | bits``), so a word is either old or
whole: the receiver polls its own buffer until every word of a chunk carries this call's ``seq``. No
flag, fence or remote atomic; one one-way NVLink latency. As in ``reduce_norm``'s LL variant, words
alternate between two halves of the buffer by ``seq``'s parity (a rank can only be one call ahead of
a peer: finishing call ``k`` needs the peer's call-``k`` words) and each program keeps its ``seq`` in a
counter at the end of its rank's buffer that every call advances on every rank of the group (they run
the same calls), so the kernel replays in CUDA graphs.

Buffer of a rank (int64 words): ``[parity 2][source W][words]`` then ``PROGRAMS`` counters; word ``c``
of the chunk rank ``src`` sends here in call ``seq`` sits at ``((seq % 2) * W + src) * words + c``.
Twice the bytes of the data cross NVLink (the sequence halves).

Ulysses uses it on GPUs of one host (``parallel.SymmAllToAll``; ``SHIFTPLAN_A2A_LL=0``: NCCL's). Measured
on 2 x H200 (``bench/results/all_to_all_latency.md``, Llama-3.1-8B's packed q, k, v): 2.8 us a call at a
batch-1 decode step and 5.2 us at 64 tokens in a CUDA graph, where NCCL's all-to-all took 29-47 us launched
from Python (and hung in a graph); at 2,048 tokens 98 us against NCCL's 67 (the LL protocol moves twice
the bytes). With it SP x TP steps are graphed: sp2's batch-1 decode step of Llama-3.1-8B went from 89.1 to
4.58 ms and its 64-request throughput from 0.62x to 1.51x one GPU (``mesh_speed.ll.md``, ``mesh_speed.a2a.md``).
"""

from __future__ import annotations

import torch

from executors import gemv, reduce_norm
from executors.switches import switch

try:
    import triton
    import triton.language as tl

    from executors.paged_decode import depend
    from executors.reduce_norm import ll_begin, ll_poll
except ImportError:  # CPU-only installs: NCCL / gloo all-to-all
    triton = None

# programs of every call (fixed: a program's words and counter are the same call to call); in CUDA graphs on
# 2 x H200 (bench/results/all_to_all_latency.md) 128 move 2,048 tokens' chunks in 97.8 us against 206.5 with 32
# (512 tokens: 23.0 against 38.5), and 2-64 tokens' in the same ~2.8-5.2 us
PROGRAMS = 128
BLOCK = 1024  # 32-bit words a program moves per iteration, per peer
ENABLED = switch("SHIFTPLAN_A2A_LL")  # 0: NCCL's all-to-all (SP x TP steps then run eagerly)


def ll_words(words: int, world: int) -> int:
    """Length (int64 words) of a rank's buffer for chunks of up to ``words`` 32-bit words."""
    return reduce_norm.ll_words(words, world, PROGRAMS)


def launch(x: torch.Tensor, buffer_ptrs: torch.Tensor, words: int, rank: int, world: int) -> torch.Tensor:
    """The all-to-all of ``x [world, ...]`` (contiguous, each chunk a multiple of 4 bytes and at most
    ``words`` 32-bit words); ``buffer_ptrs [world]``: every rank's int64 symmetric buffer of
    ``ll_words(words, world)`` words, zeros before the first call."""
    x = x.contiguous()
    out = torch.empty_like(x)
    chunk_bytes = x.numel() * x.element_size() // world
    assert x.shape[0] == world and chunk_bytes % 4 == 0 and chunk_bytes // 4 <= words
    n = chunk_bytes // 4
    gdc = gemv.pdl(x)
    _all_to_all_ll[(PROGRAMS,)](x.view(torch.int32), out.view(torch.int32), buffer_ptrs, words, n, RANK=rank,
                                WORLD=world, BLOCK=BLOCK, USE_GDC=gdc, num_warps=4, launch_pdl=gdc)
    return out


@torch.library.custom_op("shiftplan::all_to_all_ll", mutates_args=())
def all_to_all_ll(x: torch.Tensor, buffer_ptrs: torch.Tensor, words: int, rank: int, world: int) -> torch.Tensor:
    """``launch`` as an op compiled layers call without a graph break."""
    return launch(x, buffer_ptrs, words, rank, world)


@all_to_all_ll.register_fake
def _(x: torch.Tensor, buffer_ptrs: torch.Tensor, words: int, rank: int, world: int) -> torch.Tensor:
    return torch.empty_like(x)


if triton is not None:

    @triton.jit
    def _all_to_all_ll(X, OUT, bufs, words, n, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                       USE_GDC: tl.constexpr):
        """``X, OUT``: int32 views ``[WORLD, n]``; program ``pid`` moves words ``[b, b + BLOCK)`` for
        ``b = pid BLOCK, (pid + G) BLOCK, ...`` of every chunk (module doc)."""
        pid, G = tl.program_id(0), tl.num_programs(0)
        depend(USE_GDC)
        own, counter, seq, tag, half = ll_begin(bufs, words, RANK, WORLD)
        for start in range(pid * BLOCK, n, G * BLOCK):  # push: one 64-bit store a word, data and seq together
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            for peer in tl.static_range(WORLD):
                d = tl.load(X + peer * n + cols, mask=mask)
                if peer == RANK:
                    tl.store(OUT + RANK * n + cols, d, mask=mask)
                else:
                    buf = tl.load(bufs + peer).to(tl.pointer_type(tl.int64))
                    tl.store(buf + (half + RANK) * words + cols, tag | (d.to(tl.int64) & 0xFFFFFFFF), mask=mask)
        for start in range(pid * BLOCK, n, G * BLOCK):  # pull: poll this rank's buffer until every word is this call's
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    p = ll_poll(own + (half + peer) * words + cols, mask, tag, seq)
                    tl.store(OUT + peer * n + cols, p.to(tl.int32), mask=mask)
        tl.store(counter, seq)
