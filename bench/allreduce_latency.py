"""Small all-reduces on the GPUs of one node: what a TP decode step's 2 x layers all-reduces cost
each way (issue 12, point 4: "small all-reduces not bound by launches").

A decode step at batch B all-reduces ``[B, hidden]`` twice per layer. Timed, per call, for B in
1, 8, 32, 128 rows of 4,096 bf16 values (8 KiB to 1 MiB), on every GPU of the node at once:

* ``nccl_eager``: ``dist.all_reduce`` launched from Python, 200 back to back;
* ``nccl_graph``: 64 of them captured in one CUDA graph, replayed (how decode graphs run them);
* ``symm_eager`` / ``symm_graph``: PyTorch symmetric memory's one-shot all-reduce
  (``torch.ops.symm_mem.one_shot_all_reduce``: each GPU reads its peers' buffers over NVLink and
  sums; no NVLink multicast), the same two ways;
* ``unfused_graph`` / ``fused_graph``: what a layer does with the sum, in a graph: the one-shot
  all-reduce then the residual add and RMSNorm (one compiled kernel), against the three in one
  kernel (``executors.reduce_norm``); ``fused_same_bits`` whether they agree bit for bit;
* ``ll_graph``: the same kernel's LL protocol (``SHIFTPLAN_REDUCE_LL``: the flag in each data word),
  ``ll_same_bits`` whether it gives the flag protocol's bits (its norm sums the squares in another
  order, so ``y`` may differ in a last bit: ``ll_max_diff``).

A variant that fails records its error; the rest go on.

    python bench/allreduce_latency.py --out DIR       # every GPU of this machine (2 or more)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROWS = (1, 8, 32, 128)
HIDDEN = 4096
CALLS = 64


def _time(fn, reps: int) -> float:
    """Microseconds per call of ``fn`` (CUDA events, after a warm-up), all ranks started together."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def _graph(call) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            call()
    return g


def _fused(row: dict, x: torch.Tensor, group, dev: torch.device) -> None:
    """A layer's all-reduce + residual add + RMSNorm: one kernel (``executors.reduce_norm``, through
    ``OneShotAllReduce.add_norm``) against the one-shot all-reduce followed by the add and the norm
    compiled into one kernel (the unfused path of compiled layers); both in CUDA graphs. Records
    whether the two give the same bits."""
    from executors.layers import rms_norm
    from executors.parallel import OneShotAllReduce

    ar = OneShotAllReduce(group, x.dtype, dev)
    x = torch.randn(x.shape, device=dev).to(x.dtype)  # this rank's term (the x above was summed in place)
    g = torch.Generator(device=dev).manual_seed(1)  # the same residual and weight on every rank
    res = torch.randn(x.shape, device=dev, generator=g).to(x.dtype)
    w = torch.randn(x.shape[-1], device=dev, generator=g).to(x.dtype)
    add_norm = torch.compile(lambda s: (lambda h: (h, rms_norm(h, w, 1e-5)))(s + res))
    fused = lambda: ar.add_norm(x, res, w, 1e-5)  # noqa: E731
    unfused = lambda: add_norm(ar(x))  # noqa: E731
    (h1, y1), (h2, y2) = fused(), unfused()
    row["fused_same_bits"] = bool(torch.equal(h1, h2) and torch.equal(y1, y2))
    row["fused_max_diff"] = float(max((h1.float() - h2.float()).abs().max(), (y1.float() - y2.float()).abs().max()))
    row["fused_graph_us"] = round(_time(_graph(fused).replay, 10) / CALLS, 2)
    row["unfused_graph_us"] = round(_time(_graph(unfused).replay, 10) / CALLS, 2)
    from executors import reduce_norm

    reduce_norm.LL, before = True, reduce_norm.LL
    try:  # the LL protocol on the same inputs; its failure keeps the rows above
        ll = OneShotAllReduce(group, x.dtype, dev)
        fused_ll = lambda: ll.add_norm(x, res, w, 1e-5)  # noqa: E731
        h3, y3 = fused_ll()
        row["ll_same_bits"] = bool(torch.equal(h1, h3) and torch.equal(y1, y3))
        row["ll_max_diff"] = float(max((h1.float() - h3.float()).abs().max(), (y1.float() - y3.float()).abs().max()))
        row["ll_graph_us"] = round(_time(_graph(fused_ll).replay, 10) / CALLS, 2)
    except Exception as e:  # noqa: BLE001
        row["ll_error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        reduce_norm.LL = before


def join(rank: int, world: int, port: int) -> torch.device:
    """This process as rank ``rank`` of ``world`` NCCL ranks on the loopback address; its GPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    return dev


def _rank(rank: int, world: int, port: int, out: str) -> None:
    dev = join(rank, world, port)
    group = dist.group.WORLD
    rows: list[dict] = []
    for n in ROWS:
        row: dict = {"rows": n, "bytes": n * HIDDEN * 2}
        x = torch.randn(n, HIDDEN, dtype=torch.bfloat16, device=dev)
        try:
            row["nccl_eager_us"] = round(_time(lambda: dist.all_reduce(x), 200), 2)
            g = _graph(lambda: dist.all_reduce(x))
            row["nccl_graph_us"] = round(_time(g.replay, 10) / CALLS, 2)
        except Exception as e:  # noqa: BLE001 - reported in the results
            row["nccl_error"] = f"{type(e).__name__}: {e}"[:300]
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(n, HIDDEN, dtype=torch.bfloat16, device=dev)
            symm_mem.rendezvous(buf, group.group_name)
            buf.copy_(x)
            op = lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name)  # noqa: E731
            got = op()
            ref = x.clone()
            dist.all_reduce(ref)
            row["symm_matches_nccl"] = bool(torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2))
            row["symm_eager_us"] = round(_time(op, 200), 2)
            g = _graph(op)
            row["symm_graph_us"] = round(_time(g.replay, 10) / CALLS, 2)
        except Exception as e:  # noqa: BLE001
            row["symm_error"] = f"{type(e).__name__}: {e}"[:300]
        try:
            _fused(row, x, group, dev)
        except Exception as e:  # noqa: BLE001
            row["fused_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(rank, json.dumps(row), flush=True)
    finish(rank, out, {"command": "python bench/allreduce_latency.py --out DIR", "hidden": HIDDEN, "dtype": "bf16",
                       "calls_per_graph": CALLS, "rows": rows})


def finish(rank: int, out: str, report: dict) -> None:
    """Rank 0 writes ``report`` (with the device, GPU count, driver, torch and NCCL versions) to
    ``out``; every rank leaves the process group."""
    if rank == 0:
        from bench.common import driver_version

        Path(out).write_text(json.dumps({
            "command": report.pop("command"), "device": torch.cuda.get_device_name(), "gpus": dist.get_world_size(),
            "driver": driver_version(), "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            **report}, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(rank_fn, name: str, description: str, port: int) -> tuple[Path, dict]:
    """``--out DIR [--port P]``: ``rank_fn(rank, world, port, DIR/name.json)`` on every GPU of this
    machine (2 or more); returns DIR and the report rank 0 wrote."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--port", type=int, default=port)
    args = ap.parse_args()
    world = torch.cuda.device_count()
    if world < 2:
        sys.exit("error: needs 2 or more GPUs")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    mp.spawn(rank_fn, args=(world, args.port, str(path)), nprocs=world)
    return args.out, json.loads(path.read_text())


def main() -> None:
    out, r = spawn_ranks(_rank, "allreduce_latency", __doc__.splitlines()[0], 29541)
    lines = [f"# Small all-reduces: {r['gpus']} x {r['device']}, driver {r.get('driver', '-')}, torch {r['torch']}, "
             f"NCCL {r['nccl']}", "",
             f"Command: `{r['command']}`. Per call, microseconds; graph = {CALLS} calls captured in one CUDA graph.", "",
             "| rows x 4096 bf16 | bytes | NCCL eager | NCCL in graph | symm-mem one-shot eager | symm-mem in graph "
             "| one-shot + add + norm in graph | fused all-reduce + add + norm in graph | same bits "
             "| fused, LL protocol, in graph | LL same bits |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        cells = [x.get(k, x.get(k.split("_")[0] + "_error", "-")) for k in
                 ("nccl_eager_us", "nccl_graph_us", "symm_eager_us", "symm_graph_us", "unfused_graph_us",
                  "fused_graph_us", "fused_same_bits", "ll_graph_us", "ll_same_bits")]
        lines.append(f"| {x['rows']} | {x['bytes']} | " + " | ".join(str(c) for c in cells) + " |")
    (out / "allreduce_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
