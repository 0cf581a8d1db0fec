"""Paged prefill attention on the GPU (a Triton kernel): the query tokens of a step's prefill chunks
attend causally to their sequence's keys in the paged KV cache, through the block table, all
sequences in one launch per layer (where the torch path runs one SDPA per sequence, launched from
Python: the host cost of small mixed steps).

Shapes: ``q [T, hq, D]`` (the step's packed tokens); cache ``k, v [slots + 1, hkv, D]`` with this
step's keys already stored; per prefill sequence ``s``: its query rows ``[t0_s, t0_s + n_s)`` and
its key count ``ctx_s`` (the chunk's own keys included), so query row ``t0_s + i`` sits at position
``ctx_s - n_s + i`` and reads keys ``0 .. ctx_s - n_s + i``; ``table [S, nb]`` each sequence's KV
blocks. Query heads are grouped by KV head (``G = hq / hkv``, padded to a power of two ``G_P``).

A program takes ``BLOCK_M`` consecutive query tokens of one sequence, one KV head and one range
of keys: its rows are the ``BLOCK_M x G_P`` (token, query head) pairs, so each key block is read
once for the G heads that share it. The tokens read keys ``0 .. hi`` (``hi``: the last token's
position + 1), cut into ranges of ``R`` keys; program ``(p, h, r)`` streams the keys
``[r R, min((r + 1) R, hi))`` in blocks of ``BLOCK_N`` through the table, with the causal mask
``key <= position`` and the online softmax (running max ``m``, sum ``l``, accumulator;
``paged_decode.key_block``, the decode kernel's step too). Where all of ``0 .. hi`` fits one range
it writes ``acc / l`` into ``o [T, hq * D]`` itself. Otherwise each range writes ``out_r = acc / l``
and ``lse_r = m + log l`` (fp32 scratch ``[nsplit, T, hq, D]`` and ``[nsplit, T, hq]``), and a
second kernel (one program per block of tokens and KV head) combines them as the decode kernel
does: ``out = sum_r exp(lse_r - M) out_r / sum_r exp(lse_r - M)``, ``M = max_r lse_r``, a range
where a row reads no key weighing 0 (``lse_r = -inf``). Ranges past ``hi`` exit at once.
``programs`` lists the (sequence, first row) of each program on the host.

Why ranges: a program streams its keys one block after another, and a step waits on its longest
programs. A prefill chunk after many cached keys (and, before captured steps sent their decodes to
the decode kernel, each decode) reads them all: a decode with 4,000 cached keys was one program of
63 blocks, and on an H200 Qwen2-VL-7B's mixed steps (28 layers, 28 query heads over 4 KV heads) ran
~8 ms (~285 us a layer) longer than the cost model predicts when their decodes held ~4,000 keys. The
decode kernel's cap holds here too: ranges of at most ``engine_shapes.MAX_KEYS_PER_SPLIT`` keys.

A captured step's decodes (``PrefillInputs.dec_rows``, ``executors.graphs.GRAPH_DECODES``) have no
programs here: ``attend`` runs the paged decode kernel over the step's sequence slots beside this
kernel, each decode's result written at its row of the same output (``paged_decode.paged_decode``
with ``rows``). A decode in a program of this kernel filled one of its ``BLOCK_M`` query rows: one
layer of 8-128 decodes took 1.1-2.3x the decode kernel's time (``bench/results/graph_decodes.md``).

The split is a function of shapes only (``splits``), never of the step's values, since CUDA graphs
capture the launches and their scratch with static buffers: from the block table's width ``L = nb x
block size`` (the key bucket, the most keys a sequence can have), ``nsplit = ceil(L /
MAX_KEYS_PER_SPLIT)`` ranges of ``R = ceil(L / nsplit)`` keys in whole ``BLOCK_N``, fewer (longer)
ranges where the scratch, ``nsplit x T x hq x (D + 1) x 4`` bytes allocated per call (inside a
graph, from its memory pool), would pass ``SCRATCH_BYTES``. With ``nsplit == 1`` (tables of up to
1,024 keys) there is one launch and no scratch, as without ranges; in a split step a block of
tokens whose keys fit one range still writes ``o`` directly and its combine program exits at once.

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
from dataclasses import dataclass, replace

import torch

from executors import paged_decode
from executors.batch import to_device
from plans import engine_shapes as shapes

try:
    import triton
    import triton.language as tl

    from executors.paged_decode import key_block, range_result, range_weights
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
WARPS, STAGES = 4, 3  # the launch's warps and pipeline stages (Triton's defaults)
WIDE_ROWS, WIDE = 128, (128, 8, 3)  # programs of this many rows or more: (BLOCK_N, warps, stages) of their launch
# the key ranges' fp32 scratch stays within this: a 2,048-token step of 28 heads of 128 (Qwen2-VL-7B on one
# GPU) holds 9 ranges, so key buckets up to 8,192 keep ranges of 1,024; past that the ranges grow
SCRATCH_BYTES = 256 << 20


@dataclass(frozen=True)
class KernelConfig:
    """How ``_prefill`` launches: query tokens a program (``block_m``; the programs' list must be cut
    the same way, ``programs``), keys an inner step (``block_n``), warps and software-pipeline stages
    (``bench/prefill_kernel_sweep.py`` measures them)."""

    block_m: int
    block_n: int
    warps: int
    stages: int


def launch_config(group_p: int) -> KernelConfig:
    """The engine's launch for query-head groups padded to ``group_p``: programs of ``BLOCK_M x
    group_p`` rows of at least ``WIDE_ROWS`` take ``WIDE`` (more keys a step, more warps), others the
    module's ``BLOCK_N``, ``WARPS``, ``STAGES`` (read at the call). Measured on an H200
    (``bench/results/prefill_kernel_sweep.md``): with 28 query heads over 4 KV heads (rows of 128) the
    wide launch took 0.60-0.80 of the default's time on prefill chunks of 256-2,048 tokens and on
    decode rows; with 32 over 8 (rows of 64) the default was the best of 24 launches overall."""
    if BLOCK_M * group_p >= WIDE_ROWS:
        return KernelConfig(BLOCK_M, *WIDE)
    return KernelConfig(BLOCK_M, BLOCK_N, WARPS, STAGES)


def supported(dtype: torch.dtype, cache_dtype: torch.dtype, device: torch.device, replicated_kv: bool) -> bool:
    """The kernel serves CUDA bf16/fp16 queries with plain GQA (no KV head replicated over ranks)
    and a cache of the same dtype, unless ``SHIFTPLAN_PAGED_PREFILL=0``."""
    return (POLICY != "0" and triton is not None and not _failed and device.type == "cuda"
            and dtype in (torch.bfloat16, torch.float16) and cache_dtype == dtype and not replicated_kv)


def wanted(prefill_sequences: int) -> bool:
    """An eagerly run step's prefill goes to the kernel (given ``supported``): see the module doc."""
    return POLICY == "1" or prefill_sequences >= 2


def splits(keys: int, range_bytes: int) -> tuple[int, int]:
    """``(nsplit, keys_per_split)`` for a block table of ``keys`` keys (its width times the block size)
    and ``range_bytes`` of scratch a range (``T x hq x (D + 1) x 4``): ranges of whole ``BLOCK_N``,
    of at most ``engine_shapes.MAX_KEYS_PER_SPLIT`` keys (0: no cap) while ``nsplit`` ranges fit
    ``SCRATCH_BYTES``. Shapes only: the same for every step of a captured graph (module doc)."""
    chunks = max(1, -(-keys // BLOCK_N))
    nsplit = max(1, min(chunks, shapes.capped_ranges(chunks * BLOCK_N), SCRATCH_BYTES // range_bytes))
    return nsplit, -(-chunks // nsplit) * BLOCK_N


def program_rows(nq: torch.Tensor, t0: torch.Tensor, programs_max: int, pad_seq: int,
                 block_m: int = BLOCK_M, decodes: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``programs`` padded to a fixed grid (CUDA graphs): ``seq_of, row0 [programs_max]`` for
    sequences with ``nq [S]`` query rows from ``t0 [S]`` (with ``decodes`` False, none for a
    sequence of one row: the decode kernel attends those); unused programs point at sequence
    ``pad_seq`` (no query rows, no keys: they exit at once). ``programs_max`` must be at least
    ``sum(ceil(nq / block_m))``. Plain Python over the step's few hundred programs: torch's CPU
    ``repeat_interleave`` spreads over its repeats with a grain of one, and on a 32-core GPU host a
    step of 33 sequences (a prefill chunk and 32 decodes) spent 12-21 ms of host time in it
    (``bench/results/shift_crossover.profile_mixed.md``)."""
    seq_of, row0 = programs([(a, n if decodes or n != 1 else 0, 0, 0) for a, n in zip(t0.tolist(), nq.tolist())],
                            block_m)
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
    per sequence, ``seq_of, row0 [P]`` per program. A captured step whose decodes the paged decode
    kernel attends (``decode_inputs``) also has ``dec_lens [S]`` (a sequence's keys if it has one
    query row, else 0) and ``dec_rows [S]`` (its query row, else the scratch row ``T``); its programs
    then skip those sequences (``program_rows(decodes=False)``)."""

    table: torch.Tensor
    t0: torch.Tensor
    nq: torch.Tensor
    ctx: torch.Tensor
    seq_of: torch.Tensor
    row0: torch.Tensor
    block_size: int
    dec_lens: torch.Tensor | None = None
    dec_rows: torch.Tensor | None = None

    def decode_inputs(self, T: int) -> "PrefillInputs":
        """These inputs with ``dec_lens`` and ``dec_rows`` for a step of ``T`` query rows (device ops
        on the static inputs: inside a graph they run once a replay, not once a layer)."""
        one = self.nq == 1
        return replace(self, dec_lens=torch.where(one, self.ctx, 0), dec_rows=torch.where(one, self.t0, T))

    @staticmethod
    def build(spans: list[tuple[int, int, int, int]], blocks: list[list[int]], block_size: int,
              device: torch.device) -> "PrefillInputs":
        """From the spans ``(t0, n, k0, ctx)`` of the sequences to attend and each one's KV blocks."""
        nb = max((len(b) for b in blocks), default=1)
        table = torch.tensor([b + [0] * (nb - len(b)) for b in blocks] or [[0]], dtype=torch.int32)
        seq_of, row0 = programs(spans)
        col = [torch.tensor([sp[i] for sp in spans], dtype=torch.int32) for i in (0, 1, 3)]
        return PrefillInputs(*(to_device(x, device) for x in [table, *col, torch.tensor(seq_of, dtype=torch.int32),
                                                     torch.tensor(row0, dtype=torch.int32)]), block_size)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, x: PrefillInputs) -> torch.Tensor:
    """``paged_prefill`` on a micro-batch's ``PrefillInputs``; where ``x.dec_rows`` is set, its decodes
    through the paged decode kernel into the same ``[T + 1, hq * D]`` output (row ``T`` takes the
    other sequences' zeros and is dropped). A first failure to build or launch
    (a Triton too old or too new for this GPU) is recorded with one warning and raised: ``supported``
    then says no, so later steps take per-sequence SDPA and no prefill graph is captured."""
    try:
        if x.dec_rows is None:
            return paged_prefill(q, k_cache, v_cache, x.table, x.t0, x.nq, x.ctx, x.seq_of, x.row0, x.block_size)
        T = q.shape[0]
        o = torch.zeros(T + 1, q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        paged_prefill(q, k_cache, v_cache, x.table, x.t0, x.nq, x.ctx, x.seq_of, x.row0, x.block_size, out=o)
        paged_decode.paged_decode(q, k_cache, v_cache, x.table, x.dec_lens, x.block_size, rows=x.dec_rows, out=o)
        return o[:T]
    except Exception as e:  # compile or launch errors surface at the first (eager) call, before any capture
        if not _failed:
            import warnings

            _failed.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"paged prefill kernel unavailable ({_failed[0][:200]}); using per-sequence SDPA")
        raise


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                  t0: torch.Tensor, nq: torch.Tensor, ctx: torch.Tensor, seq_of: torch.Tensor, row0: torch.Tensor,
                  block_size: int, out: torch.Tensor | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """``[T, hq * D]`` causal attention of the prefill sequences' query rows (module doc); rows of
    no sequence are left as in ``out`` (zeros when it is None). ``t0, nq, ctx [S]``, ``seq_of,
    row0 [P]`` int32/int64 on ``q``'s device (``programs`` cut at ``config.block_m`` tokens). Key
    ranges from ``splits`` of the table's width; with more than one, fp32 scratch per call and a
    second launch combine them. ``config``: the launch (default ``launch_config``)."""
    T, hq, D = q.shape
    hkv = k_cache.shape[1]
    cfg = config or launch_config(triton.next_power_of_2(hq // hkv))
    o = out if out is not None else torch.zeros(T, hq * D, dtype=q.dtype, device=q.device)
    P = seq_of.shape[0]
    if P == 0:
        return o
    nsplit, per = splits(table.shape[1] * block_size, T * hq * (D + 1) * 4)
    direct = nsplit == 1  # every block of tokens in one range: no scratch, no combine
    part = o if direct else torch.empty(nsplit, T, hq, D, dtype=torch.float32, device=q.device)
    lse = o if direct else torch.empty(nsplit, T, hq, dtype=torch.float32, device=q.device)
    G = hq // hkv
    rows = (seq_of, row0, t0, nq, ctx)
    shape = dict(G=G, G_P=triton.next_power_of_2(G), D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_M=cfg.block_m)
    _prefill[(P, hkv, nsplit)](q, k_cache, v_cache, o, part, lse, table, *rows, q.stride(0), q.stride(1),
                               k_cache.stride(0), k_cache.stride(1), table.stride(0), o.stride(0), per, T,
                               D ** -0.5, BS=block_size, BLOCK_N=cfg.block_n, SPLIT=not direct, **shape,
                               num_warps=cfg.warps, num_stages=cfg.stages)
    if not direct:
        _combine[(P, hkv)](part, lse, o, *rows, o.stride(0), per, T, **shape)
    return o


if triton is not None:

    @triton.jit
    def tile(SEQ_OF, ROW0, T0, NQ, CTX, G: tl.constexpr, G_P: tl.constexpr, BLOCK_M: tl.constexpr):
        """Program ``p``'s rows, the ``BLOCK_M x G_P`` (token, query head of the group) pairs: the
        sequence ``s``, each row's token ``tok`` and head ``g`` in the group, ``row_ok`` (a real token
        and head), its position ``pos`` (-1: padding, reads nothing), and ``hi``: the keys the last
        token reads (``0 .. hi``)."""
        p = tl.program_id(0)
        s = tl.load(SEQ_OF + p)
        r0 = tl.load(ROW0 + p)
        t0 = tl.load(T0 + s)
        n = tl.load(NQ + s)
        ctx = tl.load(CTX + s)
        i = tl.arange(0, BLOCK_M * G_P)
        tok = r0 + i // G_P
        g = i % G_P
        row_ok = (g < G) & (tok < t0 + n)
        pos = tl.where(row_ok, ctx - n + (tok - t0), -1)
        return s, tok, g, row_ok, pos, tl.minimum(ctx, ctx - n + (r0 - t0) + BLOCK_M)

    @triton.jit
    def scratch_row(r, T, tok, h, G: tl.constexpr, g):
        """Row of (range ``r``, token ``tok``, query head ``h * G + g``) in the ``[nsplit, T, hq]``
        scratch (``hq = hkv * G``, the grid's second axis being the KV heads)."""
        return (r * T + tok.to(tl.int64)) * (tl.num_programs(1) * G) + h * G + g

    @triton.jit
    def store_o(O, stride_ot, tok, h, G: tl.constexpr, g, D: tl.constexpr, d, x, mask):
        """``x`` into the rows (token ``tok``, query head ``h * G + g``) of ``o [T, hq * D]``."""
        tl.store(O + tok[:, None].to(tl.int64) * stride_ot + (h * G + g)[:, None] * D + d[None, :],
                 x.to(O.dtype.element_ty), mask=mask)

    # Integers that change from step to step (the step's tokens, its table's width and range length) are
    # not specialised on: Triton compiles a kernel again for each new value's divisibility by 16 (and
    # for 1), which an eager step of a new size met mid-serving (a 3,072-token step of Llama-3.1-8B
    # took 1.35 s, bench/results/fidelity_2gpu.single_recompile.md); captured steps cannot compile at all.
    # An eager step now compiles at most twice in a process (once per SPLIT, on first use: its int32
    # inputs are other variants than the captures' int64 ones). It cost 0.5-2.8% of a call with Triton's default
    # launch, and 0-0.1% on five of six cases with the wide one, the smallest (0.06-0.08 ms) 31%
    # (bench/results/prefill_variants.txt).
    @triton.jit(do_not_specialize=["stride_ts", "keys_per_split", "T"])
    def _prefill(Q, K, V, O, OUT, LSE, TABLE, SEQ_OF, ROW0, T0, NQ, CTX, stride_qt, stride_qh, stride_kslot,
                 stride_kh, stride_ts, stride_ot, keys_per_split, T, scale, G: tl.constexpr, G_P: tl.constexpr,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
        h = tl.program_id(1)
        r = tl.program_id(2)
        s, tok, g, row_ok, pos, hi = tile(SEQ_OF, ROW0, T0, NQ, CTX, G, G_P, BLOCK_M)
        ranges = tl.cdiv(hi, keys_per_split)  # the ranges holding keys of these tokens
        if r >= ranges:
            return
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        mask = row_ok[:, None] & dmask[None, :]
        q = tl.load(Q + tok[:, None].to(tl.int64) * stride_qt + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=mask, other=0.0)
        lo = r * keys_per_split
        end = tl.minimum(lo + keys_per_split, hi)
        m = tl.full([BLOCK_M * G_P], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M * G_P], tl.float32)
        acc = tl.zeros([BLOCK_M * G_P, BLOCK_D], tl.float32)
        for start in range(lo, end, BLOCK_N):
            kn = start + tl.arange(0, BLOCK_N)
            kvalid = kn < end
            causal = kvalid[None, :] & (kn[None, :] <= pos[:, None])
            m, l, acc = key_block(q, K, V, TABLE + s * stride_ts, kn, kvalid, causal, d, dmask, h * stride_kh,
                                  stride_kslot, scale, m, l, acc, BS)
        out, lse = range_result(m, l, acc)
        if not SPLIT or ranges == 1:  # the answer itself
            store_o(O, stride_ot, tok, h, G, g, D, d, out, mask)
        else:
            at = scratch_row(r, T, tok, h, G, g)
            tl.store(OUT + at[:, None] * D + d[None, :], out, mask=mask)
            tl.store(LSE + at, lse, mask=row_ok)

    @triton.jit(do_not_specialize=["keys_per_split", "T"])
    def _combine(OUT, LSE, O, SEQ_OF, ROW0, T0, NQ, CTX, stride_ot, keys_per_split, T, G: tl.constexpr,
                 G_P: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        h = tl.program_id(1)
        _s, tok, g, row_ok, _pos, hi = tile(SEQ_OF, ROW0, T0, NQ, CTX, G, G_P, BLOCK_M)
        ranges = tl.cdiv(hi, keys_per_split)
        if ranges < 2:  # its one range's program wrote ``o``
            return
        d = tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (d < D)[None, :]
        top = tl.full([BLOCK_M * G_P], float("-inf"), tl.float32)
        for r in range(0, ranges):
            top = tl.maximum(top, tl.load(LSE + scratch_row(r, T, tok, h, G, g), mask=row_ok, other=float("-inf")))
        acc = tl.zeros([BLOCK_M * G_P, BLOCK_D], tl.float32)
        total = tl.zeros([BLOCK_M * G_P], tl.float32)
        for r in range(0, ranges):
            at = scratch_row(r, T, tok, h, G, g)
            w = range_weights(tl.load(LSE + at, mask=row_ok, other=float("-inf")), top)
            acc += w[:, None] * tl.load(OUT + at[:, None] * D + d[None, :], mask=mask, other=0.0)
            total += w
        store_o(O, stride_ot, tok, h, G, g, D, d, acc / tl.maximum(total, 1e-30)[:, None], mask)
