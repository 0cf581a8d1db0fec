"""The paged prefill kernel's launch shape, swept: tokens a program (``BLOCK_M``), keys an inner
step (``BLOCK_N``), warps and pipeline stages, on the steps the engine's graphs run through it.

Cases, each with Llama-3.1-8B's heads (32 query over 8 KV heads a GPU, a group of 4) and
Qwen2-VL-7B's (28 over 4, a group of 7 run as 8), head dim 128, bf16, block size 16, the block
table as wide as a step graph's (``plans.engine_shapes.keys_bucket``):

* prefill chunks: B sequences of L new tokens, no cached keys;
* decode rows: B sequences of one new token after C - 1 cached keys (a graphed mixed step's decodes
  when this sweep ran; they now run the paged decode kernel, ``bench/graph_decodes.py``).

Each configuration's output is checked against the default launch's (``BLOCK_N``, ``WARPS``,
``STAGES`` of ``executors.paged_prefill``; largest absolute difference) and timed as ``costmodels.gpu_bench.Timer`` times the calibration (CUDA-graph
replays, median). Prints a table per case and writes DIR/prefill_kernel_sweep.{json,md}.

    python bench/prefill_kernel_sweep.py --out DIR      # one GPU; bench/results/prefill_kernel_sweep.md
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS = {"llama": (32, 8), "qwen2-vl": (28, 4)}
PREFILL = [(256, 1), (1024, 1), (2048, 1), (128, 8)]  # (L, B)
DECODE = [(1, 512), (32, 1024), (64, 2048)]  # (B, C)
BLOCK_M, BLOCK_N, WARPS, STAGES = (16, 32), (32, 64, 128), (4, 8), (2, 3)
D, BS = 128, 16


def run() -> dict[str, Any]:
    import torch

    from bench.common import driver_version
    from costmodels.gpu_bench import Timer, paged_prefill_case
    from executors import paged_prefill

    timer = Timer(torch.device("cuda"))
    configs = [paged_prefill.KernelConfig(*c) for c in itertools.product(BLOCK_M, BLOCK_N, WARPS, STAGES)]
    default = paged_prefill.KernelConfig(paged_prefill.BLOCK_M, paged_prefill.BLOCK_N, paged_prefill.WARPS,
                                         paged_prefill.STAGES)
    cases = [("prefill", L, B, L) for L, B in PREFILL] + [("decode", 1, B, C) for B, C in DECODE]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "driver": driver_version(),
                           "torch": torch.__version__, "default": default.__dict__, "cases": []}
    t_start = time.time()
    for model, (hq, hkv) in HEADS.items():
        for kind, n, B, C in cases:
            ref = None
            rows = []
            for cfg in [default] + [c for c in configs if c != default]:
                x = paged_prefill_case(B, n, C, hq, hkv, D, cfg.block_m, BS,
                                       torch.Generator(device="cuda").manual_seed(0))
                y = paged_prefill.paged_prefill(*x, BS, config=cfg)
                ref = y if ref is None else ref
                err = float((y.float() - ref.float()).abs().max())
                ms = timer(lambda: paged_prefill.paged_prefill(*x, BS, config=cfg))
                rows.append({**cfg.__dict__, "us": round(ms * 1e3, 2), "max_abs_diff": err})
            best = min(rows, key=lambda r: r["us"])
            out["cases"].append({"model": model, "kind": kind, "n": n, "B": B, "C": C, "rows": rows,
                                 "default_us": rows[0]["us"], "best": best})
            print(f"{model} {kind} n={n} B={B} C={C}: default {rows[0]['us']} us, best {best}", flush=True)
    out["seconds"] = round(time.time() - t_start, 1)
    return out


def markdown(r: dict[str, Any], command: str) -> str:
    lines = ["# Paged prefill kernel: launch shapes swept", "",
             f"{r['device']}, driver {r['driver']}, torch {r['torch']}. Command: `{command}`. Default: {r['default']}.", "",
             "| heads of | kind | L or 1 | B | keys | default us | best us | best block_m / block_n / warps / stages | "
             "best's max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        b = c["best"]
        lines.append(f"| {c['model']} | {c['kind']} | {c['n']} | {c['B']} | {c['C']} | {c['default_us']} | {b['us']} | "
                     f"{b['block_m']} / {b['block_n']} / {b['warps']} / {b['stages']} | {b['max_abs_diff']:.3g} |")
    lines += ["", "Every configuration, per case (us):", ""]
    keys = [(x["block_m"], x["block_n"], x["warps"], x["stages"]) for x in r["cases"][0]["rows"]]
    lines += ["| case | " + " | ".join("/".join(map(str, k)) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for c in r["cases"]:
        by = {(x["block_m"], x["block_n"], x["warps"], x["stages"]): x["us"] for x in c["rows"]}
        lines.append(f"| {c['model']} {c['kind']} {c['n']}x{c['B']} @{c['C']} | " + " | ".join(str(by.get(k, "-")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (it times the kernel there)")
    from bench.common import command_line, write_report

    r = run()
    write_report(a.out, "prefill_kernel_sweep", r, markdown(r, command_line("bench/prefill_kernel_sweep.py", argv)), echo=True)


if __name__ == "__main__":
    main()
