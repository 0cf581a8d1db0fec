"""Prefill attention of a step, per layer: the per-sequence SDPA path against the Triton paged
prefill kernel (``executors/paged_prefill.py``), on one GPU.

Llama-3.1-8B's attention shapes on one GPU (32 query heads, 8 KV heads, head dim 128, bf16,
16-token KV blocks scattered over the cache). Cases: one first chunk of 512, 2,048 and 8,192
tokens; four chunks of 256 tokens after 1,024 cached keys each; sixteen chunks of 32 tokens after
512; a mixed step as its CUDA graph attends it (every sequence in the kernel), 64 decodes of 4,000
keys beside a first chunk of 1,600 tokens. Paths: one SDPA per sequence, the kernel, and the kernel
with every program's keys in one range (no split-K: ``engine_shapes.MAX_KEYS_PER_SPLIT = 0``; it
differs from the kernel only where a table holds more than 1,024 keys). For each path: the wall
time of one call from the host (launches included, synchronised: what a step outside CUDA graphs
pays per layer) and its GPU time (CUDA events), medians of ``--reps``; FLOPs over GPU time beside
the matmul rate measured in the run; the largest difference between the paths' outputs. The
engine's eager steps use the kernel when two or more sequences prefill, its prefill graphs always
(``executors.paged_prefill``).

    python bench/prefill_attention.py --out DIR              # on a CUDA machine
    TRITON_INTERPRET=1 python bench/prefill_attention.py --out DIR --tiny   # CPU dry run (small shapes)

Writes DIR/prefill_attention.json and DIR/prefill_attention.md.
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

CASES = {"1x512": [(0, 512)], "1x2048": [(0, 2048)], "1x8192": [(0, 8192)], "4x256@1024": [(1024, 256)] * 4,
         "16x32@512": [(512, 32)] * 16,
         "64x1@4000+1x1600": [(4000, 1)] * 64 + [(0, 1600)]}  # (cached keys, new tokens) per sequence
PATHS = ("sdpa_per_sequence", "paged_prefill", "paged_prefill_unsplit")
TINY = {"1x24": [(0, 24)], "3x8@12": [(12, 8)] * 3}


def microbatch(chunks: list[tuple[int, int]], block: int) -> Any:
    """Sequences with ``cached`` keys already computed and ``n`` new tokens, over scattered blocks."""
    from executors.scheduler import Chunk, Seq, build_microbatch

    out, nxt = [], 0
    for j, (cached, n) in enumerate(chunks):
        s = Seq(req=j, tokens=list(range(cached + n)), prompt_len=cached + n, max_new=1, computed=cached)
        nb = -(-(cached + n) // block)
        s.blocks = [nxt + 2 * i for i in range(nb)]  # every other block
        nxt += 2 * nb + 1
        out.append(Chunk(s, n))
    return build_microbatch(out, "tp", block, None), nxt


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run, small shapes (with TRITON_INTERPRET=1)")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    from bench.common import command_line, median, timed_ms, write_report
    from bench.engine_speed import ceilings
    from executors import paged_prefill
    from executors.attention import LayerCache, _attend_per_sequence, prefill_inputs, sequence_spans
    from executors.model import AttnMeta
    from plans import engine_shapes

    dev = torch.device("cpu" if a.tiny else "cuda")
    dtype = torch.float32 if a.tiny else torch.bfloat16
    hq, hkv, D, block = (8, 2, 16, 4) if a.tiny else (32, 8, 128, 16)
    cases, reps = (TINY, min(a.reps, 2)) if a.tiny else (CASES, a.reps)
    rate = ceilings(str(dev))["matmul_TFLOPs"]
    report: dict[str, Any] = {
        "command": command_line("bench/prefill_attention.py", argv),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "python": platform.python_version(), "heads": [hq, hkv, D], "block": block,
        "dtype": str(dtype).split(".")[-1], "matmul_TFLOPs": rate, "cases": {}}
    g = torch.Generator(device=dev).manual_seed(0)
    for name, chunks in cases.items():
        mb, blocks = microbatch(chunks, block)
        mb = mb.with_keys(block)
        T = mb.num_tokens
        cache = LayerCache(blocks * block, hkv, D, dtype, dev)
        cache.k.copy_(torch.randn(cache.k.shape, generator=g, device=dev, dtype=dtype))
        cache.v.copy_(torch.randn(cache.v.shape, generator=g, device=dev, dtype=dtype))
        q = torch.randn(T, hq, D, generator=g, device=dev, dtype=dtype)
        k, v = cache.k[mb.slots.to(dev)], cache.v[mb.slots.to(dev)]  # the step's keys, already stored
        spans = sequence_spans(mb)
        meta = AttnMeta(mb.slots.to(dev), mb.key_slots.to(dev), None, seqs=spans)

        def sdpa() -> torch.Tensor:
            return _attend_per_sequence(q, k, v, cache, meta, None)

        def kernel() -> torch.Tensor:  # the host builds the kernel's inputs each step, as the engine does
            return paged_prefill.attend(q, cache.k, cache.v, prefill_inputs(mb, spans, spans, block, dev))

        def unsplit() -> torch.Tensor:  # the kernel with no key ranges
            cap, engine_shapes.MAX_KEYS_PER_SPLIT = engine_shapes.MAX_KEYS_PER_SPLIT, 0
            try:
                return kernel()
            finally:
                engine_shapes.MAX_KEYS_PER_SPLIT = cap

        want = sdpa().float()
        diff = max(float((want - fn().float()).abs().max()) for fn in (kernel, unsplit))
        flops = sum(4 * n * (c + (n + 1) / 2) * hq * D for c, n in chunks)  # causal: QK^T and PV
        row: dict[str, Any] = {"tokens": T, "sequences": len(chunks), "GFLOP": round(flops / 1e9, 3),
                               "max_abs_diff": float(f"{diff:.3g}")}
        for path, fn in zip(PATHS, (sdpa, kernel, unsplit)):
            wall, gpu = (median(timed_ms(fn, dev, reps, 2, host=h)) for h in (True, False))
            row[path] = {"host_ms": round(wall, 4), "gpu_ms": round(gpu, 4),
                         "TFLOPs": round(flops / (gpu / 1e3) / 1e12, 2) if gpu > 0 else None}
        report["cases"][name] = row
        print(name, json.dumps(row), flush=True)
    write_report(a.out, "prefill_attention", report, markdown(report), echo=True)
    return report


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Prefill attention per layer: per-sequence SDPA vs the paged prefill kernel ({r['device']})", "",
             f"torch {r['torch']}, {r['dtype']}, heads {r['heads'][0]} / KV {r['heads'][1]} / dim {r['heads'][2]}, "
             f"blocks of {r['block']} keys. Command: `{r['command']}`. Matmul rate measured in the run: "
             f"{r['matmul_TFLOPs']} TFLOP/s.", "",
             "| case | tokens | GFLOP | SDPA host ms | SDPA GPU ms | SDPA TFLOP/s | kernel host ms | kernel GPU ms | "
             "kernel TFLOP/s | kernel without key ranges GPU ms | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["cases"].items():
        s, k, u = (x[p] for p in PATHS)
        lines.append(f"| {name} | {x['tokens']} | {x['GFLOP']} | {s['host_ms']} | {s['gpu_ms']} | {s['TFLOPs']} | "
                     f"{k['host_ms']} | {k['gpu_ms']} | {k['TFLOPs']} | {u['gpu_ms']} | {x['max_abs_diff']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
