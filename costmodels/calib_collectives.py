"""Collective micro-benchmarks over the GPUs of this machine (NCCL), or CPU processes (gloo)
for tests: all-reduce, all-gather, reduce-scatter, all-to-all and point-to-point (one send/recv
pair) by message size, for every group size 2, 4, ... up to the world size.

    points, errors = bench_collectives(world=2, sizes=default_sizes(), backend="nccl", ops=ALL_OPS)
    tables = costmodels.fit.collective_tables(points)   # measured tables the cost model reads

Message size S (``bytes`` of a point) is the size each cost formula of
``costmodels.collectives`` takes: the all-reduce buffer, the gathered all-gather output, the full
reduce-scatter input, one GPU's all-to-all buffer, the p2p message.

Two timing modes (``mode`` of a point), because the engine runs steps both ways:

* ``graph`` (NCCL only, ``GRAPH_OPS``): K back-to-back calls captured in one
  ``torch.cuda.CUDAGraph``, the replay timed with CUDA events: t = (event span of one replay) / K.
  Decode steps replay as CUDA graphs with their collectives captured (``executors.graphs``), so
  this is their cost.
* ``eager``: K calls launched one by one, timed with CUDA events (perf_counter on CPU), / K.
  Prefill steps run eagerly. All eager points are taken before any graph point.

Each time is the median over ``ROUNDS`` rounds, each round started by a host barrier on a gloo
control group, and the slowest rank's median is kept. A group of g < world GPUs is ranks 0..g-1;
the others wait. Every (op, group size, mode) is tried alone: an error is recorded in ``errors``
and the rest still run; a failed graph capture on any rank skips that point on all ranks (the
ranks agree over the control group before replaying, so no rank waits on a partner's NCCL call).
One process per rank (spawn); rank 0 appends each finished point to a file the parent reads,
so a run stopped at its deadline keeps what it measured. Imports torch: calibration code only.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
ALL_OPS = OPS + ("p2p",)
# ops timed inside CUDA graphs: the ones a captured decode step holds (TP all-reduce, the
# vocab all-gather; reduce-scatter for completeness). NCCL all-to-all and send/recv captured in a
# graph hung at replay on the 2 x H200 machine (torch 2.11), and no engine graph holds them:
# they are timed eagerly only, and the cost model reads their eager tables for every step.
GRAPH_OPS = ("all_reduce", "all_gather", "reduce_scatter")
ROUNDS = 5


def group_sizes(world: int) -> list[int]:
    """Powers of two from 2 up to ``world``."""
    out, g = [], 2
    while g <= world:
        out.append(g)
        g *= 2
    return out


def calls_per_timing(nbytes: int, reps: int) -> int:
    """K calls per timed run: ``reps`` for messages up to 16 MiB, fewer (at least 2) above."""
    return max(2, min(reps, reps * (16 << 20) // max(nbytes, 1)))


def _op_fn(op: str, dist, grp, rank: int, x, full, shard):
    """The call of ``op`` over group ``grp`` (p2p: rank 0 sends x to rank 1)."""
    if op == "all_reduce":
        return lambda: dist.all_reduce(x, group=grp)
    if op == "all_gather":
        return lambda: dist.all_gather_into_tensor(full, shard, group=grp)
    if op == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(shard, x, group=grp)
    if op == "all_to_all":
        return lambda: dist.all_to_all_single(full, x, group=grp)
    if op == "p2p":
        return (lambda: dist.send(x, 1, group=grp)) if rank == 0 else (lambda: dist.recv(full, 0, group=grp))
    raise ValueError(f"unknown collective '{op}'")


def _worker(rank: int, world: int, backend: str, sizes: list[int], init: str, out: str, reps: int,
            ops: tuple[str, ...], modes: tuple[str, ...]) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=120))
    cuda = backend == "nccl"
    ctl = dist.new_group(backend="gloo") if cuda else None  # host-side barriers and agreement
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dt = torch.bfloat16 if cuda else torch.float32
    esize = 2 if cuda else 4
    log = Path(out)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def agree(value: float) -> float:
        """The largest ``value`` over all ranks (host side)."""
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctl)
        return float(t.item())

    def warm(st: dict) -> None:
        """Two calls outside any graph (lazy communicator set-up), on a side stream on CUDA."""
        fn = st["fn"]
        if not cuda:
            fn(), fn()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(), fn()
        torch.cuda.current_stream().wait_stream(side)
        sync()

    def capture(st: dict) -> None:
        st["graph"] = g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(st["k"]):
                st["fn"]()

    def timed(st: dict) -> None:
        """Median over rounds of (one graph replay, or K eager calls) / K, in ms."""
        g, fn, k, times = st.get("graph"), st["fn"], st["k"], []
        if g is not None:
            g.replay()
            sync()
        for _ in range(ROUNDS):
            dist.barrier(group=ctl)
            if not cuda:
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / k)
                continue
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            if g is not None:
                g.replay()
            else:
                for _ in range(k):
                    fn()
            e1.record()
            sync()
            times.append(e0.elapsed_time(e1) / k)
        st["ms"] = statistics.median(times)

    groups = {n: dist.new_group(list(range(n))) for n in group_sizes(world)}  # every rank creates each
    # eager first: a graph replay that hangs (stopped at the deadline) then costs only graph points
    for mode in sorted(modes, key=lambda m: m != "eager"):
        if mode == "graph" and not cuda:
            continue
        for n, grp in groups.items():
            member = rank < n
            for op in ops:
                if op == "p2p" and n != 2:
                    continue  # a pair: measured once, on ranks 0 and 1
                if mode == "graph" and op not in GRAPH_OPS:
                    continue
                for nbytes in sizes:
                    m = max(n, nbytes // esize // n * n)
                    st: dict = {}

                    def alloc(st: dict, m=m) -> None:
                        x = torch.randn(m, device=dev, dtype=dt)
                        full, shard = torch.empty(m, device=dev, dtype=dt), torch.empty(m // n, device=dev, dtype=dt)
                        st.update(fn=_op_fn(op, dist, grp, rank, x, full, shard), k=calls_per_timing(m * esize, reps))

                    steps = [alloc, warm] + ([capture] if mode == "graph" else []) + [timed]
                    err = ""
                    for step in steps:  # all ranks agree after each step: none waits on a failed partner
                        if member and not err:
                            try:
                                step(st)
                            except Exception as e:  # noqa: BLE001 -- this op and mode stop; the rest go on
                                err = f"{type(e).__name__}: {e}"[:300]
                        if agree(1.0 if err else 0.0):
                            err = err or "failed on another rank"
                            break
                    ms = -1.0 if err else agree(st.get("ms", 0.0))  # the slowest member's time
                    if rank == 0:
                        rec = {"op": op, "bytes": m * esize, "n": n, "mode": mode}
                        rec.update({"error": err} if err else {"ms": ms})
                        with log.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                    st.clear()
                    if cuda:
                        sync()
                        torch.cuda.empty_cache()
                    if err:
                        break
        dist.barrier(group=ctl)
    dist.destroy_process_group()


def bench_collectives(world: int, sizes: list[int], backend: str = "nccl", reps: int = 10,
                      ops: tuple[str, ...] = OPS, modes: tuple[str, ...] = ("graph", "eager"),
                      deadline_s: float | None = None, errors: list[dict] | None = None) -> list[dict]:
    """Time per call {op, bytes, n, mode, ms} of each collective at each size and group size.

    Graph mode runs on NCCL only. Failures ({op, n, mode, bytes, error}) go to ``errors`` (when
    given); after ``deadline_s`` seconds the ranks are stopped and what was measured returned."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init, out = os.path.join(tmp, "init"), os.path.join(tmp, "out.jsonl")
        # fresh processes for every backend: a fork of a process whose OpenMP / intra-op threads have
        # run (any torch work before, e.g. an engine in the same test session) can hang in the child
        ctx = mp.start_processes(_worker, args=(world, backend, sizes, init, out, reps, tuple(ops), tuple(modes)),
                                 nprocs=world, join=False, start_method="spawn")
        t0, failure = time.time(), None
        try:
            while not ctx.join(timeout=1.0):
                if deadline_s is not None and time.time() - t0 > deadline_s:
                    failure = f"stopped at the {deadline_s:.0f} s deadline"
                    break
        except Exception as e:  # noqa: BLE001 -- a rank died: keep its partner's points
            failure = f"{type(e).__name__}: {e}"[:500]
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
        recs = [json.loads(line) for line in Path(out).read_text().splitlines()] if Path(out).exists() else []
    if failure:
        if errors is None:
            raise RuntimeError(f"collective benchmark failed: {failure}")
        errors.append({"error": failure})
    if errors is not None:
        errors.extend(r for r in recs if "error" in r)
    return [r for r in recs if "error" not in r]


def default_sizes() -> list[int]:
    """4 KiB to 256 MiB, every factor of 4."""
    return [4096 * 4 ** i for i in range(9)]
