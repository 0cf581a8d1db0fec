"""FP8-weight products at decode batch sizes on the GPU (Triton kernels): weight-only dequant
("W8A16") up to ``W8A16_MAX_M`` rows, FP8 x FP8 tensor cores ("W8A8", ``executors.fp8_w8a8``) above,
up to ``MAX_M``.

    y [M, N] = (x [M, K] @ q [N, K]^T) * scale [N]

``x`` in bf16/fp16, ``q`` in float8_e4m3fn, ``scale`` fp32 (one per row of ``q``: an
``executors.quant.Fp8Weight``), products summed in fp32, the scale applied to the
fp32 sum, the result cast to ``x``'s dtype. In the W8A16 tilings the activations are not quantized:
e4m3 values are exact in bf16/fp16, so the only rounding besides fp32 summation is the final cast.
The W8A8 kernel quantizes ``x`` per row to e4m3 (as ``torch._scaled_mm``'s row-wise path in
``executors.quant.w8a8_rowwise`` does; see ``executors.fp8_w8a8``).

Bytes moved: ``N K`` (the weight, once) + ``4 N`` (scales) + ``2 M K`` (x) + ``2 M N`` (y). For ``M <= 256`` and the projections of 8B-70B models the weight dominates, so the
floor is ``N K`` bytes over the memory bandwidth: half the bf16 GEMM's; from ``M ~ 200`` on an H200
the FP8 tensor cores' ``2 M N K`` FLOPs bound it instead. ``torch._scaled_mm`` (the
W8A8 path of ``executors.quant``) does not reach it at these M on an H200 (1.0-1.3x the bf16
GEMM's time at M = 16-256, ``bench/results/published.md``) and needs the activations quantized first
(several more kernels).

Three tilings, chosen by M:

* ``M <= GEMV_MAX_M`` (``executors.gemv``'s kernel, the scale applied to its sums): one program owns ``BLOCK_N`` output
  columns and streams their rows of ``q`` in ``[BLOCK_N, BLOCK_K]`` tiles (each weight byte read
  once, by one program), widened to fp32 and multiplied by the ``[M, BLOCK_K]`` slice of ``x`` into an
  fp32 ``[M, BLOCK_N, BLOCK_K]`` accumulator summed over K at the end.
* ``GEMV_MAX_M < M <= W8A16_MAX_M`` (tiled, tensor cores): one program owns a ``[BLOCK_M, BLOCK_N]`` tile of
  ``y``; per K step it loads ``x [BLOCK_M, BLOCK_K]`` and ``q^T [BLOCK_K, BLOCK_N]``, converts the
  e4m3 tile to ``x``'s dtype in registers and accumulates ``tl.dot`` in fp32. BLOCK_M is small
  (16-64); programs are ordered M tile first, so the ``ceil(M / BLOCK_M)`` programs reading one
  weight tile run together and all but the first find it in L2.
* ``W8A16_MAX_M < M <= MAX_M`` (``W8A8_MAX_M``, ``executors.fp8_w8a8``): the same tiling with ``x`` quantized per row
  to e4m3 (in the product's loads up to ``fp8_w8a8.FUSE_MAX_M`` rows, by a small kernel before
  above), ``tl.dot`` of e4m3 operands (FP8 tensor cores, twice bf16's rate) and the row and
  column scales in the epilogue; split-K for narrow shards. Beyond ``MAX_M``: ``torch._scaled_mm``.

Tiles are chosen by Triton's autotuner per ``(N, K, M bucket)`` (``M_BLOCK`` = next power of two of
M) the first time a shape runs (the engine's warm-up, before any CUDA graph capture).
``fp8_linear`` is a ``torch.library`` custom op with a fake kernel, so compiled layers call it
without a graph break; ``wanted`` says when ``executors.quant.linear`` routes an FP8 product here and
``kernel_name`` which kernel serves it. ``SHIFTPLAN_FP8_GEMM=0`` keeps every FP8 product on
``torch._scaled_mm``; ``SHIFTPLAN_FP8_W8A8=0`` only those above ``W8A16_MAX_M`` (A/B measurements).
``bench/fp8_gemm_speed.py`` measures them against bf16, ``_scaled_mm`` and the floor.
"""

from __future__ import annotations

import inspect

import torch

from executors import fp8_w8a8, gemv
from executors.switches import switch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: products stay with torch
    triton = None

# Measured on an H200 (bench/results/fp8_gemm_speed.md, 70B TP2-TP8 and 8B projections): the GEMV-like
# tiling wins only at 1-2 rows (at 4-16 rows it is 2-13x its floor, the tl.dot tiling 1.6-3x); the
# tl.dot tiling beats _scaled_mm up to 32 rows and loses from 64-128 rows on the larger shards.
W8A16_MAX_M = 32  # rows served by the W8A16 tilings; above, the W8A8 kernel (fp8_w8a8)
GEMV_MAX_M = 2  # up to this many rows the GEMV-like tiling, above it the tl.dot tiling
ENABLED = switch("SHIFTPLAN_FP8_GEMM")  # 0: every FP8 product through _scaled_mm
W8A8 = switch("SHIFTPLAN_FP8_W8A8")  # 0: products above W8A16_MAX_M through _scaled_mm
# the W8A8 kernel's rows in the engine's route (it serves up to fp8_w8a8.MAX_M): on the calibration grid's 121
# (N, K) pairs on an H200 (bench/results/fp8_kernels_calibration.md) it matches torch._scaled_mm at 48-64 rows
# (median 0.98x / 1.02x its time) and loses above (1.31x at 96 rows, 1.19-1.49x at 256-1,024; 1 win of 121 at 1,024)
W8A8_MAX_M = 64
MAX_M = W8A8_MAX_M if W8A8 else W8A16_MAX_M  # rows of x served here; larger batches go to torch._scaled_mm
KERNEL = "triton_w8a16"  # the names calibration points record for products served here
KERNEL_W8A8 = "triton_w8a8"
FP8 = torch.float8_e4m3fn

GEMV_CONFIGS = [(bn, bk, w) for bn in (4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)]  # (BLOCK_N, BLOCK_K, warps)
MMA_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); narrow tiles give small-N shards (TP8 qkv) programs
    (16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4),
    (32, 32, 256, 4, 4), (32, 64, 128, 4, 4), (32, 64, 256, 4, 3), (32, 128, 128, 4, 3),
    (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3),
]


def _capable(device: torch.device) -> bool:
    """e4m3 -> bf16/fp16 conversion in Triton: compute capability 8.9 or newer."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def wanted(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """``x [..., K]`` times the FP8 weight ``q [N, K]`` (fp32 ``scale [N]``) goes to the kernel: CUDA
    with FP8 conversions, bf16/fp16 ``x`` of at most MAX_M rows with unit-stride rows, contiguous
    e4m3 ``q`` with K a multiple of 16 (``kernel_name`` says which kernel)."""
    return (ENABLED and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and q.dtype == FP8 and q.dim() == 2 and q.is_contiguous() and x.stride(-1) == 1
            and scale.dtype == torch.float32 and scale.numel() == q.shape[0] and scale.is_contiguous()
            and x.shape[-1] == q.shape[1] and x.shape[-1] % 16 == 0
            and x.numel() // x.shape[-1] <= MAX_M and _capable(x.device))


def kernel_name(rows: int) -> str:
    """The kernel serving a product of ``rows`` rows that ``wanted`` routes here."""
    return KERNEL if rows <= W8A16_MAX_M else KERNEL_W8A8


def launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, config: tuple[int, ...] | None = None,
           path: str | None = None) -> torch.Tensor:
    """``(x [M, K] @ q [N, K]^T) * scale [N]`` -> ``[M, N]`` in ``x``'s dtype (rows of ``x`` of unit
    stride, any row stride; ``q`` contiguous).

    ``path`` "gemv", "mma" or "w8a8" forces a tiling (default: "gemv" for M <= GEMV_MAX_M, "mma" up
    to W8A16_MAX_M, "w8a8" above); ``config`` pins its tile (``GEMV_CONFIGS`` / ``MMA_CONFIGS`` /
    ``fp8_w8a8.CONFIGS`` entries; benchmarks, tests); None lets the autotuner choose."""
    M, K = x.shape
    N = q.shape[0]
    if path == "w8a8" or (path is None and M > W8A16_MAX_M):
        return fp8_w8a8.launch(x, q, scale, config=config)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    MB = triton.next_power_of_2(M)
    args = (x, q, scale, y, M, N, K, x.stride(0), y.stride(0), MB)
    path = path or ("gemv" if M <= GEMV_MAX_M else "mma")
    if path == "gemv":
        if config is None:
            _gemv_tuned[lambda c: (triton.cdiv(N, c["BLOCK_N"]),)](*args, True)
        else:
            bn, bk, warps = config
            gemv._gemv[(triton.cdiv(N, bn),)](*args, True, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    elif config is None:
        _mma_tuned[lambda c: (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))](*args)
    else:
        bm, bn, bk, warps, stages = config
        _w8_mma[(triton.cdiv(M, bm), triton.cdiv(N, bn))](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                          num_warps=warps, num_stages=stages)
    return y


@torch.library.custom_op("shiftplan::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x [M, K] @ q[N, K]^T) * scale`` for ``M <= MAX_M`` (see the module doc; above
    ``W8A16_MAX_M`` rows ``x`` is quantized to e4m3 per row)."""
    return launch(x, q, scale)


@fp8_linear.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[0])


if triton is not None:

    @triton.jit
    def _w8_mma(X, Q, S, Y, M, N, K, stride_xm, stride_ym, M_BLOCK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # M tiles first: one weight tile, read together
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask, nmask = m < M, n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(Q + n[None, :].to(tl.int64) * K + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(x, w.to(X.dtype.element_ty), acc)  # [BLOCK_K, BLOCK_N] e4m3 widened in registers
        y = acc * tl.load(S + n, mask=nmask, other=0.0)[None, :]
        tl.store(Y + m[:, None] * stride_ym + n[None, :], y.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    def _mma_fits(configs: list, nargs: dict, **_kw) -> list:
        """Tiles no taller than the rows (rounded up to 16, the smallest tensor-core tile)."""
        m = max(16, nargs["M_BLOCK"])
        ok = [c for c in configs if c.kwargs["BLOCK_M"] <= m]
        return ok or configs[:1]

    def _tune_bench(fn, quantiles=None):
        """A short timing per candidate tile (5 ms warm-up, 25 ms of calls, L2 flushed before each):
        one shape runs at up to 9 row buckets, each tuned at the engine's warm-up."""
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    _bench = {"do_bench": _tune_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
    _gemv_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn, bk, w in GEMV_CONFIGS],
        key=["N", "K", "M_BLOCK"], prune_configs_by={"early_config_prune": gemv.fits}, **_bench,
    )(gemv._gemv)  # the bf16 GEMV's kernel with the scale applied
    _mma_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bm, bn, bk, w, s in MMA_CONFIGS],
        key=["N", "K", "M_BLOCK"], prune_configs_by={"early_config_prune": _mma_fits}, **_bench,
    )(_w8_mma)
