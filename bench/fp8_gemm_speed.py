"""FP8-weight products at decode batch sizes on one GPU: bf16 ``F.linear``, ``torch._scaled_mm``
(rowwise and tensorwise, activation quantization included) and the Triton kernels
(``executors.fp8_gemm``: W8A16, and W8A8 from ``executors.fp8_w8a8``), each against its floor.

Shapes (N x K of ``y [M, N] = x [M, K] @ W^T``): the projections of a 70B Llama (Llama-3.1-70B and
Llama-2-70B have the same ones: hidden 8192, 64 query / 8 KV heads of 128, MLP 28672) sharded over
TP8, TP4 and TP2 (``qkv`` and ``gate_up`` split by rows, ``o`` and ``down`` by columns),
Llama-3.1-405B's under TP8 (hidden 16384, 128 query / 8 KV heads of 128, MLP 53248) and
Llama-3.1-8B's on one GPU; M = 1, 2, 4, ..., 1024 rows. Per point:

* ``bf16``: ``F.linear(x, W)`` with ``W`` in bf16 (``2 N K`` weight bytes);
* ``rowwise``: ``executors.quant.w8a8_rowwise``, the engine's call above ``fp8_gemm.MAX_M`` rows (x
  quantized per row, then ``torch._scaled_mm`` with ``[M, 1]`` and ``[1, N]`` scales; and with
  ``SHIFTPLAN_FP8_W8A8=0`` above ``fp8_gemm.W8A16_MAX_M``);
* ``tensorwise``: x quantized per tensor, ``torch._scaled_mm`` with scalar scales (one weight scale:
  the weight quantized per tensor);
* ``triton``: ``executors.fp8_gemm.launch`` (autotuned; the kernel ``fp8_gemm`` picks for M: W8A16 up
  to ``W8A16_MAX_M`` rows, W8A8 above), and for M <= GEMV_MAX_M also the tensor-core tiling
  (``triton_mma``), to place the switch between them;
* ``w8a8_fused`` / ``w8a8_prequant`` (M > GEMV_MAX_M): the W8A8 kernel (``executors.fp8_w8a8.launch``,
  autotuned) with x quantized in the product's loads / by the row-scale kernel first (the engine
  fuses up to ``fp8_w8a8.FUSE_MAX_M`` rows), to place the switches W8A16 -> W8A8 -> ``_scaled_mm``
  and fused -> prequantized.

Floors: the larger of the weight bytes (``2 N K`` for bf16, ``N K`` for the FP8 methods) over the
copy bandwidth measured in the same run (``bench.engine_speed.ceilings``) and the FLOPs ``2 M N K``
over the dense tensor-core peak (``--peak-tflops``, bf16 and FP8: 989 and 1979 TFLOP/s, an
H100/H200 SXM's); ``x floor`` is time / floor; TFLOP/s = ``2 M N K`` / time. Times are GPU times of
calls replayed in a CUDA graph, each after an L2 flush (``bench.common.graphed_us``: as a decode
step's graph meets each weight cold, without the host's launch time; the earlier results timed
each call with ``triton.testing.do_bench``'s events, which count a host launch that outlasts the
flush before it: ``bench/results/fp8_gemm_speed.w8a8.md``).
The kernels' and ``rowwise``'s results are checked against ``x @ (q * scale)^T`` in fp32 (``rel_err``:
max abs error / max abs reference; the W8A8 kernel and ``rowwise`` quantize x to e4m3, ~2-4e-2, the
W8A16 kernel only rounds its output, ~3e-3).

    python bench/fp8_gemm_speed.py --out DIR                          # on a CUDA machine (~10 min)
    python bench/fp8_gemm_speed.py --out DIR --shapes 70b/tp8/qkv,8b/o --rows 1,16,64,512
    TRITON_INTERPRET=1 python bench/fp8_gemm_speed.py --out DIR --tiny  # CPU dry run (small shapes, fp16)

Writes DIR/fp8_gemm_speed.json and DIR/fp8_gemm_speed.md (also printed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def llama_shapes(prefix: str, hidden: int, heads: int, kv_heads: int, head_dim: int, mlp: int,
                 tps: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """``{prefix[/tpT]/proj: (N, K)}`` of one decoder layer's four projections under TP degree T."""
    out = {}
    for t in tps:
        tag = f"{prefix}/tp{t}" if t > 1 else prefix
        out.update({f"{tag}/qkv": ((heads + 2 * kv_heads) * head_dim // t, hidden),
                    f"{tag}/o": (hidden, heads * head_dim // t),
                    f"{tag}/gate_up": (2 * mlp // t, hidden), f"{tag}/down": (hidden, mlp // t)})
    return out


SHAPES = {**llama_shapes("70b", 8192, 64, 8, 128, 28672, (8, 4, 2)),
          **llama_shapes("405b", 16384, 128, 8, 128, 53248, (8,)),
          **llama_shapes("8b", 4096, 32, 8, 128, 14336, (1,))}
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TINY = {"tiny/qkv": (48, 64), "tiny/down": (40, 96)}
TINY_ROWS = (1, 3, 17, 40)
METHODS = ("bf16", "rowwise", "tensorwise", "triton", "triton_mma", "w8a8_fused", "w8a8_prequant")
CHECKED = ("rowwise", "triton", "triton_mma", "w8a8_fused", "w8a8_prequant")  # rel_err recorded
PEAK_TFLOPS = (989.0, 1979.0)  # dense bf16, FP8 tensor-core peaks of an H100 / H200 SXM


def w8a8_tensorwise(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` quantized per tensor (``max|x| / 448``) times the per-tensor FP8 weight ``q`` (scalar
    ``scale``): ``torch._scaled_mm`` with scalar scales, out in ``x``'s dtype."""
    from executors.quant import FP8, FP8_MAX

    xs = (x.abs().amax() / FP8_MAX).clamp(min=1e-12).float()
    xq = (x / xs).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale, out_dtype=x.dtype)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rows", default=None, help="comma-separated M (default 1,2,4,...,1024)")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    ap.add_argument("--peak-tflops", default=",".join(f"{p:g}" for p in PEAK_TFLOPS),
                    help="dense bf16,fp8 tensor-core peaks for the FLOP floors (default: an H100/H200 SXM's)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run, small shapes in fp16 (with TRITON_INTERPRET=1)")
    a = ap.parse_args(argv)
    import torch.nn.functional as F

    from bench.common import command_line, write_report
    from bench.engine_speed import ceilings
    from executors import fp8_gemm, fp8_w8a8, quant

    tiny = a.tiny or not torch.cuda.is_available()
    dev = "cpu" if tiny else "cuda"
    dt = torch.float16 if tiny else torch.bfloat16  # the interpreter's tl.dot is wrong for bf16 operands
    shapes = TINY if tiny else SHAPES
    if a.shapes:
        unknown = [s for s in a.shapes.split(",") if s not in shapes]
        if unknown:
            raise SystemExit(f"unknown shapes {unknown}; known: {', '.join(shapes)}")
        shapes = {s: shapes[s] for s in a.shapes.split(",")}
    rows = [int(m) for m in a.rows.split(",")] if a.rows else list(TINY_ROWS if tiny else ROWS)
    bw = _cpu_copy_GBps() if tiny else ceilings(dev)["copy_GBps"]
    peak_bf16, peak_fp8 = (float(p) for p in a.peak_tflops.split(","))
    bench = _cpu_bench if tiny else _gpu_bench()
    report: dict[str, Any] = {"command": command_line("bench/fp8_gemm_speed.py", argv),
                              "device": "cpu (dry run)" if tiny else torch.cuda.get_device_name(),
                              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                              "dtype": str(dt).replace("torch.", ""), "copy_GBps": bw, "max_m": fp8_gemm.MAX_M,
                              "gemv_max_m": fp8_gemm.GEMV_MAX_M, "w8a16_max_m": fp8_gemm.W8A16_MAX_M,
                              "fuse_max_m": fp8_w8a8.FUSE_MAX_M, "peak_tflops": [peak_bf16, peak_fp8],
                              "timing": "host" if tiny else "cuda_graph", "rows": []}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, (N, K) in shapes.items():
        w = torch.randn(N, K, dtype=dt, device=dev, generator=gen) / K ** 0.5
        w8 = quant.quantize(w)
        wt = quant.Fp8Weight(*_per_tensor(w))
        ref_w = w8.dequantize()  # [N, K] fp32
        for M in rows:
            x = torch.randn(M, K, dtype=dt, device=dev, generator=gen)
            ref = x.float() @ ref_w.t()
            calls: dict[str, Callable[[], Any]] = {
                "bf16": lambda: F.linear(x, w),
                "rowwise": lambda: quant.w8a8_rowwise(x, w8),
                "tensorwise": lambda: w8a8_tensorwise(x, wt.q, wt.scale[0]),
                "triton": _kernel(fp8_gemm, x, w8, None, tiny),
            }
            if M <= fp8_gemm.GEMV_MAX_M:
                calls["triton_mma"] = _kernel(fp8_gemm, x, w8, "mma", tiny)
            else:
                calls["w8a8_fused"] = _kernel(fp8_gemm, x, w8, "w8a8_fused", tiny)
                calls["w8a8_prequant"] = _kernel(fp8_gemm, x, w8, "w8a8_prequant", tiny)
            flops = 2 * M * N * K
            row: dict[str, Any] = {"shape": name, "N": N, "K": K, "M": M,
                                   "floor_bf16_us": round(2 * N * K / (bw * 1e9) * 1e6, 2),
                                   "floor_fp8_us": round(N * K / (bw * 1e9) * 1e6, 2),
                                   "floor_bf16_mma_us": round(flops / (peak_bf16 * 1e12) * 1e6, 2),
                                   "floor_fp8_mma_us": round(flops / (peak_fp8 * 1e12) * 1e6, 2)}
            configs: dict[str, str] = {}
            for path in CHECKED:
                if path in calls:
                    try:
                        err = (calls[path]().float() - ref).abs().max() / ref.abs().max()
                        row[f"{path}_rel_err"] = float(f"{float(err):.3g}")
                        if not tiny and path.startswith(("triton", "w8a8")):
                            configs.update(_best_config(fp8_gemm, fp8_w8a8, path, M))
                    except Exception as e:  # noqa: BLE001 -- recorded, the other methods still run
                        row[f"{path}_error"] = f"{type(e).__name__}: {e}"[:300]
            if not tiny:
                row["triton_config"] = configs
            for method, fn in calls.items():
                if f"{method}_error" in row:
                    continue
                try:
                    us = bench(fn)
                except Exception as e:  # noqa: BLE001 -- e.g. _scaled_mm without FP8 tensor cores
                    row[f"{method}_error"] = f"{type(e).__name__}: {e}"[:300]
                    continue
                floor = (max(row["floor_bf16_us"], row["floor_bf16_mma_us"]) if method == "bf16"
                         else max(row["floor_fp8_us"], row["floor_fp8_mma_us"]))
                row[f"{method}_us"] = round(us, 2)
                row[f"{method}_x_floor"] = round(us / floor, 3) if floor == floor and floor > 0 else None
                row[f"{method}_TFLOPs"] = float(f"{2 * M * N * K / (us * 1e-6) / 1e12:.3g}")
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
        del w, w8, wt, ref_w
    write_report(a.out, "fp8_gemm_speed", report, markdown(report), echo=True)
    return report


def _per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as e4m3 with one scale (``max|w| / 448``), the scale repeated per row."""
    from executors.quant import FP8, FP8_MAX

    s = (w.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8), s.expand(w.shape[0]).contiguous()


def _kernel(fp8_gemm: Any, x: torch.Tensor, w: Any, path: str | None, tiny: bool) -> Callable[[], Any]:
    """A Triton kernel on ``x``: ``path`` None (``fp8_gemm``'s choice), "mma" (the W8A16 tensor-core
    tiling), "w8a8_fused" / "w8a8_prequant" (the W8A8 kernel, x quantized in its loads / before);
    autotuned on a GPU; on a CPU (the interpreter cannot autotune) one pinned tile of that tiling."""
    from executors import fp8_w8a8

    M = x.shape[0]
    if path is None:
        path = "gemv" if M <= fp8_gemm.GEMV_MAX_M else "mma" if M <= fp8_gemm.W8A16_MAX_M else "w8a8"
    if path.startswith("w8a8"):
        fused = M <= fp8_w8a8.FUSE_MAX_M if path == "w8a8" else path == "w8a8_fused"
        cfg = (32, 32, 32, 4, 1, 2) if tiny else None  # a K split of two on CPU
        return lambda: fp8_w8a8.launch(x, w.q, w.scale, config=cfg, fused=fused)
    if not tiny:
        return lambda: fp8_gemm.launch(x, w.q, w.scale, path=path)
    cfg = (16, 32, 32, 4, 1) if path == "mma" else (8, 32, 4)
    return lambda: fp8_gemm.launch(x, w.q, w.scale, config=cfg, path=path)


def _best_config(fp8_gemm: Any, fp8_w8a8: Any, method: str, M: int) -> dict[str, str]:
    """The tile the autotuner picked for the last call of ``method`` at ``M`` rows, named by tiling."""
    if method.startswith("w8a8"):
        path = method
    elif method == "triton_mma":
        path = "mma"
    else:
        path = "gemv" if M <= fp8_gemm.GEMV_MAX_M else "mma" if M <= fp8_gemm.W8A16_MAX_M else "w8a8"
        path = f"w8a8_{'fused' if M <= fp8_w8a8.FUSE_MAX_M else 'prequant'}" if path == "w8a8" else path
    tuned = {"gemv": fp8_gemm._gemv_tuned, "mma": fp8_gemm._mma_tuned}.get(path, fp8_w8a8._tuned)
    best = getattr(tuned, "best_config", None)
    return {path: f"{best.kwargs} warps={best.num_warps} stages={best.num_stages}"} if best is not None else {}


def _gpu_bench() -> Callable[[Callable[[], Any]], float]:
    from bench.common import graphed_us

    return graphed_us


def _cpu_bench(fn: Callable[[], Any]) -> float:
    """Median host time of 3 calls after one, in us (dry run: the numbers mean nothing)."""
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    return sorted(ts)[1]


def _cpu_copy_GBps() -> float:
    src = torch.randn(1 << 22)
    dst = torch.empty_like(src)
    us = _cpu_bench(lambda: dst.copy_(src))
    return round(2 * src.numel() * 4 / (us * 1e-6) / 1e9, 1)


def _cell(x: dict[str, Any], method: str) -> str:
    if f"{method}_us" not in x:
        return "err" if f"{method}_error" in x else "-"
    return f"{x[f'{method}_us']} ({x[f'{method}_x_floor']}x, {x[f'{method}_TFLOPs']})"


def markdown(r: dict[str, Any]) -> str:
    pb, pf = r.get("peak_tflops", PEAK_TFLOPS)
    lines = [f"# FP8-weight products at decode batch sizes ({r['device']})", "",
             f"torch {r['torch']} (CUDA {r['cuda']}), Triton {r['triton']}, Python {r['python']}, activations "
             f"{r['dtype']}. Command: `{r['command']}`. Copy bandwidth measured in the run: {r['copy_GBps']} GB/s; "
             "floor = the larger of weight bytes (2 N K bf16, N K fp8) / that and 2 M N K / the dense peak "
             f"({pb:g} bf16, {pf:g} fp8 TFLOP/s). Cells: us (x its floor, TFLOP/s), "
             + {"cuda_graph": "GPU time of a call replayed in a CUDA graph after an L2 flush. ",
                "host": "host time (a dry run). "}.get(r.get("timing"), "medians of `do_bench` (events around each "
                                                          "call after an L2 flush). ")
             + "`rowwise` / "
             "`tensorwise`: `torch._scaled_mm` with the activation quantization; `triton`: `executors.fp8_gemm` "
             f"(GEMV-like tiling up to {r['gemv_max_m']} rows, W8A16 tensor-core tiles up to "
             f"{r.get('w8a16_max_m', r['max_m'])}, W8A8 above, served up to {r['max_m']} rows); `triton_mma`: the "
             f"W8A16 tensor-core tiling at M <= {r['gemv_max_m']}; `w8a8_fused` / `w8a8_prequant`: the W8A8 kernel "
             "with x quantized in its loads / before (the engine fuses up to "
             f"{r.get('fuse_max_m', '-')} rows); `err`: the call failed (JSON). Rel. error: max abs error / max abs "
             "of the fp32 product with the dequantized weight.", "",
             "| shape (N x K) | M | floor bf16 / fp8 us | bf16 | rowwise | tensorwise | triton | triton_mma | "
             "w8a8_fused | w8a8_prequant | triton / bf16 | rel. error triton / w8a8 / rowwise |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        ratio = (f"{x['triton_us'] / x['bf16_us']:.2f}" if "triton_us" in x and x.get("bf16_us") else "-")
        fb = max(x["floor_bf16_us"], x.get("floor_bf16_mma_us", 0))
        ff = max(x["floor_fp8_us"], x.get("floor_fp8_mma_us", 0))
        errs = " / ".join(str(x.get(f"{m}_rel_err", "-" if f"{m}_error" not in x else "err"))
                          for m in ("triton", "w8a8_fused", "rowwise"))
        lines.append(f"| {x['shape']} ({x['N']} x {x['K']}) | {x['M']} | {fb} / {ff} | "
                     + " | ".join(_cell(x, m) for m in METHODS) + f" | {ratio} | {errs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
