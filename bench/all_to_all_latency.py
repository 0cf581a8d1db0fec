"""Ulysses' all-to-all on the GPUs of one node: NCCL launched from Python against the LL kernel over
symmetric memory (``executors.all_to_all``), eagerly and captured in a CUDA graph.

An SP x TP step of Llama-3.1-8B on ``sp`` GPUs exchanges each layer's packed q, k, v (``T / sp``
tokens x 48 heads of 128 bf16 on this rank, 32 query + 2 x 8 KV heads) and then the attention
output (``T / sp`` x 32 heads): twice a layer. Timed per call for the first exchange at step sizes
``T`` of 2 (a batch-1 decode padded to the group), 64, 512 and 2,048 tokens, on every GPU at once:

* ``nccl_eager``: ``dist.all_to_all_single``, 100 back to back;
* ``ll_eager`` / ``ll_graph``: the LL kernel (``parallel.SymmAllToAll``), 100 back to back, and 64
  calls captured in one CUDA graph, replayed (what a graphed SP x TP step would run);
* ``same_bits``: whether the LL kernel's result equals NCCL's;
* ``ll_graph_us_p{P}``: the LL kernel in a graph with ``P`` programs instead of
  ``executors.all_to_all.PROGRAMS`` (``PROGRAM_VARIANTS``): a call's program count is fixed for the
  life of its buffer, so each variant gets its own buffer, made before any timing.

A variant that fails records its error; the rest go on.

    python bench/all_to_all_latency.py --out DIR       # every GPU of this machine (2 or more)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.allreduce_latency import CALLS, _graph, _time, finish, join, spawn_ranks  # noqa: E402

TOKENS = (2, 64, 512, 2048)
PROGRAM_VARIANTS = (64, 128)
HEADS, HEAD_DIM = 32 + 2 * 8, 128


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from executors import all_to_all as a2a
    from executors.parallel import SymmAllToAll, all_to_all

    dev = join(rank, world, port)
    group = dist.group.WORLD
    largest = max(TOKENS) // world * HEADS * HEAD_DIM * 2  # the largest chunk a peer gets
    default = a2a.PROGRAMS
    symm = SymmAllToAll(group, dev, largest)
    variants = {}
    for p in PROGRAM_VARIANTS:  # the kernel reads PROGRAMS at each launch: set around every call of a variant
        a2a.PROGRAMS = p
        variants[p] = SymmAllToAll(group, dev, largest)
    a2a.PROGRAMS = default

    def with_programs(p: int, fn):
        def call():
            a2a.PROGRAMS = p
            try:
                return fn()
            finally:
                a2a.PROGRAMS = default
        return call
    rows: list[dict] = []
    for T in TOKENS:
        n = max(1, T // world)
        x = torch.randn(world, n, HEADS, HEAD_DIM, device=dev).to(torch.bfloat16)
        row: dict = {"tokens": T, "bytes_per_rank": x.numel() * 2}
        try:
            ref = all_to_all(x, group)
            row["nccl_eager_us"] = round(_time(lambda: all_to_all(x, group), 100), 2)
        except Exception as e:  # noqa: BLE001 - reported in the results
            row["nccl_error"] = f"{type(e).__name__}: {e}"[:300]
            ref = None
        try:
            got = symm(x)
            row["same_bits"] = bool(ref is not None and torch.equal(got.view(torch.int16), ref.view(torch.int16)))
            row["ll_eager_us"] = round(_time(lambda: symm(x), 100), 2)
            row["ll_graph_us"] = round(_time(_graph(lambda: symm(x)).replay, 10) / CALLS, 2)
            row["ll_same_bits_after_graph"] = bool(ref is not None and torch.equal(symm(x).view(torch.int16),
                                                                                  ref.view(torch.int16)))
        except Exception as e:  # noqa: BLE001
            row["ll_error"] = f"{type(e).__name__}: {e}"[:300]
        for p, v in variants.items():
            try:
                call = with_programs(p, lambda v=v: v(x))
                row[f"same_bits_p{p}"] = bool(ref is not None and torch.equal(call().view(torch.int16), ref.view(torch.int16)))
                row[f"ll_graph_us_p{p}"] = round(_time(_graph(call).replay, 10) / CALLS, 2)
            except Exception as e:  # noqa: BLE001
                row[f"ll_p{p}_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(rank, json.dumps(row), flush=True)
    finish(rank, out, {"command": "python bench/all_to_all_latency.py --out DIR", "heads": HEADS, "head_dim": HEAD_DIM,
                       "dtype": "bf16", "calls_per_graph": CALLS, "programs": default,
                       "program_variants": list(PROGRAM_VARIANTS), "rows": rows})


def main() -> None:
    out, r = spawn_ranks(_rank, "all_to_all_latency", __doc__.splitlines()[0], 29543)
    lines = [f"# Ulysses' all-to-all: {r['gpus']} x {r['device']}, driver {r['driver']}, torch {r['torch']}, "
             f"NCCL {r['nccl']}", "",
             f"Command: `{r['command']}`. Per call, microseconds; graph = {CALLS} calls captured in one CUDA graph; "
             f"each rank sends T / {r['gpus']} tokens x {HEADS} heads x {HEAD_DIM} bf16 per peer.", "",
             f"LL with {r.get('programs', '-')} programs (the kernel's count); the last columns: in a graph with "
             "other program counts.", "",
             "| step tokens T | bytes a rank | NCCL eager | LL eager | LL in graph | LL = NCCL bits | "
             + " | ".join(f"LL in graph, {p} programs" for p in r.get("program_variants", [])) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(r.get("program_variants", []))]
    for x in r["rows"]:
        cells = [x.get(k, x.get(k.split("_")[0] + "_error", "-")) for k in
                 ("nccl_eager_us", "ll_eager_us", "ll_graph_us", "same_bits")]
        cells += [x.get(f"ll_graph_us_p{p}", "-") if x.get(f"same_bits_p{p}", False) else
                  x.get(f"ll_p{p}_error", "wrong bits") for p in r.get("program_variants", [])]
        lines.append(f"| {x['tokens']} | {x['bytes_per_rank']} | " + " | ".join(str(c) for c in cells) + " |")
    (out / "all_to_all_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
