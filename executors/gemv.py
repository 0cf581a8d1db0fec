"""Small-batch matrix-vector products on the GPU (a Triton kernel): ``y [M, N] = x [M, K] @ W^T (+ b)``
with ``W [N, K]`` in bf16/fp16, an optional bias ``b [N]`` added in the kernel's epilogue (Qwen's
QKV), and ``M <= MAX_M`` (batch-1 decode steps).

At M = 1 a decode step is a chain of GEMVs whose cost is reading ``W`` once (``2 N K`` bytes). On
an H200 cuBLAS reads the smaller projections of an 8B model (``qkv`` 6144 x 4096, ``o`` 4096 x
4096) at ~3.1 TB/s and adds a split-K reduce kernel (and a copy) to ``o`` and ``down``
(``bench/results/gemv_speed.md``, and the ``graph_kernels`` of ``bench/results/engine_speed.json``'s
history). Here one program owns ``BLOCK_N`` output
columns and streams their rows of ``W`` in ``[BLOCK_N, BLOCK_K]`` tiles, multiplying by the matching
``[M, BLOCK_K]`` slice of ``x`` into an fp32 ``[M, BLOCK_N, BLOCK_K]`` accumulator that is summed
over ``K`` once at the end: one launch, no reduce kernel, ``W`` read once. The tile shape is
chosen per ``(N, K, M)`` by Triton's autotuner the first time a shape runs (the engine's warm-up,
before any CUDA graph capture). ``bench/gemv_speed.py`` measures it against cuBLAS and the floor; in
a batch-1 decode step of Llama-3.1-8B on an H200 the 128 projections take 3.53 ms (3.97 TB/s) where
cuBLAS took 3.65 ms plus ~150 us of split-K reduce and residual-copy kernels.

The MLP's ``down`` product reads ``[gate | up]`` (the ``gate_up`` output) and forms its input
``silu(gate) * up`` in its loads (``gated``), so a decode step has no separate SiLU kernel and the
``down`` GEMV follows ``gate_up`` as a dependent launch.

``gemv`` is a ``torch.library`` custom op (a fake kernel gives its shape), so compiled
layers call it without a graph break; ``wanted`` says when ``executors.quant.linear`` routes a product here.
"""

from __future__ import annotations

import torch

from executors.switches import switch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: products stay with torch
    triton = None

MAX_M = 1  # rows of x served here; larger batches are matrix products (cuBLAS). In the decode graphs of a
# traced replay on an H200 (Llama-3.1-8B, bench/results/fidelity_2gpu.single_before.steps.json.gz) the
# kernel's 2-row steps took 5.2 ms and its 3-4-row steps 7.8 ms where cuBLAS's 5-8 rows took 5.1-5.4 ms
# (with cuBLAS, 2-4 rows take 4.8-4.9 ms: fidelity_2gpu.steps.json.gz); at 1 row it wins (4.4 against 4.7)
ENABLED = switch("SHIFTPLAN_GEMV")  # 0: every product through cuBLAS (A/B measurements)
# Programmatic dependent launch (Hopper+): the kernel is launched while the one before it finishes and
# waits for it on the GPU (``griddepcontrol.wait``) before reading its inputs; 0 turns it off (A/B)
PDL = switch("SHIFTPLAN_PDL")
CONFIGS = [(bn, bk, w) for bn in (4, 8, 16) for bk in (512, 1024) for w in (4, 8)]  # (BLOCK_N, BLOCK_K, warps)


def wanted(x: torch.Tensor, w: torch.Tensor, gated: bool = False, b: torch.Tensor | None = None) -> bool:
    """``x [..., K]`` times ``w [N, K]`` (plus ``b [N]``) goes to the kernel: CUDA, bf16/fp16, at most
    MAX_M rows, contiguous rows of ``w`` and ``x``, a contiguous bias of ``w``'s dtype. ``gated``:
    ``x [..., 2K]`` holds ``[gate | up]`` and the product's input is ``silu(gate) * up``."""
    return (ENABLED and triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and w.dtype == x.dtype and w.dim() == 2 and w.is_contiguous() and x.stride(-1) == 1
            and x.numel() // x.shape[-1] <= MAX_M
            and x.shape[-1] == w.shape[1] * (2 if gated else 1) and w.shape[1] % 8 == 0
            and (b is None or (b.dtype == w.dtype and b.shape == (w.shape[0],) and b.is_contiguous())))


def pdl(x: torch.Tensor) -> bool:
    """Launch kernels on ``x``'s device with programmatic dependent launch (``PDL``, compute capability 9+)."""
    return PDL and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def launch(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int] | None = None,
           gated: bool = False, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ w[N, K]^T (+ b [N])`` -> ``[M, N]`` in ``x``'s dtype; ``gated``:
    ``silu(x[:, :K]) * x[:, K:]`` (``x [M, 2K]``) in place of ``x``. ``config`` ``(BLOCK_N, BLOCK_K,
    warps)`` pins the tile (benchmarks, tests); None lets the autotuner choose."""
    M, K = x.shape[0], w.shape[1]
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    MB = triton.next_power_of_2(M)
    args = (x, w, y, y, M, N, K, x.stride(0), y.stride(0), MB, False)  # no scale
    gdc = pdl(x)
    flags = dict(USE_GDC=gdc, GATED=gated, BIAS=b if b is not None else y, HAS_BIAS=b is not None, launch_pdl=gdc)
    if config is None:
        _tuned[lambda c: (triton.cdiv(N, c["BLOCK_N"]),)](*args, **flags)
    else:
        bn, bk, warps = config
        _gemv[(triton.cdiv(N, bn),)](*args, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **flags)
    return y


@torch.library.custom_op("shiftplan::gemv", mutates_args=())
def gemv(x: torch.Tensor, w: torch.Tensor, gated: bool = False, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ w[N, K]^T (+ b)`` for ``M <= MAX_M``; ``gated``: of ``silu(gate) * up`` for ``x =
    [gate | up]`` (see the module doc)."""
    return launch(x, w, gated=gated, b=b)


@gemv.register_fake
def _(x: torch.Tensor, w: torch.Tensor, gated: bool = False, b: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


if triton is not None:

    @triton.jit
    def _gemv(X, W, S, Y, M, N, K, stride_xm, stride_ym, M_BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr = False,
              GATED: tl.constexpr = False, BIAS=None, HAS_BIAS: tl.constexpr = False):
        """``y = (x W^T) [* S] [+ BIAS]``: ``W`` in any dtype widened to fp32 (bf16/fp16, or e4m3 with its
        per-row scale ``S [N]``, ``executors.fp8_gemm``), ``BIAS [N]`` added in fp32 when
        ``HAS_BIAS``; ``GATED``: ``x = silu(g) * u`` with ``g =
        X[:, :K]``, ``u = X[:, K:]`` (the MLP's gate/up, in fp32). ``USE_GDC`` (a programmatic
        dependent launch): wait for the previous kernel before reading ``x``, and let the next one
        launch once the products are summed."""
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, M_BLOCK)
        nmask, mmask = n < N, m < M
        acc = tl.zeros([M_BLOCK, BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            w = tl.load(W + n[:, None].to(tl.int64) * K + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            xmask = mmask[:, None] & kmask[None, :]
            x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=xmask, other=0.0).to(tl.float32)
            if GATED:
                u = tl.load(X + m[:, None] * stride_xm + K + k[None, :], mask=xmask, other=0.0).to(tl.float32)
                x = x * tl.sigmoid(x) * u
            acc += x[:, None, :] * w[None, :, :].to(tl.float32)
        y = tl.sum(acc, axis=2)  # [M_BLOCK, BLOCK_N]
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()
        if HAS_SCALE:
            y = y * tl.load(S + n, mask=nmask, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + m[:, None] * stride_ym + n[None, :], y.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    def fits(configs: list, nargs: dict, **_kw) -> list:
        """Tiles whose fp32 accumulator stays within 128 registers a thread."""
        m = nargs["M_BLOCK"]
        ok = [c for c in configs if m * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 128 * 32 * c.num_warps]
        return ok or configs[:1]

    _tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn, bk, w in CONFIGS],
        key=["N", "K", "M_BLOCK"], prune_configs_by={"early_config_prune": fits},
    )(_gemv)
