"""Paged decode attention on the GPU (a Triton kernel): each sequence's query heads read their
keys and values straight from the paged KV cache through the block table, once.

Shapes: ``q [S, hq, D]``; cache ``k, v [slots + 1, hkv, D]`` (slot = block * bs + offset);
``table [S, nb]`` each sequence's blocks; ``lens [S]`` its number of keys. Query heads are grouped
by KV head, ``G = hq / hkv`` (plain GQA), so one program reads a KV head's keys once for its G
query heads.

Flash decoding: the keys of a sequence are cut into ``nsplit`` ranges of ``keys_per_split`` keys,
one program per ``(sequence, kv head, range)``, so a small batch still fills the GPU, and ranges
hold at most ``MAX_KEYS_PER_SPLIT`` keys, so a batch of mixed lengths is not left waiting on the
programs of its longest sequences (the cut: ``plans.engine_shapes.splits``, which the cost model
reads too). A program
keeps the running max ``m``, sum ``l`` and accumulator of the online softmax over its range and
writes ``out_r = acc / l`` and ``lse_r = m + log l``; a second kernel (one program per
``(sequence, query head)``, all ranges loaded at once) combines them, ``out = sum_r exp(lse_r - M) out_r / sum_r
exp(lse_r - M)`` with ``M = max_r lse_r`` (``range_result`` and ``range_weights``, which the paged prefill kernel's
key ranges share), and writes the ``[S, hq * D]`` result in the query's dtype: two launches per layer.
A range past its sequence's keys (the ranges cut the batch's longest; a shorter sequence has fewer) is
neither computed nor read: its program exits at once, and the combine reads only the
``ceil(lens / keys_per_split)`` ranges that hold keys. (Such programs used to write an empty result
that the combine read back: in a one-H200 trace, Qwen2-VL-7B decode steps of 64 sequences whose
longest context cut 8 ranges where the mean cut 2 ran 0.5-0.6 ms over the cost model, about 0.5 us a
step for each range program more, ``bench/results/fidelity_2gpu.single.steps.json.gz``.) When one range
covers every sequence (``nsplit == 1``: batches of ``TARGET_PROGRAMS / hkv`` sequences or more) the
partial kernel writes the result itself and the combine is skipped. (Combining in the partial kernel,
by each head's last range program, was slower: its combine path sets every range program's register
budget; ``bench/results/decode_splits.fused_combine.md``.)

Bytes read per step: each sequence's K and V once, ``2 x ctx x hkv x D x 2`` bytes, plus ``q``.

``store_kv`` writes a step's new keys and values into the cache in one launch (``slots [T]``,
negative = padding, written to the scratch slot), reading ``k, v [T, hkv, D]`` through their
strides (views of the fused QKV projection need no copy).
"""

from __future__ import annotations

import torch

from executors import gemv
from plans import engine_shapes as shapes

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: attention.py falls back to the torch path
    triton = None

BLOCK_G = 16  # query heads per program, padded (tl.dot needs 16 rows)
PARTIAL_WARPS, PARTIAL_STAGES = 4, 3  # the range kernel's launch (Triton's defaults; bench/decode_splits.py --sweep)
_failed: list[str] = []  # the kernel's first failure on this process (then the torch path serves)


def available(q: torch.Tensor, cache: torch.Tensor, kv_of_q: torch.Tensor | None) -> bool:
    """The kernel serves bf16/fp16 decodes on CUDA with plain GQA (at most BLOCK_G query heads per
    KV head) and a cache of the same dtype; anything else takes the torch path."""
    return (triton is not None and not _failed and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and cache.dtype == q.dtype and kv_of_q is None and q.shape[1] // cache.shape[1] <= BLOCK_G)


def paged_decode_or_none(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                         lens: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """``paged_decode``, or None (with one warning) if the kernel fails to build or launch here: a
    Triton too old or too new for this GPU leaves the engine on the torch path, not down."""
    try:
        return paged_decode(q, k_cache, v_cache, table, lens, block_size)
    except Exception as e:  # compile or launch errors surface at the first (eager) call, before any capture
        import warnings

        _failed.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"paged decode kernel unavailable ({_failed[0][:200]}); using the torch path")
        return None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                 lens: torch.Tensor, block_size: int, rows: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``[S, hq * D]`` attention of each sequence's one query over its ``lens`` cached keys.

    With ``rows [S]``: sequence ``s``'s query is row ``rows[s]`` of ``q [T, hq, D]`` and its result
    goes to row ``rows[s]`` of ``out [R, hq * D]`` (returned), key ranges from
    ``engine_shapes.graph_splits``. A sequence with no keys (``lens 0``) reads and writes nothing,
    its programs exiting at once, so its row may lie past ``q`` (a captured mixed step's decodes among its ``S + 1`` slots, the others
    pointing at a scratch row: ``paged_prefill.attend``)."""
    S, hq, D = lens.shape[0], q.shape[1], q.shape[2]
    has_rows = rows is not None
    row_map = rows if has_rows else lens  # a pointer the kernels ignore without rows
    hkv = k_cache.shape[1]
    G = hq // hkv
    nsplit, per = (shapes.graph_splits if has_rows else shapes.splits)(S, hkv, table.shape[1] * block_size)
    BLOCK_D = triton.next_power_of_2(D)
    o = out if has_rows else torch.empty(S, hq * D, dtype=q.dtype, device=q.device)
    direct = nsplit == 1  # one range per head: the partial result is the answer, no combine
    out = o if direct else torch.empty(S, hkv, nsplit, BLOCK_G, BLOCK_D, dtype=torch.float32, device=q.device)
    lse = o if direct else torch.empty(S, hkv, nsplit, BLOCK_G, dtype=torch.float32, device=q.device)
    gdc = gemv.pdl(q)
    _partial[(S, hkv, nsplit)](
        q, k_cache, v_cache, table, lens, out, lse, row_map,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), table.stride(0), per, D ** -0.5,
        G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D, BS=block_size, BLOCK_N=shapes.DECODE_BLOCK_N, DIRECT=direct,
        HAS_ROWS=has_rows, USE_GDC=gdc, launch_pdl=gdc, num_warps=PARTIAL_WARPS, num_stages=PARTIAL_STAGES,
    )
    if not direct:
        _combine[(S, hq)](out, lse, o, row_map, lens, nsplit, per, G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D,
                          BLOCK_R=triton.next_power_of_2(nsplit), HAS_ROWS=has_rows, USE_GDC=gdc, launch_pdl=gdc)
    return o


def store_kv_or_none(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> bool:
    """``store_kv`` when it serves these tensors (CUDA, one dtype, unit stride on the head dim);
    False and nothing written otherwise (the caller takes the torch path)."""
    if triton is None or _failed or not k.is_cuda or k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        return False
    if k.stride(2) != 1 or v.stride(2) != 1 or not k_cache.is_contiguous() or not v_cache.is_contiguous():
        return False
    try:
        store_kv(k_cache, v_cache, slots, k, v)
        return True
    except Exception as e:  # as paged_decode_or_none: first failure, then the torch path
        import warnings

        _failed.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"KV store kernel unavailable ({_failed[0][:200]}); using the torch path")
        return False


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """``k_cache[slot_t] = k[t]``, ``v_cache[slot_t] = v[t]``; ``slot_t < 0`` writes the scratch
    slot (the cache's last row). Caches ``[slots + 1, hkv, D]`` contiguous; ``k, v [T, hkv, D]``."""
    T, hkv, D = k.shape
    if T == 0:
        return
    HD = hkv * D
    gdc = gemv.pdl(k)
    _store[(T,)](k_cache, v_cache, slots, k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 k_cache.shape[0] - 1, D=D, HD=HD, BLOCK=triton.next_power_of_2(HD), USE_GDC=gdc, launch_pdl=gdc)


if triton is not None:

    @triton.jit
    def depend(USE_GDC: tl.constexpr):
        """A programmatic dependent launch (``gemv.PDL``): wait for the kernel before (its outputs are
        this one's inputs), then let the next kernel launch, so its prologue (a GEMV's weight
        prefetch) runs beside this one."""
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def key_block(q, K, V, TABLE_ROW, n, valid, allowed, d, dmask, head_off, stride_kslot, scale, m, l, acc,
                  BS: tl.constexpr):
        """One block of keys of the online softmax, shared by the decode and prefill kernels: keys
        ``n [BLOCK_N]`` of one sequence (``valid``: in range) read with their values through its
        block-table row ``TABLE_ROW`` at head offset ``head_off``; ``q [rows, D]``; ``allowed [rows
        or 1, BLOCK_N]`` the keys each query row may read. Returns the updated running max ``m``,
        sum ``l`` and accumulator ``acc``; a row with no key allowed yet keeps ``m = -inf`` and
        gains nothing."""
        blk = tl.load(TABLE_ROW + n // BS, mask=valid, other=0)
        row = (blk * BS + n % BS).to(tl.int64) * stride_kslot + head_off
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(K + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        qk = tl.where(allowed, tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # [rows, BLOCK_N]
        m_new = tl.maximum(m, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        v = tl.load(V + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    @triton.jit
    def range_result(m, l, acc):
        """A key range's result from its online softmax state (``m, l [rows]``, ``acc [rows, BLOCK_D]``):
        ``out_r = acc / l`` and ``lse_r = m + log l``; a row that read no key has ``out_r = 0`` and
        ``lse_r = -inf``."""
        safe = tl.where(l > 0, l, 1.0)
        return acc / safe[:, None], tl.where(l > 0, m + tl.log(safe), float("-inf"))

    @triton.jit
    def range_weights(lse, top):
        """The combine's weights ``exp(lse_r - M)`` of ranges against their largest ``M = top``, shared
        by the decode and prefill combines: ``out = sum_r w_r out_r / sum_r w_r``. A range with
        ``lse = -inf`` (no key) weighs 0, and when no range had a key (``M = -inf``) every weight is 0."""
        return tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))

    @triton.jit
    def row_of(ROWS, s, HAS_ROWS: tl.constexpr):
        """Sequence ``s``'s row of the queries and of the result: ``ROWS[s]``, or ``s`` itself."""
        if HAS_ROWS:
            return tl.load(ROWS + s).to(tl.int64)
        return s.to(tl.int64)

    @triton.jit
    def _partial(Q, K, V, TABLE, LENS, OUT, LSE, ROWS, stride_qs, stride_qh, stride_kslot, stride_kh, stride_ts,
                 keys_per_split, scale, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
                 HAS_ROWS: tl.constexpr = False, USE_GDC: tl.constexpr = False):
        depend(USE_GDC)
        s = tl.program_id(0)
        h = tl.program_id(1)
        r = tl.program_id(2)
        H = tl.num_programs(1)
        R = tl.num_programs(2)
        row = row_of(ROWS, s, HAS_ROWS)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        n_keys = tl.load(LENS + s)
        lo = r * keys_per_split
        if HAS_ROWS or not DIRECT:
            if lo >= n_keys:  # a range past the sequence's keys (or a slot that is no decode, its row
                return  # perhaps past q): nothing to read or write; the combine reads only ranges with keys
        q = tl.load(Q + row * stride_qs + (h * G + g)[:, None] * stride_qh + d[None, :],
                    mask=(g < G)[:, None] & dmask[None, :], other=0.0)
        hi = tl.minimum(lo + keys_per_split, n_keys)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            valid = n < hi
            m, l, acc = key_block(q, K, V, TABLE + s * stride_ts, n, valid, valid[None, :], d, dmask,
                                  h * stride_kh, stride_kslot, scale, m, l, acc, BS)
        out, lse = range_result(m, l, acc)
        if DIRECT:  # OUT is the [S, hq * D] result: query head h * G + g of sequence s (at its row)
            tl.store(OUT + (row * H * G + h * G + g)[:, None] * D + d[None, :],
                     out.to(OUT.dtype.element_ty), mask=(g < G)[:, None] & dmask[None, :])
            return
        base = (s * H + h) * R + r
        tl.store(OUT + (base * BLOCK_G + g)[:, None] * BLOCK_D + d[None, :], out,
                 mask=dmask[None, :] & (g < G)[:, None])  # the group's rows only: the combine reads no others
        tl.store(LSE + base * BLOCK_G + g, lse, mask=g < G)

    @triton.jit
    def _combine(OUT, LSE, O, ROWS, LENS, R, keys_per_split, G: tl.constexpr, BLOCK_G: tl.constexpr,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_ROWS: tl.constexpr = False,
                 USE_GDC: tl.constexpr = False):
        depend(USE_GDC)
        s = tl.program_id(0)
        qh = tl.program_id(1)  # query head: KV head qh // G, row qh % G of its group
        n_keys = tl.load(LENS + s)
        if HAS_ROWS:
            if n_keys == 0:  # no decode (``_partial`` wrote no range)
                return
        hq = tl.num_programs(1)
        H = hq // G
        r = tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        has = r < tl.cdiv(n_keys, keys_per_split)  # the ranges ``_partial`` wrote: those holding keys
        rows = ((s * H + qh // G) * R + r) * BLOCK_G + qh % G  # [BLOCK_R] rows of this head, one per range
        lse = tl.load(LSE + rows, mask=has, other=float("-inf"))
        w = range_weights(lse, tl.max(lse, 0))
        x = tl.load(OUT + rows[:, None] * BLOCK_D + d[None, :], mask=has[:, None], other=0.0)
        o = tl.sum(w[:, None] * x, 0) / tl.maximum(tl.sum(w, 0), 1e-30)
        tl.store(O + (row_of(ROWS, s, HAS_ROWS) * hq + qh) * D + d, o.to(O.dtype.element_ty), mask=d < D)

    @triton.jit
    def _store(KC, VC, SLOTS, K, V, stride_kt, stride_kh, stride_vt, stride_vh, scratch, D: tl.constexpr,
               HD: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
        depend(USE_GDC)
        t = tl.program_id(0)
        slot = tl.load(SLOTS + t)
        slot = tl.where(slot < 0, scratch, slot).to(tl.int64)
        i = tl.arange(0, BLOCK)
        mask = i < HD
        h, d = i // D, i % D
        k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(KC + slot * HD + i, k, mask=mask)
        tl.store(VC + slot * HD + i, v, mask=mask)
