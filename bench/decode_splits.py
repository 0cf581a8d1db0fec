"""The paged decode kernel's range cap, measured: time of one layer's decode attention
(``executors.paged_decode.paged_decode``, GPU time in a CUDA graph, ``bench.common.graphed_us``)
for each cap on a range's keys (``MAX_KEYS_PER_SPLIT``; 0: none), on batches of equal and of
variable context lengths, beside the floor (the batch's K and V bytes at 4.3 TB/s).

    python bench/decode_splits.py --out DIR

With variable lengths a range of thousands of keys keeps one program busy long after the others
(the batch's longest sequences set the tail); smaller ranges spread the work. Every cap must give
the same output (checked). Writes DIR/decode_splits.{json,md}.

Beside each case, the cost model's price of the same attention (``model_us``: one decoder layer's
decode attention of the case's model preset, ``B`` sequences at the case's mean context, the longest
at the top of its range, the h200 profile, which prices this engine's decode attention from its
paged kernel measured at equal lengths, ``attn_decode_engine``, plus the longest range's tail,
``opcost.longest_range_tail_ms``) and the engine's kernel at its cap against it (``model_over_kernel``). ``--price REPORT`` adds them to a report
already measured, on any machine:

    python bench/decode_splits.py --out DIR --price bench/results/decode_splits.json

``--sweep`` times the same cases over the range kernel's launch instead (keys per inner iteration
``BLOCK_N``, warps, software-pipeline stages) at caps of 1,024 and 512 keys, and writes
DIR/decode_splits.sweep.{json,md}: each variant's time per case against the engine's current one.
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CAPS = (0, 4096, 2048, 1024, 512, 256)
# name, sequences, KV heads, query heads per KV head, context range, key width of the table
CASES = (("qwen2-vl-7b b64 ctx 300-5000 (w 8192)", 64, 4, 7, 300, 5000, 8192),
         ("qwen2-vl-7b b32 ctx 300-5000 (w 8192)", 32, 4, 7, 300, 5000, 8192),
         ("qwen2-vl-7b b8 ctx 300-5000 (w 8192)", 8, 4, 7, 300, 5000, 8192),
         ("qwen2-vl-7b b64 ctx 1500 (w 2048)", 64, 4, 7, 1500, 1500, 2048),
         ("qwen2-vl-7b b32 ctx 1500 (w 2048)", 32, 4, 7, 1500, 1500, 2048),
         ("qwen2-vl-7b b1 ctx 4000 (w 4096)", 1, 4, 7, 4000, 4000, 4096),
         ("llama-3.1-8b b64 ctx 100-2000 (w 2048)", 64, 8, 4, 100, 2000, 2048),
         ("llama-3.1-8b b64 ctx 500 (w 512)", 64, 8, 4, 500, 500, 512),
         ("llama-3.1-8b b128 ctx 600 (w 1024)", 128, 8, 4, 600, 600, 1024))


PRESETS = {"qwen2-vl-7b": "qwen2-vl-7b", "llama-3.1-8b": "llama-3.1-8b"}  # case name prefix -> model preset
D, BYTES = 128, 2  # head dim, bf16


@functools.cache
def _attention(preset: str) -> tuple[Any, Any]:
    """``(the decoder layer's attention op, its cost model)`` of ``preset`` on one H200 (bf16)."""
    from bench.common import spec_for
    from planner.inputs import cost_model_of

    cm, _ = cost_model_of(spec_for(f"{preset}-decode", None, preset, 1, "bf16"))
    return next(r for r in cm._recs[cm.decoders[0].name] if r.kind == "attention"), cm


def model_price_us(preset: str, seqs: int, mean_ctx: float, longest: float = 0.0) -> float:
    """The cost model's time for one decoder layer's decode attention of ``preset`` on one H200:
    ``seqs`` sequences of ``mean_ctx`` keys on average, the longest of ``longest`` (0: all equal)."""
    import dataclasses

    from costmodels.opcost import op_time
    from graph.opgraph import StepShape

    attn, cm = _attention(preset)
    shape = StepShape.decode([max(1, round(mean_ctx))] * seqs)
    shape = dataclasses.replace(shape, decode_max_kv=max(longest, shape.decode_max_kv))
    c, m, o = op_time(attn, shape, 1, 1, cm.rates, cm.profile)
    return (max(c, m) + o) * 1e3


def price(rows: list[dict], cap: int) -> None:
    """``model_us`` and ``model_over_kernel`` (at ``cap``) on each row, from its case's shape and the
    keys its floor stands for (``floor_us`` = K and V bytes at 4.3 TB/s)."""
    by_name = {c[0]: c for c in CASES}
    for r in rows:
        name, S, hkv, _G, _lo, hi, _w = by_name[r["case"]]
        keys = r["floor_us"] * 1e-6 * 4.3e12 / (2 * hkv * D * BYTES)
        # the longest: the range's top (the kernel's ranges follow the table's width, which the top fills)
        r["model_us"] = round(model_price_us(PRESETS[name.split()[0]], S, keys / S, hi), 1)
        r["model_over_kernel"] = round(r["model_us"] / r["us"][str(cap)], 2)


def markdown(report: dict) -> str:
    caps = [int(c) for c in report["rows"][0]["us"]]
    priced = "model_us" in report["rows"][0]
    md = ["# Paged decode: the cap on a range's keys", "",
          f"{report['device']}, driver {report['driver']}, torch {report['torch']}, Triton {report['triton']}. "
          f"Command: `{report['command']}`. One layer's decode attention, bf16, head dim {D}, block size 16; GPU "
          f"microseconds in a CUDA graph; floor = the batch's K and V bytes at 4.3 TB/s. The engine's cap: "
          f"{report['engine_cap']}." + (f" Model: the cost model's price of the same attention (`{report['priced']}`), "
                                         f"and its ratio to the kernel at the engine's cap." if priced else ""), "",
          "| case | floor us | " + " | ".join(f"cap {c or 'none'}" for c in caps) + (" | model us | model / kernel |" if priced else " |"),
          "|---|---:|" + "---:|" * (len(caps) + 2 * priced)]
    md += [f"| {r['case']} | {r['floor_us']} | " + " | ".join(str(r["us"][str(c)]) for c in caps)
           + (f" | {r['model_us']} | {r['model_over_kernel']} |" if priced else " |") for r in report["rows"]]
    return "\n".join(md) + "\n"


SWEEP = [(n, w, st) for n in (32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3, 4)]  # BLOCK_N, warps, stages
SWEEP_CAPS = (1024, 512)


def case_tensors(case: tuple, bs: int) -> tuple:
    """``(q, k, v, table, lens)`` of one case on the GPU: random bf16 caches, each sequence's blocks
    contiguous, lengths uniform in the case's range (seeded by the caller)."""
    import torch

    name, S, hkv, G, lo, hi, width = case
    nb = width // bs
    k = torch.randn(S * nb * bs + 1, hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(S, hkv * G, D, device="cuda", dtype=torch.bfloat16)
    table = torch.arange(S * nb, device="cuda", dtype=torch.int32).reshape(S, nb)
    lens = torch.randint(lo, hi + 1, (S,), device="cuda", dtype=torch.int32)
    return q, k, v, table, lens


def sweep(pd: Any, sh: Any, graphed_us: Any) -> list[dict]:
    """Every (BLOCK_N, warps, stages, cap) variant's GPU us on every case (outputs checked against the
    engine's current launch); the settings of ``pd`` (``executors.paged_decode``) and ``sh``
    (``plans.engine_shapes``) are restored after."""
    import torch

    keep = (sh.DECODE_BLOCK_N, pd.PARTIAL_WARPS, pd.PARTIAL_STAGES, sh.MAX_KEYS_PER_SPLIT)
    rows = []
    for case in CASES:
        torch.manual_seed(0)
        q, k, v, table, lens = case_tensors(case, 16)
        ref = pd.paged_decode(q, k, v, table, lens, 16)
        row = {"case": case[0], "engine_us": round(graphed_us(lambda: pd.paged_decode(q, k, v, table, lens, 16)), 1),
               "us": {}}
        for n, w, st in SWEEP:
            for cap in SWEEP_CAPS:
                sh.DECODE_BLOCK_N, pd.PARTIAL_WARPS, pd.PARTIAL_STAGES, sh.MAX_KEYS_PER_SPLIT = n, w, st, cap
                try:
                    o = pd.paged_decode(q, k, v, table, lens, 16)
                    if not torch.allclose(o.float(), ref.float(), atol=2e-2, rtol=2e-2):
                        raise SystemExit(f"{case[0]}: variant {(n, w, st, cap)} changed the output")
                    us = round(graphed_us(lambda: pd.paged_decode(q, k, v, table, lens, 16)), 1)
                except Exception as e:  # noqa: BLE001 - a variant that does not build (registers, shared memory)
                    us = f"{type(e).__name__}"
                row["us"][f"{n}/{w}/{st}/{cap}"] = us
        sh.DECODE_BLOCK_N, pd.PARTIAL_WARPS, pd.PARTIAL_STAGES, sh.MAX_KEYS_PER_SPLIT = keep
        rows.append(row)
        print(row["case"], row["engine_us"], min((u, key) for key, u in row["us"].items() if isinstance(u, float)),
              flush=True)
    return rows


def sweep_markdown(report: dict) -> str:
    """Per variant: its time on each case over the engine's current launch, and the geometric mean."""
    import math

    rows = report["rows"]
    keys = list(rows[0]["us"])
    ratio = {key: [r["us"][key] / r["engine_us"] if isinstance(r["us"][key], float) else math.inf for r in rows]
             for key in keys}
    gmean = {key: math.exp(sum(math.log(x) for x in v) / len(v)) for key, v in ratio.items()}
    md = ["# Paged decode: the range kernel's launch, swept", "",
          f"{report['device']}, driver {report['driver']}, torch {report['torch']}, Triton {report['triton']}. "
          f"Command: `{report['command']}`. Cases of `decode_splits.md`; each variant (BLOCK_N / warps / stages / "
          f"cap) as its time over the engine's current launch ({report['engine']}); best 12 by geometric mean.", "",
          "| variant | gmean | " + " | ".join(r["case"] for r in rows) + " |",
          "|---|---:|" + "---:|" * len(rows),
          "| engine (us) | 1 | " + " | ".join(str(r["engine_us"]) for r in rows) + " |"]
    for key in sorted(keys, key=gmean.get)[:12]:
        md.append(f"| {key} | {gmean[key]:.3f} | " + " | ".join(f"{x:.2f}" for x in ratio[key]) + " |")
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--price", type=Path, default=None, metavar="REPORT",
                    help="add the cost model's price to a measured report (no GPU)")
    ap.add_argument("--sweep", action="store_true", help="time the range kernel's launch variants instead")
    a = ap.parse_args(argv)
    from bench.common import command_line, write_report

    if a.price is not None:
        from bench.common import price_report

        price_report(ap, a.price, "decode_splits", lambda r: price(r["rows"], r["engine_cap"]), markdown, a.out, argv)
        return 0
    import torch

    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the kernel is Triton)")
    from bench.common import driver_version, graphed_us
    from executors import paged_decode as pd
    from plans import engine_shapes as sh

    import triton

    meta = {"command": command_line("bench/decode_splits.py", argv), "device": torch.cuda.get_device_name(),
            "driver": driver_version(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    if a.sweep:
        engine = f"{sh.DECODE_BLOCK_N}/{pd.PARTIAL_WARPS}/{pd.PARTIAL_STAGES}/{sh.MAX_KEYS_PER_SPLIT}"
        report = {**meta, "engine": engine, "rows": sweep(pd, sh, graphed_us)}
        write_report(a.out, "decode_splits.sweep", report, sweep_markdown(report), echo=True)
        return 0
    torch.manual_seed(0)
    bs = 16
    rows = []
    keep = sh.MAX_KEYS_PER_SPLIT
    for case in CASES:
        name, S, hkv = case[:3]
        q, k, v, table, lens = case_tensors(case, bs)
        row = {"case": name, "floor_us": round(int(lens.sum()) * 2 * hkv * D * BYTES / 4.3e12 * 1e6, 1), "us": {}}
        ref = None
        for cap in CAPS:
            sh.MAX_KEYS_PER_SPLIT = cap
            o = pd.paged_decode(q, k, v, table, lens, bs)
            ref = o if ref is None else ref
            if not torch.allclose(o.float(), ref.float(), atol=2e-2, rtol=2e-2):
                raise SystemExit(f"{name}: cap {cap} changed the output")
            row["us"][str(cap)] = round(graphed_us(lambda: pd.paged_decode(q, k, v, table, lens, bs)), 1)
        rows.append(row)
        print(row, flush=True)
    sh.MAX_KEYS_PER_SPLIT = keep
    price(rows, keep)
    report = {**meta, "engine_cap": keep, "rows": rows, "priced": meta["command"]}
    write_report(a.out, "decode_splits", report, markdown(report), echo=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
