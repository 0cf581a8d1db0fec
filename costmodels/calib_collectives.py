"""Collective micro-benchmarks over the GPUs of this machine (NCCL), or CPU processes (gloo)
for tests: all-reduce, all-gather, reduce-scatter and all-to-all over a range of sizes.

    points = bench_collectives(world=8, sizes=[...], backend="nccl")
    fit = costmodels.fit.fit_collectives(points)    # alpha/bandwidth for costmodels.collectives

One process per rank (torch.multiprocessing.spawn); rank 0 writes the timings to a file the
parent reads back. Times are medians over rounds of ``reps`` back-to-back calls, per call.
Imports torch: calibration code only.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def _worker(rank: int, world: int, backend: str, sizes: list[int], init: str, out: str, reps: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    cuda = backend == "nccl"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dt = torch.bfloat16 if cuda else torch.float32
    esize = 2 if cuda else 4
    points = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for nbytes in sizes:
        n = max(world, nbytes // esize // world * world)
        x = torch.randn(n, device=dev, dtype=dt)
        shard = torch.empty(n // world, device=dev, dtype=dt)
        full = torch.empty(n, device=dev, dtype=dt)
        calls = {
            "all_reduce": lambda: dist.all_reduce(x),
            "all_gather": lambda: dist.all_gather_into_tensor(full, shard),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, x),
            "all_to_all": lambda: dist.all_to_all_single(full, x),
        }
        for op in OPS:
            fn = calls[op]
            for _ in range(3):
                fn()
            sync()
            times = []
            for _ in range(5):
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                sync()
                times.append((time.perf_counter() - t0) * 1e3 / reps)
            points.append({"op": op, "bytes": n * esize, "n": world, "ms": statistics.median(times)})
    if rank == 0:
        Path(out).write_text(json.dumps(points))
    dist.barrier()
    dist.destroy_process_group()


def bench_collectives(world: int, sizes: list[int], backend: str = "nccl", reps: int = 10) -> list[dict]:
    """Median time per call of each collective at each size (bytes of the full buffer)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        # fresh processes for every backend: a fork of a process whose OpenMP / intra-op threads have
        # run (any torch work before, e.g. an engine in the same test session) can hang in the child
        mp.start_processes(_worker, args=(world, backend, sizes, init, out, reps), nprocs=world, join=True,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def default_sizes() -> list[int]:
    """4 KiB to 256 MiB, every factor of 4."""
    return [4096 * 4 ** i for i in range(9)]
