"""Small-batch products ``x [M, K] @ W^T`` (decode steps): the engine's Triton GEMV
(``executors.gemv``) against cuBLAS (``F.linear``) and the floor, on one GPU.

Shapes: Llama-3.1-8B's per-layer projections on one GPU (``qkv`` 6144 x 4096, ``o`` 4096 x 4096,
``gate_up`` 28672 x 4096, ``down`` 4096 x 14336) and their TP2 shards, at M = 1, 2, 4 rows. Floor =
the weight's bytes (``2 N K``) over the copy bandwidth measured in the same run (as in
``bench/engine_speed.py``). Times are medians of ``triton.testing.do_bench`` (the L2 cache flushed
before each call, as a decode step meets each weight cold). Every tile configuration is timed
too (JSON), with the one the autotuner picks; the kernel's result is checked against cuBLAS.

    python bench/gemv_speed.py --out DIR        # on a CUDA machine (~2 min)

Writes DIR/gemv_speed.json and DIR/gemv_speed.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "qkv/tp2": (3072, 4096), "o/tp2": (4096, 2048), "gate_up/tp2": (14336, 4096), "down/tp2": (4096, 7168)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rows", default="1,2,4")
    a = ap.parse_args(argv)
    import torch.nn.functional as F
    from triton.testing import do_bench

    from bench.common import command_line, write_report
    from bench.engine_speed import ceilings
    from executors import gemv

    dev = "cuda"
    bw = ceilings(dev)["copy_GBps"]
    report: dict[str, Any] = {"command": command_line("bench/gemv_speed.py", argv), "device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                              "copy_GBps": bw, "rows": []}
    import triton

    report["triton"] = triton.__version__
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, dtype=torch.bfloat16, device=dev) / K ** 0.5
        for M in [int(m) for m in a.rows.split(",")]:
            x = torch.randn(M, K, dtype=torch.bfloat16, device=dev)
            ref = F.linear(x.float(), w.float())
            got = gemv.launch(x, w)  # autotunes this shape
            err = float((got.float() - ref).abs().max() / ref.abs().max())
            cublas = do_bench(lambda: F.linear(x, w), warmup=25, rep=100, return_mode="median") * 1e3
            tuned = do_bench(lambda: gemv.launch(x, w), warmup=25, rep=100, return_mode="median") * 1e3
            configs = {}
            for c in gemv.CONFIGS:
                if M * c[0] * c[1] <= 128 * 32 * c[2]:
                    configs["x".join(map(str, c))] = round(
                        do_bench(lambda: gemv.launch(x, w, config=c), warmup=10, rep=50, return_mode="median") * 1e3, 2)
            floor = 2 * N * K / (bw * 1e9) * 1e6
            row = {"shape": name, "N": N, "K": K, "M": M, "floor_us": round(floor, 2), "cublas_us": round(cublas, 2),
                   "triton_us": round(tuned, 2), "cublas_x_floor": round(cublas / floor, 3),
                   "triton_x_floor": round(tuned / floor, 3), "rel_err_vs_fp32": float(f"{err:.3g}"),
                   "best_config": min(configs, key=configs.get) if configs else None, "configs_us": configs}
            report["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "configs_us"}), flush=True)
    write_report(a.out, "gemv_speed", report, markdown(report), echo=True)
    return report


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Small-batch GEMV: Triton kernel vs cuBLAS vs floor ({r['device']})", "",
             f"torch {r['torch']} (CUDA {r['cuda']}), Triton {r['triton']}, Python {r['python']}. Command: "
             f"`{r['command']}`. Copy bandwidth measured in the run: {r['copy_GBps']} GB/s; floor = 2 N K bytes / that.",
             "", "| shape (N x K) | M | floor us | cuBLAS us | x floor | Triton us | x floor | best tile (BLOCK_N x BLOCK_K x warps) |"
             " rel. error |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['shape']} ({x['N']} x {x['K']}) | {x['M']} | {x['floor_us']} | {x['cublas_us']} | "
                     f"{x['cublas_x_floor']} | {x['triton_us']} | {x['triton_x_floor']} | {x['best_config']} | "
                     f"{x['rel_err_vs_fp32']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
