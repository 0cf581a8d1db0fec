"""Paged prefill attention on the GPU (a Triton kernel): the query tokens of a step's prefill chunks
attend causally to their sequence's keys in the paged KV cache, through the block table, all
sequences in one launch per layer (where the torch path runs one SDPA per sequence, launched from
Python: the host cost of small mixed steps).

Shapes: ``q [T, hq, D]`` (the step's packed tokens); cache ``k, v [slots + 1, hkv, D]`` with this
step's keys already stored; per prefill sequence ``s``: its query rows ``[t0_s, t0_s + n_s)`` and
its key count ``ctx_s`` (the chunk's own keys included), so query row ``t0_s + i`` sits at position
``ctx_s - n_s + i`` and reads keys ``0 .. ctx_s - n_s + i``; ``table [S, nb]`` each sequence's KV
blocks. Query heads are grouped by KV head (``G = hq / hkv``, padded to a power of two ``G_P``).

A program takes ``BLOCK_M`` consecutive query tokens of one sequence and one KV head: its rows are
the ``BLOCK_M x G_P`` (token, query head) pairs, so each key block is read once for the G heads
that share it. It streams the keys ``0 .. (last position of its tokens)`` in blocks of
``BLOCK_N`` through the table, with the causal mask ``key <= position`` and the online softmax
(running max ``m``, sum ``l``, accumulator; ``paged_decode.key_block``, the decode kernel's
step too), and writes ``acc / l`` into ``o [T, hq * D]``.
``programs`` lists the (sequence, first row) of each program on the host.

When it serves (``POLICY``, ``SHIFTPLAN_PAGED_PREFILL``): measured per layer on an H200
(``bench/results/prefill_attention.md``), it is 2.9x faster than one SDPA per sequence on four
256-token chunks after 1,024 cached keys and 10x on sixteen 32-token chunks (launches from Python
gone), but 2-2.8x slower than the one fused SDPA call of a single long chunk (flash attention's
tiles beat this kernel's 16-token programs). So eagerly run steps (``auto``, the default) use it when
two or more sequences prefill, ``1`` always, ``0`` never; prefill and mixed steps captured as CUDA
graphs (``executors.graphs.MixedGraphs``) always do, since their attention must be one launch over
static inputs. Correctness is checked through Triton's interpreter (``tests/test_exec_gpu_paths.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    from executors.paged_decode import key_block
except ImportError:  # CPU-only installs: attention.py keeps its torch path
    triton = None

POLICY = os.environ.get("SHIFTPLAN_PAGED_PREFILL", "auto")  # auto | 1 (always) | 0 (never; graphs off too)
if POLICY not in ("auto", "0", "1"):
    import warnings

    warnings.warn(f"SHIFTPLAN_PAGED_PREFILL={POLICY!r} is not one of auto, 0, 1; using auto")
    POLICY = "auto"
_failed: list[str] = []  # the kernel's first failure on this process (then per-sequence SDPA serves)
BLOCK_M = 16  # query tokens per program
BLOCK_N = 64  # keys per inner iteration


def supported(dtype: torch.dtype, cache_dtype: torch.dtype, device: torch.device, replicated_kv: bool) -> bool:
    """The kernel serves CUDA bf16/fp16 queries with plain GQA (no KV head replicated over ranks)
    and a cache of the same dtype, unless ``SHIFTPLAN_PAGED_PREFILL=0``."""
    return (POLICY != "0" and triton is not None and not _failed and device.type == "cuda"
            and dtype in (torch.bfloat16, torch.float16) and cache_dtype == dtype and not replicated_kv)


def wanted(prefill_sequences: int) -> bool:
    """An eagerly run step's prefill goes to the kernel (given ``supported``): see the module doc."""
    return POLICY == "1" or prefill_sequences >= 2


def program_rows(nq: torch.Tensor, t0: torch.Tensor, programs_max: int, pad_seq: int,
                 block_m: int = BLOCK_M) -> tuple[torch.Tensor, torch.Tensor]:
    """``programs`` padded to a fixed grid (CUDA graphs): ``seq_of, row0 [programs_max]`` for
    sequences with ``nq [S]`` query rows from ``t0 [S]``; unused programs point at sequence
    ``pad_seq`` (no query rows, no keys: they exit at once). ``programs_max`` must be at least
    ``sum(ceil(nq / block_m))``. Plain Python over the step's few hundred programs: torch's CPU
    ``repeat_interleave`` spreads over its repeats with a grain of one, and on a 32-core GPU host a
    step of 33 sequences (a prefill chunk and 32 decodes) spent 12-21 ms of host time in it
    (``bench/results/shift_crossover.profile_mixed.md``)."""
    seq_of, row0 = programs([(a, n, 0, 0) for a, n in zip(t0.tolist(), nq.tolist())], block_m)
    pad = programs_max - len(seq_of)
    return torch.tensor(seq_of + [pad_seq] * pad), torch.tensor(row0 + [0] * pad)


def programs(spans: list[tuple[int, int, int, int]], block_m: int = BLOCK_M) -> tuple[list[int], list[int]]:
    """``(sequence, first query row)`` of every program: each span ``(t0, n, k0, ctx)`` cut into runs
    of ``block_m`` tokens."""
    seq_of, row0 = [], []
    for s, (t0, n, _k0, _ctx) in enumerate(spans):
        for r in range(t0, t0 + n, block_m):
            seq_of.append(s)
            row0.append(r)
    return seq_of, row0


@dataclass
class PrefillInputs:
    """The kernel's inputs for one micro-batch (device tensors): ``table [S, nb]``, ``t0, nq, ctx [S]``
    per sequence, ``seq_of, row0 [P]`` per program."""

    table: torch.Tensor
    t0: torch.Tensor
    nq: torch.Tensor
    ctx: torch.Tensor
    seq_of: torch.Tensor
    row0: torch.Tensor
    block_size: int

    @staticmethod
    def build(spans: list[tuple[int, int, int, int]], blocks: list[list[int]], block_size: int,
              device: torch.device) -> "PrefillInputs":
        """From the spans ``(t0, n, k0, ctx)`` of the sequences to attend and each one's KV blocks."""
        nb = max((len(b) for b in blocks), default=1)
        table = torch.tensor([b + [0] * (nb - len(b)) for b in blocks] or [[0]], dtype=torch.int32)
        seq_of, row0 = programs(spans)
        col = [torch.tensor([sp[i] for sp in spans], dtype=torch.int32) for i in (0, 1, 3)]
        return PrefillInputs(*(x.to(device) for x in [table, *col, torch.tensor(seq_of, dtype=torch.int32),
                                                     torch.tensor(row0, dtype=torch.int32)]), block_size)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, x: PrefillInputs) -> torch.Tensor:
    """``paged_prefill`` on a micro-batch's ``PrefillInputs``. A first failure to build or launch
    (a Triton too old or too new for this GPU) is recorded with one warning and raised: ``supported``
    then says no, so later steps take per-sequence SDPA and no prefill graph is captured."""
    try:
        return paged_prefill(q, k_cache, v_cache, x.table, x.t0, x.nq, x.ctx, x.seq_of, x.row0, x.block_size)
    except Exception as e:  # compile or launch errors surface at the first (eager) call, before any capture
        if not _failed:
            import warnings

            _failed.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"paged prefill kernel unavailable ({_failed[0][:200]}); using per-sequence SDPA")
        raise


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                  t0: torch.Tensor, nq: torch.Tensor, ctx: torch.Tensor, seq_of: torch.Tensor, row0: torch.Tensor,
                  block_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, hq * D]`` causal attention of the prefill sequences' query rows (module doc); rows of
    no sequence are left as in ``out`` (zeros when it is None). ``t0, nq, ctx [S]``, ``seq_of,
    row0 [P]`` int32/int64 on ``q``'s device."""
    T, hq, D = q.shape
    hkv = k_cache.shape[1]
    G = hq // hkv
    o = out if out is not None else torch.zeros(T, hq * D, dtype=q.dtype, device=q.device)
    P = seq_of.shape[0]
    if P == 0:
        return o
    _prefill[(P, hkv)](q, k_cache, v_cache, o, table, seq_of, row0, t0, nq, ctx,
                       q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), table.stride(0), o.stride(0),
                       D ** -0.5, G=G, G_P=triton.next_power_of_2(G), D=D, BLOCK_D=triton.next_power_of_2(D),
                       BS=block_size, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return o


if triton is not None:

    @triton.jit
    def _prefill(Q, K, V, O, TABLE, SEQ_OF, ROW0, T0, NQ, CTX, stride_qt, stride_qh, stride_kslot, stride_kh,
                 stride_ts, stride_ot, scale, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        p = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.load(SEQ_OF + p)
        r0 = tl.load(ROW0 + p)
        t0 = tl.load(T0 + s)
        n = tl.load(NQ + s)
        ctx = tl.load(CTX + s)
        i = tl.arange(0, BLOCK_M * G_P)
        tok = r0 + i // G_P  # query token row of each (token, head) row
        g = i % G_P
        row_ok = (g < G) & (tok < t0 + n)
        pos = tl.where(row_ok, ctx - n + (tok - t0), -1)  # its position; -1: padding row, reads nothing
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(Q + tok[:, None].to(tl.int64) * stride_qt + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & dmask[None, :], other=0.0)
        hi = tl.minimum(ctx, ctx - n + (r0 - t0) + BLOCK_M)  # keys the block's last token reads
        m = tl.full([BLOCK_M * G_P], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M * G_P], tl.float32)
        acc = tl.zeros([BLOCK_M * G_P, BLOCK_D], tl.float32)
        for start in range(0, hi, BLOCK_N):
            kn = start + tl.arange(0, BLOCK_N)
            kvalid = kn < hi
            causal = kvalid[None, :] & (kn[None, :] <= pos[:, None])
            m, l, acc = key_block(q, K, V, TABLE + s * stride_ts, kn, kvalid, causal, d, dmask, h * stride_kh,
                                  stride_kslot, scale, m, l, acc, BS)
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(O + tok[:, None].to(tl.int64) * stride_ot + (h * G + g)[:, None] * D + d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
