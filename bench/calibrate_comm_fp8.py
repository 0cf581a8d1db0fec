"""The multi-GPU part of the calibration, bounded in time: collective tables and FP8 GEMMs.

    python bench/calibrate_comm_fp8.py --out DIR [--budget-s 170]
    python bench/calibrate_comm_fp8.py --out DIR --fp8-only --max-m 256 --budget-s 540   # one GPU
    python bench/calibrate_comm_fp8.py --out DIR --fp8-only --fp8-kernel tensor --budget-s 300   # per-tensor FP8
    python bench/calibrate_comm_fp8.py --out DIR --engine-attention  # the engine's paged attention kernels only
    CUDA_VISIBLE_DEVICES=1 python bench/calibrate_comm_fp8.py --out DIR1 --fp8-only --shard 1/2   # half the grid

On a machine with N >= 2 GPUs: all-reduce, all-gather, reduce-scatter, all-to-all and a
send/recv pair, 4 KiB to 256 MiB in factors of 4, for each group size 2, 4, ... N, timed inside
CUDA graphs and eagerly (``costmodels.calib_collectives``); then FP8 GEMMs on the bf16 GEMM grid,
each the call ``executors.quant.linear`` makes (the Triton W8A16 kernel up to
``executors.fp8_gemm.W8A16_MAX_M`` rows, the Triton W8A8 kernel up to ``executors.fp8_gemm.MAX_M``,
``torch._scaled_mm`` with the activation quantization above; each point names its kernel), until the budget is spent (``costmodels.calibrate.run_comm_fp8``).
``--fp8-only`` skips the collectives and ``--max-m`` keeps the GEMM rows up to that many (the
decode sizes, where the engine's kernel changed); ``--shard I/N`` times the grid's ``(N, K)`` pairs
``I, I + N, ...`` only, so N processes, one GPU each, share the grid (merge each shard's file in turn). An op that fails is recorded with its error
and the rest go on; without FP8 tensor cores the GEMMs are skipped with the reason.
``--engine-attention`` (``--decode-engine``, its name before it timed the prefill kernel too) times
the engine's paged decode kernel on the decode grid at 8, 4, 2 and 1 KV heads and its paged prefill
kernel on prefill chunks instead (``costmodels.calibrate.run_engine_kernels``; the
profile's ``attn_decode_engine`` and ``attn_prefill_engine``).

Writes DIR/comm_fp8.json. Merge it into a profile on any machine (no GPU, no torch; FP8 points
replace the profile's points of the same (m, n, k), the profile's other points stay):

    python -m costmodels.merge DIR/comm_fp8.json costmodels/profiles/h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compare_md(calib: dict, profile: dict, title: str) -> str:
    """The engine's FP8 kernels (``calib``'s points) against the ``profile``'s FP8 table points of the
    same (M, N, K) (``torch._scaled_mm`` where they name no kernel) and its bf16 GEMM points: per row
    count, the kernel, the median time ratio and on how many (N, K) pairs the engine's kernel is faster."""
    import statistics

    old = {(p["m"], p["n"], p["k"]): p for p in profile["raw"].get("gemm_fp8", [])}
    bf16 = {(p["m"], p["n"], p["k"]): p["ms"] for p in profile["raw"].get("gemm", [])}
    rows: dict[int, dict] = {}
    for p in calib["gemm_fp8"]:
        key = (p["m"], p["n"], p["k"])
        r = rows.setdefault(p["m"], {"kernel": set(), "vs_lib": [], "vs_bf16": []})
        r["kernel"].add(p.get("kernel"))
        if key in old and old[key].get("kernel") in (None, "scaled_mm_rowwise"):
            r["vs_lib"].append(p["ms"] / old[key]["ms"])
        if key in bf16:
            r["vs_bf16"].append(p["ms"] / bf16[key])
    pairs = len({(p["n"], p["k"]) for p in calib["gemm_fp8"]})
    m = calib["meta"]
    lines = [f"# {title}", "", f"{m.get('device_name')}, driver {m.get('driver')}, torch {m.get('torch')}, CUDA "
             f"{m.get('cuda')}. Command: `{m.get('command')}` (raw points: `fp8_kernels_calibration.json`, "
             f"{len(calib['gemm_fp8'])} points on {pairs} (N, K) pairs). Each point is the call "
             "`executors.quant.linear` made for an FP8 weight when it ran, timed in a CUDA graph with the weights "
             "rotated over copies (`costmodels.gpu_bench.Timer`); compared on the same (M, N, K) with the profile's "
             "FP8 table as it was before the merge (`torch._scaled_mm` with per-row activation quantization) and "
             "its bf16 GEMM table:", "",
             "| rows M | kernel | kernel / `_scaled_mm` (median) | faster than `_scaled_mm` on | kernel / bf16 GEMM (median) |",
             "|---|---|---|---|---|"]
    med = lambda xs: f"{statistics.median(xs):.2f}" if xs else "-"  # noqa: E731
    for mm in sorted(rows):
        r = rows[mm]
        lines.append(f"| {mm} | {', '.join(sorted(k or '-' for k in r['kernel']))} | {med(r['vs_lib'])} | "
                     f"{sum(x < 1 for x in r['vs_lib'])} of {len(r['vs_lib'])} pairs | {med(r['vs_bf16'])} |")
    return "\n".join(lines) + "\n"


def shard_arg(text: str) -> tuple[int, int]:
    """``I/N`` with ``0 <= I < N``."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: I must be 0 .. N - 1")
    return i, n


def main(argv: list[str] | None = None) -> int:
    from costmodels.calibrate import FP8_KERNELS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for comm_fp8.json")
    ap.add_argument("--budget-s", type=float, default=170.0, help="stop timing new points after this many seconds")
    ap.add_argument("--collectives-s", type=float, default=90.0, help="deadline of the collective part")
    ap.add_argument("--fp8-only", action="store_true", help="skip the collectives (FP8 GEMMs only)")
    ap.add_argument("--max-m", type=int, default=None, help="FP8 GEMM rows up to this many (default: the whole grid)")
    ap.add_argument("--shard", type=shard_arg, default=(0, 1), help="I/N: the FP8 grid's (N, K) pairs I, I + N, ... (default: all)")
    ap.add_argument("--fp8-kernel", choices=FP8_KERNELS, default="engine",
                    help="engine: the calls executors.quant.linear makes; tensor: per-tensor torch._scaled_mm "
                         "(TensorRT-LLM's FP8 recipe), written as gemm_fp8_tensor")
    ap.add_argument("--engine-attention", "--decode-engine", dest="engine_attention", action="store_true",
                    help="time the engine's paged decode and prefill kernels (nothing else)")
    a = ap.parse_args(argv)
    from costmodels.calibrate import run_comm_fp8, run_engine_kernels

    a.out.mkdir(parents=True, exist_ok=True)
    from plans.errors import UserError

    try:
        raw = run_engine_kernels() if a.engine_attention else run_comm_fp8(
            budget_s=a.budget_s, collectives_s=a.collectives_s, fp8_only=a.fp8_only, max_m=a.max_m,
            fp8_kernel=a.fp8_kernel, shard=a.shard)
    except UserError as e:
        ap.exit(2, f"error: {e}\n")
    from bench.common import command_line

    raw["meta"]["command"] = command_line("bench/calibrate_comm_fp8.py", argv)  # the output folder written DIR
    path = a.out / "comm_fp8.json"
    path.write_text(json.dumps(raw, indent=1) + "\n")
    print(f"wrote {path}: {len(raw.get('attn_decode_engine', []))} engine decode points, "
          f"{len(raw.get('attn_prefill_engine', []))} engine prefill points, "
          f"{len(raw.get('collectives', []))} collective points, {len(raw.get('gemm_fp8', raw.get('gemm_fp8_tensor', [])))} FP8 GEMM "
          f"points in {raw['seconds']:.0f} s; skipped: {raw['skipped'][:3]}; errors: {raw.get('collectives_errors', [])[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
