"""Micro-benchmarks that calibrate the cost model on the GPU this process finds.

    raw = run_calibration(grids, device)        # timings (torch; GPU, or CPU for a dry run)
    profile = fit_profile(raw, ...)             # costmodels.fit, no torch

What is timed (bf16, CUDA-graph replays, median of rounds; see ``gpu_bench.Timer``):

* GEMMs ``x[M, K] @ W[N, K]^T`` (``F.linear``, the call of an HF Linear) on an (M, N, K) grid;
  weights rotate over enough copies to defeat the L2 cache, as in a real step;
* FP8-weight GEMMs on the same grid, each the call ``executors.quant.linear`` makes for that M
  (the Triton W8A16 kernel at decode sizes, ``torch._scaled_mm`` above), on FP8 GPUs (``_fp8_gemms``);
* prefill attention over packed sequences (B sequences of L tokens, causal; and full
  attention for vision, at several head counts) through ``gpu_bench.PackedAttention``;
* decode attention, B queries against caches of C tokens (``gpu_bench.decode_attention``), and
  the same through the engine's paged decode kernel at several KV head counts
  (``run_decode_engine``: what its CUDA graphs replay);
* memory-bound ops as HF implements them (RMSNorm, LayerNorm, SiLU*mul, QuickGELU, RoPE,
  vision RoPE, residual add, embedding lookup) over a range of sizes;
* the launch gap (a tiny kernel replayed many times in a graph), a large device copy and a
  large GEMM (the two ceilings); NCCL collectives when more than one GPU is visible.

Grid shapes are deliberately not the shapes of the models the accuracy benchmark validates on.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from plans.errors import UserError


@dataclass
class Grids:
    gemm_m: list[int]
    gemm_nk: list[int]
    bias_nk: list[int] = field(default_factory=list)  # (N, K) of the linear-with-bias benchmarks
    attn_heads: tuple[int, int, int] = (40, 8, 128)  # heads, kv heads, head dim (text)
    attn_L: list[int] = field(default_factory=list)
    attn_B: list[int] = field(default_factory=list)
    attn_max_tokens: int = 65536
    full_heads: tuple[int, int] = (20, 80)  # vision-like: heads, head dim
    # further head counts of full attention at that head dim (a heads axis of the table): a
    # flash kernel runs ceil(L/block) x heads tiles per sequence, so its efficiency at one
    # L depends on the head count (few heads leave SMs idle; wave quantisation)
    full_more_heads: list[int] = field(default_factory=list)
    full_L: list[int] = field(default_factory=list)
    full_B: list[int] = field(default_factory=list)
    dec_B: list[int] = field(default_factory=list)
    dec_C: list[int] = field(default_factory=list)
    dec_max_tokens: int = 3_000_000
    dec_kv_heads: list[int] = field(default_factory=lambda: [8])  # KV heads per GPU of the engine kernel's points
    # the engine's paged prefill kernel (``run_prefill_engine``): B sequences of L new tokens each, at most
    # pre_max_tokens in all; at each KV head count of dec_kv_heads and each query-head group of pre_groups
    # (powers of two: the kernel pads a group to one)
    pre_L: list[int] = field(default_factory=list)
    pre_B: list[int] = field(default_factory=list)
    pre_max_tokens: int = 4096
    pre_groups: list[int] = field(default_factory=lambda: [8])
    mem_T: list[int] = field(default_factory=list)
    widths: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def full() -> "Grids":
        m = sorted({2 ** i for i in range(16)} | {3 * 2 ** i for i in range(14)})
        return Grids(gemm_m=m, gemm_nk=[768, 1152, 1536, 2304, 3072, 4608, 6144, 9216, 12288, 18432, 24576],
                     bias_nk=[1152, 4608, 18432],
                     attn_L=[16, 48, 96, 192, 384, 768, 1536, 3072, 6144, 12288, 24576],
                     attn_B=[1, 2, 4, 8, 16, 32],
                     full_L=[64, 110, 192, 332, 576, 1000, 1728, 3000, 5184, 9000, 15552, 27000], full_B=[1, 2, 4, 8, 16],
                     full_more_heads=[6, 12],
                     dec_B=[1, 3, 6, 12, 24, 48, 96, 192, 384], dec_C=[96, 192, 384, 768, 1536, 3072, 6144, 12288, 24576],
                     dec_kv_heads=[8, 4, 2, 1], mem_T=[2 ** i for i in range(17)], widths=_WIDTHS,
                     pre_L=[16, 32, 64, 128, 256, 512, 1024, 2048], pre_B=[1, 2, 4, 8, 16, 32],
                     pre_groups=[1, 4, 8])

    @staticmethod
    def quick() -> "Grids":
        return Grids(gemm_m=[1, 4, 16, 64, 256, 1024, 4096, 16384], gemm_nk=[1536, 6144, 24576], bias_nk=[6144],
                     attn_L=[48, 384, 3072, 24576], attn_B=[1, 4, 16],
                     full_L=[192, 1728, 15552], full_B=[1, 4],
                     dec_B=[1, 12, 96, 384], dec_C=[192, 1536, 12288],
                     mem_T=[1, 16, 256, 4096, 65536], widths=_WIDTHS)

    @staticmethod
    def cpu_dry_run() -> "Grids":
        """Tiny shapes so the whole path runs on a CPU in seconds (the numbers mean nothing)."""
        return Grids(gemm_m=[1, 8, 64], gemm_nk=[64, 256], bias_nk=[64, 256], attn_heads=(4, 2, 16), attn_L=[16, 64], attn_B=[1, 2],
                     full_heads=(4, 16), full_more_heads=[2], full_L=[16, 64], full_B=[1, 2], dec_B=[1, 4], dec_C=[32, 128],
                     pre_L=[16, 64], pre_B=[1, 2], pre_groups=[1, 2],
                     mem_T=[1, 32, 256], widths={k: max(32, v // 64) for k, v in _WIDTHS.items()})


# widths of the memory-op benchmarks (elements per token), off the validated models' sizes
_WIDTHS = {"rmsnorm": 5120, "layernorm": 1536, "silu_mul": 12288, "quick_gelu": 6144, "add": 5120,
           "embedding": 5120, "rope": 48, "rope_vision": 20}  # rope: heads (+kv) of head_dim 128 / 80


def _device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    return None


def find_gpu_name(device_name: str) -> str | None:
    """Catalog name of a torch device name ('NVIDIA H100 80GB HBM3' -> 'h100')."""
    d = device_name.lower()
    for key, name in (("h200", "h200"), ("h100", "h100"), ("a100", "a100-80g"), ("b200", "b200"),
                      ("mi300x", "mi300x"), ("mi325", "mi325x"), ("mi355", "mi355x"), ("l40s", "l40s")):
        if key in d:
            return name
    return None


def fp8_supported(dev) -> bool:
    """FP8 tensor-core GEMMs (``torch._scaled_mm``, e4m3): CUDA compute capability 8.9 or newer."""
    import torch

    return (dev.type == "cuda" and hasattr(torch, "_scaled_mm") and hasattr(torch, "float8_e4m3fn")
            and torch.cuda.get_device_capability(dev) >= (8, 9))


FP8_KERNELS = ("engine", "tensor")  # whose FP8 GEMMs a calibration times (``_fp8_gemms``)


def _fp8_gemms(grids: "Grids", dev, timer, gen, out_of_time, skipped: list, max_m: int | None = None,
               shard: tuple[int, int] = (0, 1), kernel: str = "engine") -> list[dict]:
    """FP8 GEMM points on the bf16 grid (rows up to ``max_m`` when given; with ``shard = (i, n)`` the
    grid's ``(N, K)`` pairs ``i, i + n, i + 2n, ...`` of its timing order, so ``n`` GPUs, one process
    each, measure the grid between them), each the call
    ``executors.quant.linear`` makes for an ``Fp8Weight`` w [N, K] (e4m3, per-row fp32 scales) and
    bf16 x [M, K]: the Triton W8A16 kernel (``executors.fp8_gemm``) for M <= its MAX_M, above that x
    quantized per row and ``torch._scaled_mm`` (``quant.w8a8_rowwise``, the quantization timed too).
    Each point records the kernel that ran (``quant.kernel_for``: "triton_w8a16",
    "scaled_mm_rowwise"). Every M runs as it is (neither path needs M aligned). A Triton kernel is
    autotuned for its shape by one call before it is timed. With ``kernel="tensor"`` each point is
    instead ``torch._scaled_mm`` of e4m3 x and w with one fp32 scale each (cuBLASLt's FP8 GEMM, the
    per-tensor recipe TensorRT-LLM serves FP8 checkpoints with; x already in e4m3, as its previous
    op writes it), kernel "scaled_mm_tensor". Weights rotate over copies to defeat
    the L2 cache, as for bf16. On a device without FP8 tensor cores, or when a call fails, the
    reason goes to ``skipped`` (the profile then has no ``gemm_fp8`` table, or the points measured
    before the failure)."""
    import torch

    if not fp8_supported(dev):
        skipped.append(f"gemm_fp8 (no FP8 tensor cores on this device: {dev.type}"
                       + (f", compute capability {torch.cuda.get_device_capability(dev)})" if dev.type == "cuda" else ")"))
        return []
    from executors import quant

    ms_of = sorted(m for m in set(grids.gemm_m) if max_m is None or m <= max_m)
    pts: list[dict] = []
    nk = grids.gemm_nk
    # every other (N, K) first: a run cut short by its budget leaves interior cells, which the fit
    # fills from their measured neighbours, instead of the whole large-N end of the grid
    pairs = sorted(((i, j) for i in range(len(nk)) for j in range(len(nk))), key=lambda p: (p[0] % 2 or p[1] % 2, p))
    pairs = pairs[shard[0]::shard[1]]
    cut = 0
    try:
        for n, k in ((nk[i], nk[j]) for i, j in pairs):
            if out_of_time():
                cut += len(ms_of)
                continue
            copies = max(1, min(64, math.ceil(256e6 / (n * k))))
            if kernel == "tensor":
                got = _fp8_tensor_points(n, k, ms_of, copies, dev, timer, gen, out_of_time)
                pts, cut = pts + got, cut + len(ms_of) - len(got)
                continue
            ws = [quant.quantize(torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen)) for _ in range(copies)]
            for m in ms_of:
                if out_of_time():
                    cut += 1
                    continue
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
                quant.linear(x, ws[0])  # autotunes a Triton kernel for this shape, outside the timed graph
                state = {"i": 0}

                def f(x=x, ws=ws, state=state) -> object:
                    state["i"] = (state["i"] + 1) % len(ws)
                    return quant.linear(x, ws[state["i"]])
                pts.append({"m": m, "n": n, "k": k, "ms": timer(f), "kernel": quant.kernel_for(x, ws[0])})
            del ws
    except Exception as e:  # noqa: BLE001 -- an unsupported call: keep what was measured, say why
        skipped.append(f"gemm_fp8 stopped after {len(pts)} points: {type(e).__name__}: {e}"[:400])
    if cut:
        skipped.append(f"gemm_fp8: {cut} of {cut + len(pts)} points (time budget)")
    return pts


def _fp8_tensor_points(n: int, k: int, ms_of: list[int], copies: int, dev, timer, gen, out_of_time) -> list[dict]:
    """``torch._scaled_mm`` points of w [n, k] (e4m3, rotated over ``copies``) for each M of
    ``ms_of``: x [M, k] e4m3, per-tensor fp32 scales, bf16 out (``_fp8_gemms``, ``kernel="tensor"``)."""
    import torch

    e4m3 = torch.float8_e4m3fn
    one = torch.ones((), device=dev, dtype=torch.float32)
    ws = [(torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) / 4).to(e4m3) for _ in range(copies)]
    out = []
    for m in ms_of:
        if out_of_time():
            continue
        x = (torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen) / 4).to(e4m3)
        state = {"i": 0}

        def f(x=x, state=state) -> object:
            state["i"] = (state["i"] + 1) % len(ws)
            return torch._scaled_mm(x, ws[state["i"]].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        out.append({"m": m, "n": n, "k": k, "ms": timer(f), "kernel": "scaled_mm_tensor"})
    return out


def run_calibration(grids: Grids, *, cpu_dry_run: bool = False, budget_s: float = 1e9,
                    log: Callable[[str], None] = print, checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Time every micro-benchmark of ``grids``; returns the raw points (see ``costmodels.fit``).

    Raises UserError when no GPU is visible (unless ``cpu_dry_run``)."""
    import torch

    from costmodels.gpu_bench import Timer, make_packed_attention

    dev = _device()
    if dev is None:
        if not cpu_dry_run:
            raise UserError("plan calibrate needs a CUDA GPU and torch.cuda sees none "
                            "(torch.cuda.is_available() is False); run it on the GPU machine")
        dev = torch.device("cpu")
    t_start = time.time()
    timer = Timer(dev)
    dt = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    raw: dict[str, Any] = {"gemm": [], "attn_causal": [], "attn_full": [], "attn_decode": [], "memops": {},
                           "skipped": []}
    attn = make_packed_attention(dev)
    raw["attention_kernel"] = attn.kernel
    raw["attention_fallback"] = attn.fallback_reason

    def out_of_time() -> bool:
        return time.time() - t_start > budget_s

    def rnd(*shape: int) -> "torch.Tensor":
        return torch.randn(*shape, device=dev, dtype=dt, generator=gen)

    # launch gap and ceilings
    x1 = torch.zeros(1, device=dev)
    raw["overhead_us"] = timer(lambda: x1.add_(1.0)) * 1e3
    # GEMMs
    F = torch.nn.functional
    for n in grids.gemm_nk:
        for k in grids.gemm_nk:
            wbytes = n * k * 2
            copies = max(1, min(64, math.ceil(256e6 / wbytes))) if dev.type == "cuda" else 1
            ws = [rnd(n, k) for _ in range(copies)]
            for m in grids.gemm_m:
                if out_of_time():
                    raw["skipped"].append(f"gemm {m}x{n}x{k} (time budget)")
                    continue
                x = rnd(m, k)
                state = {"i": 0}

                def f(x=x, ws=ws, state=state) -> object:
                    state["i"] = (state["i"] + 1) % len(ws)
                    return F.linear(x, ws[state["i"]])
                raw["gemm"].append({"m": m, "n": n, "k": k, "ms": timer(f)})
            del ws
        if checkpoint:
            checkpoint(raw)
    raw["gemm_fp8"] = _fp8_gemms(grids, dev, timer, gen, out_of_time, raw["skipped"])
    raw["gemm_bias"] = []
    for n in grids.bias_nk:
        for k in grids.bias_nk:
            w, bias = rnd(n, k), rnd(n)
            for m in grids.gemm_m:
                if out_of_time():
                    break
                x = rnd(m, k)
                raw["gemm_bias"].append({"m": m, "n": n, "k": k, "ms": timer(lambda: F.linear(x, w, bias)),
                                         "ms_nobias": timer(lambda: F.linear(x, w))})
    log(f"gemm: {len(raw['gemm'])} points, {len(raw['gemm_bias'])} with bias, {time.time() - t_start:.0f} s")
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # prefill attention, causal (text) and full (vision): B packed sequences of L tokens
    def prefill_attention(key: str, heads: int, kv_heads: int, head_dim: int, Ls, Bs, causal: bool) -> None:
        for L in Ls:
            for B in Bs:
                if L * B > grids.attn_max_tokens or out_of_time():
                    continue
                T = L * B
                q, k_, v = rnd(T, heads, head_dim), rnd(T, kv_heads, head_dim), rnd(T, kv_heads, head_dim)
                ms = timer(lambda: attn(q, k_, v, [L] * B, causal))
                raw[key].append({"L": L, "B": B, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "ms": ms})

    H, G, D = grids.attn_heads
    prefill_attention("attn_causal", H, G, D, grids.attn_L, grids.attn_B, True)
    FH0, FD = grids.full_heads
    for FH in [FH0] + [h for h in grids.full_more_heads if h != FH0]:
        prefill_attention("attn_full", FH, FH, FD, grids.full_L, grids.full_B, False)
    log(f"prefill attention: {len(raw['attn_causal'])} + {len(raw['attn_full'])} points, {time.time() - t_start:.0f} s")
    if checkpoint:
        checkpoint(raw)

    # decode attention
    from costmodels.gpu_bench import decode_attention

    for B in grids.dec_B:
        for C in grids.dec_C:
            if B * C > grids.dec_max_tokens or out_of_time():
                continue
            q, kc, vc = rnd(B, H, 1, D), rnd(B, G, C, D), rnd(B, G, C, D)
            ms = timer(lambda: decode_attention(q, kc, vc))
            raw["attn_decode"].append({"B": B, "C": C, "heads": H, "kv_heads": G, "head_dim": D, "ms": ms})
            del kc, vc
    log(f"decode attention: {len(raw['attn_decode'])} points, {time.time() - t_start:.0f} s")
    if dev.type == "cuda":
        raw["attn_decode_engine"] = run_decode_engine(grids, timer, out_of_time)
        log(f"engine decode attention: {len(raw['attn_decode_engine'])} points, {time.time() - t_start:.0f} s")
        raw["attn_prefill_engine"] = run_prefill_engine(grids, timer, out_of_time)
        log(f"engine prefill attention: {len(raw['attn_prefill_engine'])} points, {time.time() - t_start:.0f} s")
    if checkpoint:
        checkpoint(raw)

    # memory-bound ops, HF implementations
    for name, fn_of in _memops(grids, dev, dt, gen).items():
        pts = []
        for T in grids.mem_T:
            if out_of_time():
                break
            fn, elements = fn_of(T)
            pts.append({"T": T, "elements": elements, "ms": timer(fn)})
        raw["memops"][name] = pts
    log(f"memory ops: {sum(len(v) for v in raw['memops'].values())} points, {time.time() - t_start:.0f} s")
    _ceilings(raw, timer, rnd, dev)
    log(f"overhead {raw['overhead_us']:.2f} us, copy {raw['copy_tbps']:.2f} TB/s, matmul {raw['matmul_tflops']:.0f} TFLOP/s")
    raw["seconds"] = time.time() - t_start
    raw["graph_capture_failures"] = timer.graph_failures
    if dev.type == "cuda" and torch.cuda.device_count() > 1 and not out_of_time():
        raw.update(run_collectives(deadline_s=max(60.0, budget_s - (time.time() - t_start))))
        log(f"collectives: {len(raw['collectives'])} points over {torch.cuda.device_count()} GPUs, "
            f"{len(raw['collectives_errors'])} errors")
    return raw


def run_collectives(world: int | None = None, sizes: list[int] | None = None, *, backend: str = "nccl",
                    deadline_s: float = 120.0, reps: int = 10) -> dict[str, Any]:
    """All collectives and p2p, graph-captured and eager, by size and group size over ``world``
    ranks (default: every visible GPU): raw ``collectives`` points, ``collectives_errors`` and
    ``collectives_meta`` (what ``costmodels.fit.profile_collectives`` stores with the tables)."""
    import torch

    from costmodels.calib_collectives import ALL_OPS, bench_collectives, default_sizes, group_sizes

    world = world or torch.cuda.device_count()
    sizes = sizes or default_sizes()
    errors: list[dict] = []
    t0 = time.time()
    pts = bench_collectives(world, sizes, backend=backend, reps=reps, ops=ALL_OPS,
                            modes=("graph", "eager") if backend == "nccl" else ("eager",),
                            deadline_s=deadline_s, errors=errors)
    meta = {k: v for k, v in device_meta().items() if k in ("device_name", "driver", "torch", "cuda", "date")}
    meta.update(backend=backend, world=world, sizes=sizes, seconds=round(time.time() - t0, 1),
                group_sizes_tried=group_sizes(world))
    return {"collectives": pts, "collectives_errors": errors, "collectives_meta": meta}


def run_decode_engine(grids: Grids, timer: Callable[[Callable[[], object]], float],
                      out_of_time: Callable[[], bool] = lambda: False) -> list[dict[str, Any]]:
    """The engine's paged decode kernel (``executors.paged_decode.paged_decode``, block size 16) on
    the decode grid: B sequences of C cached keys each (blocks in order), for each KV head count of
    ``grids.dec_kv_heads`` with the grid's query heads per KV head; points {B, C, heads, kv_heads,
    head_dim, ms, kernel}; none where the kernel does not serve this device (no Triton)."""
    import torch

    from executors import paged_decode

    H, G, D = grids.attn_heads
    per_kv, bs, dt = max(1, H // G), 16, torch.bfloat16
    q0 = torch.zeros(1, per_kv, D, device="cuda", dtype=dt)
    if not paged_decode.available(q0, torch.zeros(1, 1, D, device="cuda", dtype=dt), None):
        return []
    pts = []
    for hkv in grids.dec_kv_heads:
        for B in grids.dec_B:
            for C in grids.dec_C:
                if B * C * hkv > grids.dec_max_tokens * G or out_of_time():
                    continue
                nb = -(-C // bs)
                k = torch.randn(B * nb * bs + 1, hkv, D, device="cuda", dtype=dt)
                v = torch.randn_like(k)
                q = torch.randn(B, hkv * per_kv, D, device="cuda", dtype=dt)
                table = torch.arange(B * nb, device="cuda", dtype=torch.int32).reshape(B, nb)
                lens = torch.full((B,), C, device="cuda", dtype=torch.int32)
                ms = timer(lambda: paged_decode.paged_decode(q, k, v, table, lens, bs))
                pts.append({"B": B, "C": C, "heads": hkv * per_kv, "kv_heads": hkv, "head_dim": D, "ms": ms,
                            "kernel": "paged_decode"})
                del k, v
    return pts


def run_prefill_engine(grids: Grids, timer: Callable[[Callable[[], object]], float],
                       out_of_time: Callable[[], bool] = lambda: False) -> list[dict[str, Any]]:
    """The engine's paged prefill kernel (``executors.paged_prefill.paged_prefill``, block size 16),
    the kernel every prefill and mixed step the engine replays as a CUDA graph runs, for each KV head
    count of ``grids.dec_kv_heads`` and query-head group of ``grids.pre_groups``: B sequences of L new
    tokens each (no cached keys), ``L x B <= pre_max_tokens`` (``kind: prefill``; a graphed mixed step's
    decodes run the decode kernel, ``run_decode_engine``). Each sequence's block table is as wide as a
    step graph's (``plans.engine_shapes.keys_bucket`` of its
    keys), so the kernel splits its keys into the ranges it does in a graph. Points {kind, L, B, C,
    heads, kv_heads, head_dim, ms, kernel}; none where the kernel does not serve this device."""
    import torch

    from costmodels.gpu_bench import paged_prefill_case
    from executors import paged_prefill

    D, bs, dt = grids.attn_heads[2], 16, torch.bfloat16
    if not paged_prefill.supported(dt, dt, torch.device("cuda"), False):
        return []
    cases = [(L, B) for L in grids.pre_L for B in grids.pre_B if L * B <= grids.pre_max_tokens]
    pts = []
    for hkv in grids.dec_kv_heads:
        for group in grids.pre_groups:
            for L, B in cases:
                if out_of_time():
                    return pts
                x = paged_prefill_case(B, L, L, hkv * group, hkv, D, paged_prefill.BLOCK_M, bs)
                ms = timer(lambda: paged_prefill.paged_prefill(*x, bs))
                pts.append({"kind": "prefill", "L": L, "B": B, "C": L, "heads": hkv * group, "kv_heads": hkv,
                            "head_dim": D, "ms": ms, "kernel": "paged_prefill"})
                del x
    return pts


def run_engine_kernels(grids: Grids | None = None) -> dict[str, Any]:
    """``run_decode_engine`` and ``run_prefill_engine`` alone on this GPU (default ``Grids.full()``),
    as a file ``costmodels.merge`` takes: {meta, overhead_us, attn_decode_engine, attn_prefill_engine,
    skipped, seconds}."""
    import torch

    from costmodels.gpu_bench import Timer

    t_start = time.time()
    dev = _device()
    if dev is None:
        raise UserError("the engine's attention kernels need a CUDA GPU and torch.cuda sees none")
    grids = grids or Grids.full()
    timer = Timer(dev)
    x1 = torch.zeros(1, device=dev)
    dec, pre = run_decode_engine(grids, timer), run_prefill_engine(grids, timer)
    return {"meta": device_meta(), "overhead_us": timer(lambda: x1.add_(1.0)) * 1e3, "attn_decode_engine": dec,
            "attn_prefill_engine": pre,
            "skipped": [] if dec and pre else ["engine attention (the paged kernels do not serve this device)"],
            "seconds": time.time() - t_start}


def run_comm_fp8(budget_s: float = 170.0, grids: Grids | None = None, log: Callable[[str], None] = print,
                 collectives_s: float = 90.0, fp8_only: bool = False, max_m: int | None = None,
                 shard: tuple[int, int] = (0, 1), fp8_kernel: str = "engine") -> dict[str, Any]:
    """The multi-GPU part of a calibration, bounded in time: collective tables (``run_collectives``,
    at most ``collectives_s`` seconds; none with fewer than two GPUs, or with ``fp8_only``) and then
    FP8 GEMMs on the bf16 GEMM grid of ``grids`` (default ``Grids.full()``; rows up to ``max_m`` when
    given; the ``shard`` of its pairs; ``fp8_kernel``: the engine's calls, or "tensor" for per-tensor
    ``torch._scaled_mm``, ``_fp8_gemms``) until ``budget_s`` is spent. Returns {meta, overhead_us,
    collectives..., gemm_fp8 (or gemm_fp8_tensor), skipped,
    seconds}; merge it into a profile with ``costmodels.merge`` (FP8 points replace the profile's of
    the same (m, n, k), the others stay)."""
    import torch

    from costmodels.gpu_bench import Timer

    t_start = time.time()
    grids = grids or Grids.full()
    raw: dict[str, Any] = {"meta": device_meta(), "skipped": []}
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if fp8_only:
        raw["skipped"].append("collectives (--fp8-only)")
    elif n_gpu > 1:
        try:
            raw.update(run_collectives(n_gpu, deadline_s=min(collectives_s, budget_s)))
        except Exception as e:  # noqa: BLE001 -- the FP8 part still runs
            raw["collectives_errors"] = [{"error": f"{type(e).__name__}: {e}"[:500]}]
        log(f"collectives: {len(raw.get('collectives', []))} points, {len(raw.get('collectives_errors', []))} "
            f"errors, {time.time() - t_start:.0f} s")
    else:
        raw["skipped"].append(f"collectives ({n_gpu} GPU visible; they need 2 or more)")
    dev = _device() or torch.device("cpu")
    timer = Timer(dev)
    if dev.type == "cuda":
        x1 = torch.zeros(1, device=dev)
        raw["overhead_us"] = timer(lambda: x1.add_(1.0)) * 1e3
    gen = torch.Generator(device=dev).manual_seed(0)
    key = "gemm_fp8" if fp8_kernel == "engine" else "gemm_fp8_tensor"
    raw[key] = _fp8_gemms(grids, dev, timer, gen, lambda: time.time() - t_start > budget_s, raw["skipped"],
                          max_m=max_m, shard=shard, kernel=fp8_kernel)
    if shard != (0, 1):
        raw["gemm_fp8_shard"] = list(shard)
    if max_m is not None:
        raw["gemm_fp8_max_m"] = max_m
    log(f"{key}: {len(raw[key])} points, {time.time() - t_start:.0f} s")
    raw["seconds"] = round(time.time() - t_start, 1)
    return raw


def _ceilings(raw: dict, timer, rnd, dev) -> None:
    """The two ceilings, measured after the grid (clocks warm): device copy and a large GEMM."""
    big = rnd(1 << (28 if dev.type == "cuda" else 16))
    dst = big.clone()
    ms = timer(lambda: dst.copy_(big))
    raw["copy_tbps"] = 2 * big.numel() * 2 / (ms * 1e-3) / 1e12
    s = 8192 if dev.type == "cuda" else 256
    a, b = rnd(s, s), rnd(s, s)
    ms = timer(lambda: a @ b)
    raw["matmul_tflops"] = 2 * s ** 3 / (ms * 1e-3) / 1e12


def _memops(grids: Grids, dev, dt, gen) -> dict[str, Callable[[int], tuple[Callable[[], object], int]]]:
    """name -> (T -> (fn, elements written)) for each memory-bound op, as HF implements it."""
    import torch
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    W = grids.widths

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt, generator=gen)

    def rmsnorm(T: int):
        mod = LlamaRMSNorm(W["rmsnorm"]).to(dev, dt)
        x = rnd(1, T, W["rmsnorm"])
        return (lambda: mod(x)), T * W["rmsnorm"]

    def layernorm(T: int):
        mod = torch.nn.LayerNorm(W["layernorm"], eps=1e-6).to(dev, dt)
        x = rnd(T, W["layernorm"])
        return (lambda: mod(x)), T * W["layernorm"]

    def silu_mul(T: int):
        act = ACT2FN["silu"]
        g, u = rnd(1, T, W["silu_mul"]), rnd(1, T, W["silu_mul"])
        return (lambda: act(g) * u), T * W["silu_mul"]

    def quick_gelu(T: int):
        act = ACT2FN["quick_gelu"]
        x = rnd(T, W["quick_gelu"])
        return (lambda: act(x)), T * W["quick_gelu"]

    def add(T: int):
        a, b = rnd(1, T, W["add"]), rnd(1, T, W["add"])
        return (lambda: a + b), T * W["add"]

    def embedding(T: int):
        table = rnd(32000, W["embedding"])
        ids = torch.randint(0, 32000, (1, T), device=dev, generator=gen)
        return (lambda: torch.nn.functional.embedding(ids, table)), T * W["embedding"]

    def rope(T: int):
        H, G = W["rope"] * 5 // 6, W["rope"] // 6  # 40 + 8 heads of 128 at the default width 48
        d = 128 if dev.type == "cuda" else 16
        qkv_q = rnd(1, T, H * d).view(1, T, H, d).transpose(1, 2)
        qkv_k = rnd(1, T, G * d).view(1, T, G, d).transpose(1, 2)
        cos, sin = rnd(1, T, d), rnd(1, T, d)
        return (lambda: apply_rotary_pos_emb(qkv_q, qkv_k, cos, sin)), T * (H + G) * d

    def rope_vision(T: int):
        H = W["rope_vision"]
        d = 80 if dev.type == "cuda" else 16
        qkv = rnd(T, 3 * H * d).reshape(T, 3, H, d).permute(1, 0, 2, 3).unbind(0)
        cos, sin = rnd(T, d).float(), rnd(T, d).float()  # the model computes its vision RoPE tables in fp32
        return (lambda: apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)), 2 * T * H * d

    return {"rmsnorm": rmsnorm, "layernorm": layernorm, "silu_mul": silu_mul, "quick_gelu": quick_gelu,
            "add": add, "embedding": embedding, "rope": rope, "rope_vision": rope_vision}


def device_meta() -> dict[str, Any]:
    """Device name, driver, torch/CUDA/NCCL/transformers versions and the date."""
    import platform
    import subprocess

    import torch
    import transformers

    meta: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(),
                            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        meta["device_name"] = torch.cuda.get_device_name(0)
        meta["cuda"] = torch.version.cuda
        meta["gpus"] = torch.cuda.device_count()
        try:
            meta["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except (AttributeError, RuntimeError, TypeError):
            meta["nccl"] = "unknown"
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            meta["driver"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
        except (OSError, subprocess.SubprocessError):
            meta["driver"] = "unknown"
    else:
        meta["device_name"] = "cpu"
        meta["driver"] = "none"
    return meta


def calibrate(out: str | Path, *, quick: bool = False, gpu: str | None = None, cpu_dry_run: bool = False,
              budget_s: float = 1e9, log: Callable[[str], None] = print):
    """Run the micro-benchmarks, fit, and write the profile JSON to ``out``. Returns the Profile."""
    from costmodels.fit import fit_profile
    from costmodels.profile import write_profile

    meta = device_meta()
    name = gpu or find_gpu_name(meta["device_name"])
    if name is None:
        if cpu_dry_run:
            name = "cpu"
        else:
            raise UserError(f"no catalog entry for device '{meta['device_name']}'; pass --gpu NAME")
    grids = Grids.cpu_dry_run() if cpu_dry_run else (Grids.quick() if quick else Grids.full())
    out = Path(out)
    partial = out.with_suffix(".partial.json")

    def checkpoint(raw: dict) -> None:
        partial.write_text(json.dumps({"meta": meta, "raw": raw}))

    raw = run_calibration(grids, cpu_dry_run=cpu_dry_run, budget_s=budget_s, log=log, checkpoint=checkpoint)
    meta["grid"] = "cpu-dry-run" if cpu_dry_run else ("quick" if quick else "full")
    prof = fit_profile(raw, gpu=name, profile_id=f"{name}-{meta['date']}", device_name=meta["device_name"], meta=meta)
    write_profile(prof, out)
    if partial.exists():
        partial.unlink()
    return prof
