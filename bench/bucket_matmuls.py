"""cuBLAS at the engine's step-graph row counts: each dense projection of a model timed at every token
bucket a graph computes (``plans.mesh.GRAPH_TOKEN_BUCKETS``), to find the row counts where cuBLAS's
choice of kernel runs slower than at the next larger bucket (a bucket that is dominated: padding its
steps to the next one would be faster).

A prefill or mixed step replayed as a CUDA graph runs every dense product at its token bucket's rows.
On an H200, Llama-3.1-8B's mixed steps of the 448-token bucket ran 149 us a layer over the cost model
in the serving trace (``bench/results/fidelity_2gpu.single.steps.json.gz``), and one such step took
12.7 ms of matmuls against 6.8 at 320 rows (``bench/results/mixed_step_profile.md``). Here: for each
``--models`` preset (and tensor-parallel shards ``--tp``), ``y = x @ W^T`` of each projection (QKV,
output, gate+up, down; bf16) at each bucket's rows, GPU us of one call with a cold L2 in a CUDA graph
(``bench.common.graphed_us``); per bucket the sum over the layer's projections, and whether it is
dominated (its time at least the next bucket's).

    python bench/bucket_matmuls.py --out DIR

Writes DIR/bucket_matmuls.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def projections(preset: str, tp: int) -> dict[str, tuple[int, int]]:
    """``name -> (N, K)`` of one decoder layer's products on one GPU of a TP group of ``tp``."""
    from executors.config import model_args
    from graph.hf_config import load_config

    a = model_args(load_config(preset=preset))
    H, D = a.hidden, a.head_dim
    return {"qkv": ((a.heads + 2 * a.kv_heads) * D // tp, H), "o": (H, a.heads * D // tp),
            "gate_up": (2 * a.intermediate // tp, H), "down": (H, a.intermediate // tp)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--models", default="llama-3.1-8b:1,qwen2-vl-7b:1,llama-3.1-70b:2,llama-3.1-70b:4,qwen2.5-32b:4,"
                    "qwen2.5-vl-72b:2",
                    help="PRESET:TP,... (tensor-parallel shards of the presets)")
    a = ap.parse_args(argv)
    try:
        cases = [(m.split(":")[0], int(m.split(":")[1])) for m in a.models.split(",") if m]
        shapes = {c: projections(*c) for c in cases}
    except (ValueError, IndexError, KeyError) as e:
        ap.error(f"--models {a.models!r}: PRESET:TP pairs of known presets ({type(e).__name__}: {e})")
    import torch

    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import torch.nn.functional as F

    from bench.common import command_line, driver_version, graphed_us, write_report
    from plans.mesh import GRAPH_TOKEN_BUCKETS

    report: dict[str, Any] = {"command": command_line("bench/bucket_matmuls.py", argv),
                              "device": torch.cuda.get_device_name(), "driver": driver_version(),
                              "torch": torch.__version__, "cuda": torch.version.cuda,
                              "python": platform.python_version(), "buckets": list(GRAPH_TOKEN_BUCKETS), "rows": []}
    for (preset, tp), proj in shapes.items():
        ws = {n: torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5 for n, (N, K) in proj.items()}
        row: dict[str, Any] = {"model": preset, "tp": tp, "shapes": {n: list(s) for n, s in proj.items()}, "us": {}}
        for M in GRAPH_TOKEN_BUCKETS:
            per = {}
            for n, w in ws.items():
                x = torch.randn(M, w.shape[1], device="cuda", dtype=torch.bfloat16)
                per[n] = round(graphed_us(lambda: F.linear(x, w)), 2)
            row["us"][str(M)] = per
        totals = [sum(row["us"][str(M)].values()) for M in GRAPH_TOKEN_BUCKETS]
        row["dominated"] = [M for M, t, nxt in zip(GRAPH_TOKEN_BUCKETS, totals, totals[1:]) if t >= nxt]
        report["rows"].append(row)
        print(preset, tp, row["dominated"], [round(t, 1) for t in totals], flush=True)
        del ws
    write_report(a.out, "bucket_matmuls", report, markdown(report), echo=True)
    return 0


def markdown(r: dict[str, Any]) -> str:
    b = r["buckets"]
    lines = ["# cuBLAS at the step graphs' token buckets", "",
             f"{r['device']}, driver {r['driver']}, torch {r['torch']} (CUDA {r['cuda']}). Command: `{r['command']}`. "
             "One decoder layer's dense products (QKV, output, gate+up, down; bf16, `F.linear`) at each bucket's rows, "
             "summed; GPU us of one call each with a cold L2 in a CUDA graph. **Bold**: a bucket no faster than the next "
             "larger one (its steps would run faster padded to that one).", "",
             "| model (TP) | " + " | ".join(str(M) for M in b) + " |", "|---|" + "---|" * len(b)]
    for x in r["rows"]:
        cells = []
        for M in b:
            t = sum(x["us"][str(M)].values())
            cells.append(f"**{t:.1f}**" if M in x["dominated"] else f"{t:.1f}")
        lines.append(f"| {x['model']} (tp{x['tp']}) | " + " | ".join(cells) + " |")
    lines += ["", "Per product at the dominated buckets and the next (us):", ""]
    for x in r["rows"]:
        for M in x["dominated"]:
            nxt = b[b.index(M) + 1]
            lines.append(f"- {x['model']} tp{x['tp']} at {M} rows: " + ", ".join(
                f"{n} {x['us'][str(M)][n]} (at {nxt}: {x['us'][str(nxt)][n]})" for n in x["us"][str(M)]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
