"""Time of one op on one GPU under (tp, sp): max(compute, memory) + launch overhead.

Per-GPU work of an op whose whole-step work is F FLOPs, under TP degree t and Ulysses SP
degree s (shifted TP mode is t' = t*s, s' = 1):

* matmul-like (``column``/``row``/``vocab``): M = F / (2 k n) rows (tokens, or sequences for an
  lm_head that only scores last tokens), split over s; N = n/t (column, vocab) or K = k/t
  (row). F_gpu = 2 (M/s) N K, weight bytes W/t.
* attention (``heads``): each GPU holds all tokens of heads/(t s) query heads after the
  Ulysses all-to-all; F_gpu = F / (t s); KV read for max(1, g/(t s)) of the g KV heads.
* everything else (``replicated`` norms, adds): its tokens split over s only; ``column``-sharded
  elementwise ops (the MLP activation) over t too.

compute = F_gpu / (peak * e_compute), memory = bytes / (bw * e_mem); e from the profile:
GEMM e(M, N, K); prefill attention e(L, B) with L = T/B new tokens per sequence, or e(L, B, H)
with H this GPU's query heads where the profile measured several head counts; decode
attention (T = B) bandwidth efficiency e(B, C) with C = K/B context (for this repo's engine, its
paged kernel's e(B, C, KV heads), plus the tail of a batch whose longest context reaches a longer
key range than its mean, ``longest_range_tail_ms``); where this repo's engine runs its paged prefill
kernel (``paged``: a step it replays as a CUDA graph, or an eager one with two or more prefill chunks)
that kernel's own table, at the query heads per KV head padded to a power of two as the kernel pads
them (``padded_group``): compute e(L, B, KV heads, group) on the F x padded / real FLOPs it does (a
mixed step's decodes run the decode kernel, graphed or not); memory-bound ops measured
time vs elements. Without a profile: e_compute = 0.7, e_mem = 0.8, 4 us per launch.
Memory-bound ops are timed as HF runs them (eager: RMSNorm alone is ~7 kernels) unless
``Rates.fused``: an engine that fuses elementwise work (torch.compile, TensorRT) moves each op's
bytes once, at the bandwidth the profile measured for ``add`` (which moves 3 x its elements).
Attention that writes K/V into the cache pays two more launches (the cache writes).
``Rates.gemv_bw``: an engine that sends products of at most ``Rates.gemv_max_rows`` rows (a bias
added in the kernel's epilogue) through its own GEMV kernel pays a fixed time a product and streams the bytes at the measured rate,
memory = gemv_call_s + bytes / gemv_bw, in place of the GEMM table (``costmodels.steps``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from costmodels.profile import Profile
from graph.opgraph import Affine, OpNode, StepShape
from plans.engine_shapes import graph_splits, keys_bucket, splits

ROOFLINE_COMPUTE_EFF = 0.7
ROOFLINE_MEM_EFF = 0.8
ROOFLINE_OVERHEAD_US = 4.0
PREFILL_ATTN_MEM_EFF = 0.9  # bandwidth efficiency of a prefill attention kernel's own bytes (q, k, v, out, KV)
MATMUL_KINDS = frozenset({"matmul", "lm_head", "patch_embed", "merger"})


@dataclass(frozen=True)
class OpRec:
    """The parts of an OpNode the hot path needs, with the memory-op table name resolved."""

    kind: str
    shard: str
    flops: Affine
    weight_elems: int
    act_read: Affine
    act_written: Affine
    kv_read: Affine
    kv_written: Affine
    k: float = 0.0
    n: float = 0.0
    heads: float = 1.0
    kv_heads: float = 1.0
    causal: bool = True
    bias: bool = False  # a linear with a bias vector (weight_elems > k*n)
    memop: str = "add"  # profile table of a memory-bound op

    @property
    def is_matmul(self) -> bool:
        return self.kind in MATMUL_KINDS and self.k > 0 and self.n > 0


def memop_name(op: OpNode, tower: str) -> str:
    """Which measured memory-op table stands for this op (HF implementations differ by tower)."""
    if op.kind == "norm":
        return "layernorm" if tower == "vision" else "rmsnorm"
    if op.kind == "activation":
        return "quick_gelu" if tower == "vision" else "silu_mul"
    if op.kind == "rope":
        return "rope_vision" if tower == "vision" else "rope"
    if op.kind == "embedding":
        return "copy"
    return "add"


def op_rec(op: OpNode, tower: str) -> OpRec:
    sh = op.shape or {}
    return OpRec(kind=op.kind, shard=op.shard, flops=op.flops, weight_elems=int(op.weight_elems),
                 act_read=op.act_read, act_written=op.act_written, kv_read=op.kv_read, kv_written=op.kv_written,
                 k=float(sh.get("k", 0) or 0), n=float(sh.get("n", 0) or 0),
                 heads=float(sh.get("heads", 1) or 1), kv_heads=float(sh.get("kv_heads", sh.get("heads", 1)) or 1),
                 causal=bool(sh.get("causal", True)), memop=memop_name(op, tower),
                 bias=op.kind in MATMUL_KINDS and op.weight_elems > float(sh.get("k", 0) or 0) * float(sh.get("n", 0) or 0) > 0)


def split_gating(recs: tuple[OpRec, ...]) -> tuple[OpRec, ...]:
    """A block whose graph lists the gating multiply as its own (column-sharded elementwise)
    op times its text activation as SiLU alone, not SiLU*mul, so the multiply counts once."""
    if not any(r.kind == "elementwise" and r.shard == "column" for r in recs):
        return recs
    return tuple(replace(r, memop="silu") if r.memop == "silu_mul" else r for r in recs)


@dataclass(frozen=True)
class Rates:
    """Per-GPU peak rates and dtype sizes the op costs use."""

    peak_flops: float  # matmul path, FLOP/s
    attn_flops: float  # attention path (bf16 tensor cores), FLOP/s
    bw: float  # HBM bytes/s
    w_bytes: float
    a_bytes: float
    kv_bytes: float
    fused: bool = False  # memory-bound ops fused: one pass over their bytes (not HF's eager kernels)
    fp8_gemm: bool = False  # linears run FP8 GEMMs: the profile's gemm_fp8 table where it has one
    fp8_tensor: bool = False  # ... scaled per tensor (TensorRT-LLM): its gemm_fp8_tensor table where it has one
    gemv_bw: float = 0.0  # bytes/s of the engine's decode GEMV (0: none)
    gemv_call_s: float = 0.0  # and its fixed time a product
    gemv_max_rows: int = 0  # products of at most this many rows run it
    engine_decode: bool = False  # this repo's engine: decode attention from the profile's attn_decode_engine
    decode_us_per_key: float = 0.0  # ... and its range program's time a key (the longest range's tail; 0: none)


def op_time(r: OpRec, s: StepShape, t: int, sp: int, rates: Rates, prof: Profile | None,
            paged: bool = False) -> tuple[float, float, float]:
    """(compute_ms, memory_ms, overhead_ms) of op ``r`` on one GPU for step ``s``; ``paged``: the
    step's prefill attention runs this repo's paged prefill kernel (module doc)."""
    ovh_us = prof.overhead_us if prof else ROOFLINE_OVERHEAD_US
    if s.tokens <= 0:
        return 0.0, 0.0, 0.0
    if r.is_matmul:
        return _matmul(r, s, t, sp, rates, prof, ovh_us)
    if r.kind == "attention":
        return _attention(r, s, t, sp, rates, prof, ovh_us, paged)
    return _memop(r, s, t, sp, rates, prof, ovh_us)


def _matmul(r: OpRec, s: StepShape, t: int, sp: int, rates: Rates, prof: Profile | None,
            ovh_us: float) -> tuple[float, float, float]:
    f_total = r.flops(s)
    m = f_total / (2.0 * r.k * r.n) / sp
    if m <= 0:
        return 0.0, 0.0, 0.0
    n, k = r.n, r.k
    wt = 1
    ar, aw = r.act_read(s) / sp, r.act_written(s) / sp
    if r.shard in ("column", "vocab"):
        n, wt, aw = n / t, t, aw / t
    elif r.shard == "row":
        k, wt, ar = k / t, t, ar / t
    flops = 2.0 * m * n * k
    nbytes = r.weight_elems / wt * rates.w_bytes + (ar + aw) * rates.a_bytes
    if gemv(r, m, rates):
        return 0.0, (rates.gemv_call_s + nbytes / rates.gemv_bw) * 1e3, ovh_us * 1e-3
    if prof is None:
        eff = ROOFLINE_COMPUTE_EFF
    elif rates.fp8_gemm and rates.fp8_tensor and prof.gemm_fp8_tensor is not None:
        eff = prof.gemm_fp8_tensor(m, n, k)  # measured per-tensor FP8 GEMMs, against the FP8 peak
    elif rates.fp8_gemm and prof.gemm_fp8 is not None:
        eff = prof.gemm_fp8(m, n, k)  # measured FP8 GEMMs of this repo's engine, against the FP8 peak
    else:
        eff = prof.gemm(m, n, k)  # bf16 GEMMs (for FP8 weights: the bf16 efficiency at the FP8 peak)
    c = flops / (rates.peak_flops * max(eff, 1e-4)) * 1e3
    mem = nbytes / (rates.bw * (0.92 if prof else ROOFLINE_MEM_EFF)) * 1e3
    if r.bias and prof is not None and prof.gemm_bias is not None:
        extra = prof.gemm_bias(m, n) * 1e-3
        c, mem = (c + extra, mem) if c >= mem else (c, mem + extra)
    return c, mem, ovh_us * 1e-3


def gemv(r: OpRec, m: float, rates: Rates) -> bool:
    """Whether a product of ``m`` rows runs the engine's GEMV: a decoder linear (not the lm_head; with
    or without a bias, which the kernel adds in its epilogue), ``m <= gemv_max_rows``, where the engine
    has one (``gemv_bw > 0``)."""
    return rates.gemv_bw > 0 and r.kind == "matmul" and m <= rates.gemv_max_rows


def padded_group(r: OpRec) -> int:
    """Query heads per KV head as the engine's paged prefill kernel runs them: the next power of two."""
    return 1 << (max(1, round(r.heads / max(r.kv_heads, 1.0))) - 1).bit_length()


def _paged_prefill(rates: Rates, prof: Profile | None) -> bool:
    """This repo's engine, and a profile that measured its paged prefill kernel on prefill chunks."""
    return rates.engine_decode and prof is not None and prof.attn_prefill_engine is not None


def _attention(r: OpRec, s: StepShape, t: int, sp: int, rates: Rates, prof: Profile | None,
               ovh_us: float, paged: bool = False) -> tuple[float, float, float]:
    if s.mixed:  # prefill chunks + decodes: one varlen kernel, each part at its own efficiency
        p, d = s.split()
        cp, mp, op = _attention(r, p, t, sp, rates, prof, ovh_us, paged)
        cd, md, _ = _attention(r, d, t, sp, rates, prof, ovh_us)
        return cp + cd, mp + md, op
    ts = t * sp
    frac = 1.0 / ts
    kv_frac = max(1.0, r.kv_heads / ts) / r.kv_heads
    flops = r.flops(s) * frac
    kv_bytes = (r.kv_read(s) + r.kv_written(s)) * kv_frac * rates.kv_bytes
    act_bytes = (r.act_read(s) + r.act_written(s)) * frac * rates.a_bytes
    seqs = max(s.seqs, 1.0)
    q_per_seq = s.tokens / seqs
    # the kernel, plus writing the step's K and V into the cache (two copies) when it does
    ovh_us = ovh_us * (3 if r.kv_written(s) > 0 else 1)
    if prof is None:
        c = flops / (rates.attn_flops * ROOFLINE_COMPUTE_EFF) * 1e3
        mem = (kv_bytes + act_bytes) / (rates.bw * ROOFLINE_MEM_EFF) * 1e3
        return c, mem, ovh_us * 1e-3
    if q_per_seq < 1.5:  # decode: bandwidth-bound read of each sequence's KV
        ctx = max(s.kv / seqs, 1.0)
        if rates.engine_decode and prof.attn_decode_engine is not None:  # at this GPU's KV heads
            eff_m = prof.attn_decode_engine(seqs, ctx, r.kv_heads * kv_frac)
        else:
            eff_m = prof.attn_decode(seqs, ctx)
        mem = (kv_bytes + act_bytes) / (rates.bw * max(eff_m, 1e-3)) * 1e3
        return 0.0, mem + decode_tail_ms(r, s, t, sp, rates, prof), ovh_us * 1e-3
    if paged and r.causal and r.kv_heads >= ts and _paged_prefill(rates, prof):  # the engine's paged prefill kernel
        # (it serves plain GQA only: with KV heads replicated over the GPUs the engine runs SDPA)
        g = padded_group(r)
        eff = prof.attn_prefill_engine(q_per_seq, seqs, max(1.0, r.kv_heads / ts), g)
        c = flops * g * r.kv_heads / r.heads / (rates.attn_flops * max(eff, 1e-5)) * 1e3
        mem = (kv_bytes + act_bytes) / (rates.bw * PREFILL_ATTN_MEM_EFF) * 1e3
        return c, mem, ovh_us * 1e-3
    table = prof.attn_causal if r.causal else prof.attn_full
    # a table with a heads axis is read at this GPU's share of the query heads
    eff = table(q_per_seq, seqs, r.heads * frac) if len(table.axes) == 3 else table(q_per_seq, seqs)
    c = flops / (rates.attn_flops * max(eff, 1e-4)) * 1e3
    mem = (kv_bytes + act_bytes) / (rates.bw * PREFILL_ATTN_MEM_EFF) * 1e3
    return c, mem, ovh_us * 1e-3


def decode_tail_ms(r: OpRec, s: StepShape, t: int, sp: int, rates: Rates, prof: Profile | None,
                   graph: tuple[int, int] | None = None) -> float:
    """Decode attention op ``r``'s longest-range tail on step ``s`` (``longest_range_tail_ms`` at this
    GPU's KV heads, the batch's mean and longest context; ``graph``: the decodes of a captured mixed
    step, ``(sequence slots, key width)`` of its graph); 0 off the engine's paged kernel, or with the
    longest decode unknown (``StepShape.decode_max_kv`` 0) outside a graph."""
    if not rates.engine_decode or prof is None or prof.attn_decode_engine is None:
        return 0.0
    if s.decode_max_kv <= 0 and graph is None:
        return 0.0
    seqs = max(s.seqs, 1.0)
    kv_local = max(1.0, r.kv_heads / (t * sp))
    mean = max(s.kv / seqs, 1.0)
    return longest_range_tail_ms(seqs, kv_local, mean, max(s.decode_max_kv, mean), rates.decode_us_per_key, graph)


def longest_range(seqs: float, kv_heads: float, keys: float) -> float:
    """Keys of the longest range the engine's paged decode kernel gives one program for ``seqs``
    sequences whose longest holds ``keys`` keys, ``kv_heads`` a GPU: its split of the key bucket
    (``plans.engine_shapes.splits`` over its ``keys_bucket``), at most ``keys``."""
    k = max(1, int(math.ceil(keys)))
    return float(min(_bucket_range(max(1, round(seqs)), max(1, round(kv_heads)), (k - 1).bit_length()), k))


@functools.lru_cache(maxsize=1 << 16)
def _bucket_range(seqs: int, kv_heads: int, bits: int) -> int:
    """The kernel's range for contexts ``n`` with ``(n - 1).bit_length() == bits`` (one key bucket)."""
    return splits(seqs, kv_heads, keys_bucket(1 << bits))[1]


def longest_range_tail_ms(seqs: float, kv_heads: float, mean: float, longest: float, us_per_key: float,
                          graph: tuple[int, int] | None = None) -> float:
    """The paged decode kernel's extra time on a batch of unequal contexts: the efficiency table
    (``attn_decode_engine``) was measured on decode steps with every sequence at the mean, whose
    longest range is ``longest_range(mean)``; here the longest sequence's range holds
    ``longest_range(longest)`` keys and the step waits for it:

        tail = us_per_key * max(0, longest_range(longest) - longest_range(mean))

    With ``graph = (slots, keys)`` the decodes are those of a captured mixed step, whose kernel cuts
    every table of ``keys`` keys (the graph's key bucket) over its ``slots`` sequence slots
    (``plans.engine_shapes.graph_splits``: one range up to 1,024 keys), so the longest range is
    ``min(graph_splits(slots, kv_heads, keys) range, longest)``, even at equal contexts.

    ``us_per_key``: a range program's time a key (``costmodels.steps.fit_decode_us_per_key``, from
    the same calibration's one-wave points). 0 when the longest is unknown or no longer than the mean
    (outside a graph)."""
    if us_per_key <= 0 or (graph is None and longest <= mean):
        return 0.0
    if graph is None:
        top = longest_range(seqs, kv_heads, longest)
    else:
        slots, keys = graph
        top = min(float(graph_splits(slots, max(1, round(kv_heads)), keys)[1]), max(1.0, math.ceil(longest)))
    return max(0.0, top - longest_range(seqs, kv_heads, mean)) * us_per_key * 1e-3


def _memop(r: OpRec, s: StepShape, t: int, sp: int, rates: Rates, prof: Profile | None,
           ovh_us: float) -> tuple[float, float, float]:
    div = sp * (t if r.shard in ("column", "heads", "row") else 1)
    aw = r.act_written(s) / div
    ar = r.act_read(s) / div
    if r.kind == "embedding":  # reads the T looked-up rows, not the table
        nbytes = 2 * aw * rates.a_bytes
    else:
        nbytes = r.weight_elems * rates.a_bytes + (ar + aw) * rates.a_bytes
    if rates.fused and prof is not None and r.kind != "embedding" and "add" in prof.memops:
        us = prof.memop_us("add", (ar + aw + r.weight_elems) / 3)  # one read + write pass, fused
    else:
        us = prof.memop_us(r.memop, aw) if prof else None
    if us is None:
        mem = nbytes / (rates.bw * ROOFLINE_MEM_EFF) * 1e3
        return 0.0, mem, ovh_us * 1e-3
    return 0.0, max(us - ovh_us, 0.0) * 1e-3, ovh_us * 1e-3
