"""Host time of an ungraphed step on one GPU: where a decode step launched from Python spends it.

Llama-3.1-8B shapes, bf16, seeded random weights, one GPU; the stage forward called directly (no
engine, no driver), CUDA graphs off. For each layer backend (``eager``, ``compile``): a decode step at
batch 1 (512-token context) and a 512-token prefill, 20 calls each after 3 warm-up calls: the host time
per call (``host_ms``, before the final synchronisation) and the wall time per call (``wall_ms``);
dynamo's counters over the timed calls; for the decode step, the profiler's table of CPU time by op
(self and total, per step).

    python bench/eager_step_host.py --out DIR      # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def steps(plan, P: int = 512):
    """A 512-token prefill micro-batch and the decode micro-batch after it."""
    from executors.scheduler import Scheduler, Seq, build_microbatch

    sched = Scheduler(8192, plan.scheduler.block_size, 1 << 20, 8)
    sched.add(Seq(req=0, tokens=list(range(10, 10 + P)), prompt_len=P, max_new=64))
    chunks, _ = sched.schedule()
    pre = build_microbatch(chunks, "tp", plan.scheduler.block_size, None)
    for c in chunks:
        c.seq.computed += c.n
        c.seq.tokens.append(5)
    chunks, _ = sched.schedule()
    return pre, build_microbatch(chunks, "tp", plan.scheduler.block_size, None)


def measure(runner, m, reps: int = 20) -> dict:
    import torch._dynamo.utils as du

    with torch.inference_mode():
        for _ in range(3):
            runner.model.forward(m, None)
        torch.cuda.synchronize()
        du.counters.clear()
        t = time.perf_counter()
        for _ in range(reps):
            runner.model.forward(m, None)
        host = (time.perf_counter() - t) / reps * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / reps * 1e3
    return {"host_ms": round(host, 3), "wall_ms": round(wall, 3), "counters": {k: dict(v) for k, v in du.counters.items()}}


def profile(runner, m) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof

    with torch.inference_mode(), prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            runner.model.forward(m, None)
        torch.cuda.synchronize()
    ka = p.key_averages()
    return {"self_cpu_us": [(e.key[:70], round(e.self_cpu_time_total / 3), e.count // 3)
                            for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:40]],
            "total_cpu_us": [(e.key[:70], round(e.cpu_time_total / 3), e.count // 3)
                             for e in sorted(ka, key=lambda e: -e.cpu_time_total)[:40]]}


def main() -> None:
    from bench.common import write_report
    from bench.mesh_speed import mesh_plan
    from executors.config import model_args
    from executors.parallel import Par
    from executors.worker import RankRunner, WorkerSpec
    from graph.hf_config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--backends", default="eager,compile")
    args = ap.parse_args()
    cfg = load_config(preset="llama-3.1-8b")
    a = model_args(cfg)
    plan = mesh_plan(cfg, "single", 1, 128, 8192)
    report = {"command": "python bench/eager_step_host.py --out DIR", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "model": "llama-3.1-8b shapes, bf16, random weights", "runs": {}}
    for backend in args.backends.split(","):
        spec = WorkerSpec(plan.model_dump_json(), a.portable(), None, 0, "cuda", 2048, backend, False)
        runner = RankRunner(spec, Par(device=torch.device("cuda", 0)))
        pre, dec = steps(plan)
        for tag, m in (("decode", dec), ("prefill512", pre)):
            r = measure(runner, m)
            if tag == "decode":
                r.update(profile(runner, m))
            report["runs"][f"{backend}_{tag}"] = r
            lines = [f"# Host time of ungraphed steps: {report['model']}, {report['device']}, torch {report['torch']}", "",
                     f"Command: `{report['command']}`. Milliseconds per step call (20 calls).", "",
                     "| backend, step | host | wall |", "|---|---|---|"]
            lines += [f"| {k} | {v['host_ms']} | {v['wall_ms']} |" for k, v in report["runs"].items()]
            write_report(args.out, "eager_step_host", report, "\n".join(lines) + "\n")  # after each: a cut run keeps its rows
        del runner
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
