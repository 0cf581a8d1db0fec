"""cuBLAS against cuBLASLt on the decode-step products: each dense projection of a model (QKV, output,
gate+up, down; bf16, ``y = x @ W^T`` through ``F.linear``) at a decode batch's rows, run with each of
the BLAS libraries PyTorch can call (``torch.backends.cuda.preferred_blas_library``).

A decode step of Llama-3.1-8B on an H200 ran its QKV and output products at 1.4-1.9x their weight
bytes over the memory bandwidth, with a split-K reduce kernel after them. Here: for each ``--models``
preset and tensor-parallel shard, each projection at each ``--rows`` count, GPU us of one call with a
cold L2 in a CUDA graph (``bench.common.graphed_us``), the graph captured after choosing the library;
each library timed twice in the order cuBLAS, cuBLASLt, cuBLASLt, cuBLAS and the two averaged. Both
outputs are checked against a float32 product (relative Frobenius error, bf16 tolerance 1e-2) and
against each other. Floor = (``2 N K`` weight bytes + ``2 M K`` in + ``2 M N`` out) over the copy
bandwidth measured in the same run (``bench.engine_speed.ceilings``). Per row count: the layer's
four products summed for each library and the floor, the ratio cuBLASLt / cuBLAS, and times the
model's layers (the dense products of one decode step). Last, the kernels each library launches
for one call (``torch.profiler``; JSON).

    python bench/blas_library.py --out DIR

Writes DIR/blas_library.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LIBS = ("cublas", "cublaslt")
TOLERANCE = 1e-2  # relative error of a bf16 product


def layer_sums(per: dict[str, dict[str, Any]], layers: int) -> dict[str, Any]:
    """One row count's products (``name -> {"floor_us", "cublas_us", "cublaslt_us", ...}``) summed
    over the layer: us per library and for the floor, cuBLASLt / cuBLAS, and ms per decode step
    (times ``layers``)."""
    s = {k: round(sum(p[f"{k}_us"] for p in per.values()), 2) for k in ("floor",) + LIBS}
    return {**{f"{k}_us": v for k, v in s.items()}, "lt_over_cublas": round(s["cublaslt"] / s["cublas"], 3),
            "step_ms": {k: round(v * layers / 1e3, 3) for k, v in s.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--models", default="llama-3.1-8b:1,llama-3.1-8b:2",
                    help="PRESET:TP,... (tensor-parallel shards of the presets)")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512")
    a = ap.parse_args(argv)
    from bench.bucket_matmuls import projections

    try:
        cases = [(m.split(":")[0], int(m.split(":")[1])) for m in a.models.split(",") if m]
        shapes = {c: projections(*c) for c in cases}
        rows = [int(m) for m in a.rows.split(",")]
    except (ValueError, IndexError, KeyError) as e:
        ap.error(f"--models {a.models!r} / --rows {a.rows!r}: PRESET:TP pairs of known presets, row counts "
                 f"({type(e).__name__}: {e})")
    import torch

    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import torch.nn.functional as F

    from bench.common import command_line, driver_version, graphed_us, write_report
    from bench.engine_speed import ceilings
    from executors.config import model_args
    from graph.hf_config import load_config

    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    bw = ceilings("cuda")["copy_GBps"]
    report: dict[str, Any] = {"command": command_line("bench/blas_library.py", argv),
                              "device": torch.cuda.get_device_name(), "driver": driver_version(),
                              "torch": torch.__version__, "cuda": torch.version.cuda,
                              "python": platform.python_version(), "copy_GBps": bw, "rows_M": rows,
                              "tolerance": TOLERANCE, "libraries": {}, "shards": []}

    def use(lib: str) -> None:
        torch.backends.cuda.preferred_blas_library(lib)
        report["libraries"][lib] = str(torch.backends.cuda.preferred_blas_library())

    inputs = {}
    for (preset, tp), proj in shapes.items():
        layers = model_args(load_config(preset=preset)).layers
        ws = {n: torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5 for n, (N, K) in proj.items()}
        shard: dict[str, Any] = {"model": preset, "tp": tp, "layers": layers,
                                 "shapes": {n: list(s) for n, s in proj.items()}, "per": {}, "layer": {}}
        for M in rows:
            per = {}
            for n, w in ws.items():
                N, K = w.shape
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                inputs[(preset, tp, n, M)] = (x, w)
                ref = F.linear(x.float(), w.float())
                runs: dict[str, list[float]] = {lib: [] for lib in LIBS}
                out = {}
                for lib in LIBS + LIBS[::-1]:
                    use(lib)
                    out[lib] = F.linear(x, w).float()
                    runs[lib].append(round(graphed_us(lambda: F.linear(x, w)), 2))
                err = {lib: float((out[lib] - ref).norm() / ref.norm()) for lib in LIBS}
                err["lt_vs_cublas"] = float((out["cublaslt"] - out["cublas"]).norm() / out["cublas"].norm())
                p = {"floor_us": round(2 * (N * K + M * K + M * N) / (bw * 1e3), 2),
                     **{f"{lib}_us": round(sum(runs[lib]) / 2, 2) for lib in LIBS}, "runs_us": runs,
                     "rel_err": {k: float(f"{v:.3g}") for k, v in err.items()},
                     "agree": all(v < TOLERANCE for v in err.values())}  # NaN fails too
                per[n] = p
            shard["per"][str(M)] = per
            shard["layer"][str(M)] = s = layer_sums(per, layers)
            print(preset, tp, M, s, flush=True)
        report["shards"].append(shard)
    use("cublas")
    report["all_agree"] = all(p["agree"] for sh in report["shards"] for per in sh["per"].values() for p in per.values())
    write_report(a.out, "blas_library", report, markdown(report))
    report["kernels"] = kernels(inputs, use)
    use("cublas")
    write_report(a.out, "blas_library", report, markdown(report), echo=True)
    return 0


def kernels(inputs: dict[tuple, tuple], use: Any) -> dict[str, dict[str, list[str]]]:
    """``"preset tpN name M" -> {library: [kernel names of one eager call]}`` (``torch.profiler``);
    a profiler failure is recorded, not raised (the timings are written already)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    got: dict[str, dict[str, list[str]]] = {}
    try:
        for (preset, tp, n, M), (x, w) in inputs.items():
            key = f"{preset} tp{tp} {n} {M}"
            got[key] = {}
            for lib in LIBS:
                use(lib)
                F.linear(x, w)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    F.linear(x, w)
                    torch.cuda.synchronize()
                got[key][lib] = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as e:  # noqa: BLE001
        got["error"] = {"profiler": [f"{type(e).__name__}: {e}"]}
    return got


def _short(names: list[str]) -> list[str]:
    return [n.removeprefix("void ").split("<")[0].split("(")[0] for n in names]


def markdown(r: dict[str, Any]) -> str:
    lines = ["# cuBLAS against cuBLASLt on the decode-step products", "",
             f"{r['device']}, driver {r['driver']}, torch {r['torch']} (CUDA {r['cuda']}). Command: `{r['command']}`. "
             "One decoder layer's dense products (QKV, output, gate+up, down; bf16, `F.linear`) at M rows, with "
             "`torch.backends.cuda.preferred_blas_library` set to each library before a CUDA graph is captured; GPU us "
             "of one call each with a cold L2, the mean of two timings per library. Floor = (2 N K + 2 M K + 2 M N) "
             f"bytes over the copy bandwidth measured in the run ({r['copy_GBps']} GB/s). Outputs of both libraries "
             f"within {r['tolerance']} relative error of a float32 product and of each other: "
             f"{'all' if r.get('all_agree') else 'NOT all'}."]
    for sh in r["shards"]:
        shapes = ", ".join(f"{n} {N} x {K}" for n, (N, K) in sh["shapes"].items())
        lines += ["", f"## {sh['model']} (tp{sh['tp']}): {shapes}", "",
                  f"| M | floor us | cuBLAS us | cuBLASLt us | Lt / cuBLAS | x{sh['layers']} layers ms: floor | cuBLAS "
                  "| cuBLASLt | " + " | ".join(f"{n} cuBLAS / Lt us" for n in sh["shapes"]) + " |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * len(sh["shapes"])]
        for M, s in sh["layer"].items():
            per = sh["per"][M]
            lines.append(f"| {M} | {s['floor_us']} | {s['cublas_us']} | {s['cublaslt_us']} | {s['lt_over_cublas']} | "
                         f"{s['step_ms']['floor']} | {s['step_ms']['cublas']} | {s['step_ms']['cublaslt']} | "
                         + " | ".join(f"{p['cublas_us']} / {p['cublaslt_us']}" + ("" if p["agree"] else " (!)")
                                      for p in per.values()) + " |")
    spread = [abs(a - b) / max(a, b, 1e-9) for sh in r["shards"] for per in sh["per"].values() for p in per.values()
              for a, b in p["runs_us"].values()]
    if spread:
        lines += ["", "Repeat spread (one library's two timings of a product): median "
                  f"{sorted(spread)[len(spread) // 2]:.1%}, largest {max(spread):.1%}. (!) marks a product whose "
                  "outputs disagree."]
    ks = r.get("kernels", {})
    if ks:
        lines += ["", "Kernels of one call (`torch.profiler`; names cut at their template arguments), at 8 and 64 rows "
                  "(every row count in the JSON):", ""]
        lines += [f"- {key}: " + "; ".join(f"{lib}: {' + '.join(_short(names)) or '-'}" for lib, names in v.items())
                  for key, v in ks.items() if key == "error" or key.split()[-1] in ("8", "64")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
