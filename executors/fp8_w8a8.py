"""FP8 x FP8 products on tensor cores for batches of tens to a thousand rows (Triton kernels, "W8A8").

    y [M, N] = (xq [M, K] @ q [N, K]^T) * xs [M, 1] * scale [1, N]

``q`` in float8_e4m3fn with ``scale`` fp32 per row (an ``executors.quant.Fp8Weight``); ``x`` in
bf16/fp16 quantized per row (per token) as ``executors.quant.w8a8_rowwise`` does it:
``xs = max(max|x_row| / 448, 1e-12)`` in fp32 and ``xq = e4m3(clamp(x * (1 / xs), +-448))`` (round to
nearest even). ``tl.dot`` of the two e4m3 tiles accumulates in fp32 (Hopper / Ada FP8 tensor
cores; each ``BLOCK_K`` step's sum is added to the fp32 accumulator in full precision,
``max_num_imprecise_acc=BLOCK_K``: Hopper's FP8 ``wgmma`` keeps fewer accumulator bits than fp32, and
Triton's default there leaves the whole K to it); the epilogue applies ``xs`` and ``scale`` to the
fp32 sum and casts to ``x``'s dtype. The scheme is that of ``torch._scaled_mm``
with row-wise scales (``quant.w8a8_rowwise``, which rounds ``xs`` to ``x``'s dtype where this keeps it
in fp32): the activations' rounding (3 mantissa bits, a relative error of at most 2^-4 per element)
is the price of the FP8 tensor cores, ~2-4e-2 of the largest output on random data (the W8A16
kernel: ~3e-3).

Two launches:

* ``_row_scale`` (one program per row of ``x``): ``xs [M]``, reading ``x`` once (``2 M K`` bytes);
  with ``WRITE_Q`` a second pass over the row (from L2) writes ``xq [M, K]`` (``M K`` bytes).
* ``_w8a8`` (one program per ``[BLOCK_M, BLOCK_N]`` tile of ``y`` and K slice): per K step it loads
  ``x [BLOCK_M, BLOCK_K]`` and ``q^T [BLOCK_K, BLOCK_N]`` (``q``'s rows are K-major, the layout FP8
  ``wgmma`` wants for its B operand) and accumulates ``tl.dot`` in fp32. Up to ``FUSE_MAX_M`` rows the
  ``x`` tile is loaded in bf16/fp16 and quantized in registers with the row's ``1 / xs`` (no ``xq``
  round trip; the ``N / BLOCK_N`` programs of a row block each quantize it again, ~3 ALU operations
  an element, hidden while the weight stream bounds the time); above it ``_row_scale`` writes ``xq``
  and the product loads e4m3 tiles (compute-bound sizes, where re-quantizing would compete with the
  tensor cores). Programs run M tile first, so those reading one weight tile run together and all
  but the first find it in L2: the weight is read from HBM once.

Both launch as programmatic dependent launches where ``executors.gemv`` does (``SHIFTPLAN_PDL``,
Hopper and newer): each waits on the GPU for the kernel before it ends before reading anything, and
lets the next one launch once its main loop is done, so the launch gaps overlap the work.

Bytes moved: ``N K`` (weight) + ``4 N`` (scales) + ``2 M K`` (x, once from HBM) + ``2 M N`` (y)
(+ ``2 M K`` for ``xq`` above ``FUSE_MAX_M``). FLOPs ``2 M N K``. On an H200
(~4.3 TB/s copy, 1979 TFLOP/s dense FP8) the weight bound and the FP8 compute bound meet near
``M ~ 200``: below it the floor is ``N K`` bytes over the bandwidth, above it ``2 M N K`` over the peak.

Split-K (narrow ``N``: a TP8 shard's ``qkv`` has 1280 columns, 20 tiles of 64, on 132 SMs):
``SPLIT_K`` programs share a tile, each summing ``K / SPLIT_K``. Each writes its scaled fp32 partial
to a workspace ``[SPLIT_K, M_BLOCK, N]`` and increments the tile's counter (an atomic, after a CTA
barrier: release); the one that finds ``SPLIT_K - 1`` sums the partials in split order (the result
does not depend on which program finished last), stores ``y`` and resets the
counter. One launch, no reduce kernel; the counters (``COUNTERS`` int32 a device, zeroed once) stay
zero between launches. Launches sharing a device's counters must not overlap (one stream, the
engine's case).

Tiles (``CONFIGS``: BLOCK_M/N/K, warps, stages, SPLIT_K) are chosen by Triton's autotuner per
``(N, K, M bucket, x quantized in the GEMM or before)`` (``M_BLOCK`` = next power of two of M) the first
time a shape runs (the engine's warm-up, before CUDA graph capture); ``_fits`` keeps tiles whose
height suits the bucket and splits only up to 256 rows. Under Triton's interpreter (CPU tests) the
quantization rounds in fp32 integer arithmetic before the cast, which then is exact: the
interpreter's fp32 -> e4m3 cast drops the carry of a mantissa rounded up into the exponent
(126.3 -> 64, not 128) and misrounds subnormals; on a GPU the cast itself rounds (``ROUND=False``).
"""

from __future__ import annotations

import os

import torch

from executors import gemv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: products stay with torch
    triton = None

MAX_M = 1024  # rows served by the W8A8 kernel; larger products go to torch._scaled_mm
FUSE_MAX_M = 128  # up to this many rows x is quantized in the product's loads; above, by _row_scale first
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
COUNTERS = 1 << 16  # split-K tile counters a device (int32, 256 KiB)
WORKSPACE_BYTES = 8 << 20  # the split-K partials [SPLIT_K, M_BLOCK, N] fp32 (allocated a call) stay within this
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K)
    # 33-128 rows: the weight stream bounds the time; narrow N (TP8 shards) splits K for programs
    (32, 64, 128, 4, 4, 1), (32, 128, 128, 4, 4, 1), (64, 64, 128, 4, 4, 1), (64, 128, 128, 4, 4, 1),
    (64, 64, 256, 4, 3, 1), (64, 128, 256, 8, 3, 1),
    (32, 64, 128, 4, 4, 4), (64, 64, 128, 4, 4, 2), (64, 64, 128, 4, 4, 4), (64, 64, 256, 4, 3, 8),
    (64, 128, 128, 4, 4, 2), (64, 128, 128, 8, 4, 8),
    # 256-1024 rows: FP8 compute bound on the wider shards, wgmma tiles of 128 rows (a 128 x 256 fp32
    # accumulator spills at 8 warps: 64 x 256 instead)
    (128, 64, 128, 4, 4, 1), (128, 128, 64, 8, 4, 1), (128, 128, 128, 8, 4, 1), (128, 128, 128, 8, 3, 2),
    (128, 128, 256, 8, 3, 1), (64, 256, 128, 8, 3, 1), (64, 256, 64, 8, 4, 1), (128, 128, 128, 8, 3, 4),
]
ROW_BLOCK_K = 1024  # _row_scale's step along K

_counters: dict[torch.device, torch.Tensor] = {}


def split_max(N: int, m_block: int) -> int:
    """The largest SPLIT_K the workspace admits at ``N`` columns and ``m_block`` rows (1: no split):
    ``SPLIT_K * m_block * N * 4`` bytes within ``WORKSPACE_BYTES``, only up to 256 rows."""
    if m_block > 256:
        return 1
    s = 1
    while s < 8 and 2 * s * m_block * N * 4 <= WORKSPACE_BYTES:
        s *= 2
    return s


def row_scale(x: torch.Tensor, write_q: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``xs [M]`` fp32 (``max(max|x_row| / 448, 1e-12)``) and, with ``write_q``, ``xq [M, K]`` e4m3."""
    M, K = x.shape
    xs = torch.empty(M, dtype=torch.float32, device=x.device)
    xq = torch.empty(M, K, dtype=FP8, device=x.device) if write_q else None
    if M:
        gdc = gemv.pdl(x)
        _row_scale[(M,)](x, xs, xq if write_q else xs, K, x.stride(0), K, write_q, INTERPRET,
                         BLOCK_K=min(ROW_BLOCK_K, triton.next_power_of_2(K)), USE_GDC=gdc, num_warps=4,
                         launch_pdl=gdc)
    return xs, xq


def launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, config: tuple[int, ...] | None = None,
           fused: bool | None = None) -> torch.Tensor:
    """``(e4m3(x / xs) [M, K] @ q [N, K]^T) * xs * scale [N]`` -> ``[M, N]`` in ``x``'s dtype (rows of
    ``x`` of unit stride, any row stride; ``q`` contiguous).

    ``fused`` quantizes ``x`` in the product's loads (default: up to ``FUSE_MAX_M`` rows) or, False,
    in ``_row_scale`` first; ``config`` pins the tile (a ``CONFIGS`` entry; benchmarks, tests), None
    lets the autotuner choose."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    fused = M <= FUSE_MAX_M if fused is None else fused
    xs, xq = row_scale(x, write_q=not fused)
    xa, sxm = (x, x.stride(0)) if fused else (xq, K)
    MB = triton.next_power_of_2(M)
    splits = split_max(N, MB) if config is None else config[5]
    ws = torch.empty(splits * MB * N if splits > 1 else 1, dtype=torch.float32, device=x.device)
    cnt = _counter(x.device)
    args = (xa, xs, q, scale, y, ws, cnt, M, N, K, sxm, y.stride(0), MB, splits, not fused, INTERPRET)
    gdc = gemv.pdl(x)  # programmatic dependent launch, as executors.gemv
    if config is None:
        _tuned[lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]), c["SPLIT_K"])](
            *args, USE_GDC=gdc, launch_pdl=gdc)
    else:
        bm, bn, bk, warps, stages, sk = config
        assert sk == 1 or triton.cdiv(M, bm) * triton.cdiv(N, bn) <= COUNTERS
        _w8a8[(triton.cdiv(M, bm), triton.cdiv(N, bn), sk)](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk,
                                                            USE_GDC=gdc, num_warps=warps, num_stages=stages,
                                                            launch_pdl=gdc)
    return y


def _counter(device: torch.device) -> torch.Tensor:
    """The device's split-K tile counters (zeroed at the first launch there; each split tile's last
    program sets its counter back to zero)."""
    c = _counters.get(device)
    if c is None:
        c = _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return c


if triton is not None:

    @triton.jit
    def _to_e4m3(v, ROUND: tl.constexpr):
        """fp32 ``v`` clamped to +-448 and rounded to e4m3 (nearest, ties to even)."""
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if ROUND:  # the e4m3 grid in fp32 first (interpreter: its cast loses a carry into the exponent)
            b = v.to(tl.int32, bitcast=True)
            b = (b + 0x7FFFF + ((b >> 20) & 1)) & -0x100000  # normals: 3 mantissa bits, to nearest even
            sub = (v + 24576.0) - 24576.0  # below 2^-6 (subnormals): multiples of 2^-9 (1.5 * 2^14 + v rounds there)
            nrm = tl.minimum(tl.maximum(b.to(tl.float32, bitcast=True), -448.0), 448.0)
            v = tl.where(tl.abs(v) < 0.015625, sub, nrm)
        return v.to(tl.float8e4nv)

    @triton.jit
    def _row_scale(X, XS, XQ, K, stride_xm, stride_qm, WRITE_Q: tl.constexpr, ROUND: tl.constexpr,
                   BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr = False):
        """Row ``program_id(0)`` of ``x``: ``xs = max(max|x| / 448, 1e-12)``, and ``xq = e4m3(x / xs)``.
        ``USE_GDC`` (a programmatic dependent launch): wait for the previous kernel before reading
        ``x``, and let the product launch once this row is written."""
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0).to(tl.int64)
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        xs = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
        tl.store(XS + row, xs)
        if WRITE_Q:
            inv = 1.0 / xs
            for k0 in range(0, K, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(X + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
                tl.store(XQ + row * stride_qm + k, _to_e4m3(x * inv, ROUND), mask=k < K)
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _w8a8(X, XS, Q, S, Y, WS, CNT, M, N, K, stride_xm, stride_ym, M_BLOCK, WS_SPLITS,
              X_FP8: tl.constexpr, ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_GDC: tl.constexpr = False):
        """``y = (xq q^T) * xs * S``; ``X`` e4m3 (``X_FP8``) or bf16/fp16 quantized here with ``XS``.
        ``USE_GDC`` (a programmatic dependent launch): wait for the previous kernel (``_row_scale``)
        before reading anything, and let the next one launch once the products are summed."""
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # M tiles first: one weight tile, read together
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = m < M, n < N
        xs = tl.load(XS + m, mask=mmask, other=1.0)
        inv = 1.0 / xs
        chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # this split's K range
        k_lo = pid_k * chunk
        k_hi = tl.minimum(K, k_lo + chunk)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < k_hi
            x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            if not X_FP8:
                x = _to_e4m3(x.to(tl.float32) * inv[:, None], ROUND)
            w = tl.load(Q + n[None, :].to(tl.int64) * K + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(x, w, acc, max_num_imprecise_acc=BLOCK_K)  # e4m3 x e4m3, fp32 sum of each K step
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
        y = acc * xs[:, None] * tl.load(S + n, mask=nmask, other=0.0)[None, :]
        out_mask = mmask[:, None] & nmask[None, :]
        last = True
        if SPLIT_K > 1:  # partials to the workspace; the tile's last program sums them in split order
            ws = WS + m[:, None] * N + n[None, :]
            tl.store(ws + pid_k.to(tl.int64) * M_BLOCK * N, y, mask=out_mask)
            tl.debug_barrier()  # every thread's partial stored before the counter moves
            tile = pid_n * tl.num_programs(0) + pid_m
            last = tl.atomic_add(CNT + tile, 1) == SPLIT_K - 1  # acq_rel, GPU scope
            if last:
                y = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for s in range(SPLIT_K):  # one partial in registers at a time
                    y += tl.load(ws + s * M_BLOCK * N, mask=out_mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(CNT + tile, 0)
        if last:
            tl.store(Y + m[:, None] * stride_ym + n[None, :], y.to(Y.dtype.element_ty), mask=out_mask)

    def _fits(configs: list, nargs: dict, **_kw) -> list:
        """Tiles no taller than the rows (rounded up to 16) and at least a sixteenth of them (at 1024
        rows 64 or 128), splits of K only within the workspace (``split_max``)."""
        mb, n = nargs["M_BLOCK"], nargs["N"]
        top, smax = max(16, mb), min(split_max(n, mb), nargs["WS_SPLITS"])
        ok = [c for c in configs if mb // 16 <= c.kwargs["BLOCK_M"] <= top and c.kwargs["SPLIT_K"] <= smax
              and (c.kwargs["SPLIT_K"] == 1 or triton.cdiv(mb, 16) * triton.cdiv(n, 16) <= COUNTERS)]
        return ok or [c for c in configs if c.kwargs["SPLIT_K"] == 1][:1]

    def _tune_bench(fn, quantiles=None):
        """A short timing per candidate tile (5 ms warm-up, 25 ms of calls, L2 flushed before each)."""
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    import inspect

    _bench = {"do_bench": _tune_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
    _tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
                 for bm, bn, bk, w, s, sk in CONFIGS],
        key=["N", "K", "M_BLOCK", "X_FP8"], prune_configs_by={"early_config_prune": _fits}, **_bench,
    )(_w8a8)
