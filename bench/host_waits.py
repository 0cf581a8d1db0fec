"""Where the single-rank engine's driver waits for the GPU: host-blocking CUDA calls, by code site.

A single-rank engine launches each step in the driver's own process, so a launch that waits for the
GPU (a synchronize, an event wait, a copy from pageable host memory, which CUDA stages behind the
stream's queued work) also holds back the forming of the next step and the reading of the last
step's tokens. This finds those waits.

The fidelity case ``single`` of a model (``bench/fidelity_2gpu.py``'s plan, traffic and warm-up;
seeded random weights) is replayed once to warm up, then once under ``torch.profiler`` (CPU ops,
CUDA runtime calls, Python stacks). Each CUDA runtime call that held the host at least ``--min-us``
is charged to the project frames on its stack (the innermost ``--frames`` of them, found through the
profiler's parent events); the report sums count, total and largest time per site. On a GPU the
same traffic is replayed a third time under ``torch.cuda.set_sync_debug_mode("warn")``, which names
every call PyTorch knows synchronises (``.item()``, ``.tolist()``, a copy to the host), by site.

    python bench/host_waits.py --out DIR                      # Qwen2-VL-7B shapes on one GPU
    python bench/host_waits.py --out DIR --model llama
    python bench/host_waits.py --out DIR --tiny               # CPU dry run (no CUDA runtime calls)

Writes DIR/host_waits.{json,md}.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJECT = re.compile(r"(executors|planner|plans|costmodels|graph|bench)/[\w/]+\.py\(\d+\): \w+")
# CUDA runtime calls that can hold the host until queued GPU work is done
BLOCKING = ("Synchronize", "Memcpy", "Memset", "Malloc", "Free", "HostAlloc", "EventQuery")


def project_frames(names: list[str], frames: int) -> str:
    """The innermost ``frames`` project frames of a stack (innermost first), as one site key."""
    out = []
    for n in names:
        m = PROJECT.search(n)
        if m and (not out or out[-1] != m.group(0)):
            out.append(m.group(0))
        if len(out) == frames:
            break
    return " < ".join(out) or "(no project frame)"


def stack_of(evt: Any) -> list[str]:
    """An event's Python stack, innermost first: the first ``stack`` found on it or its parents,
    else the names of its parent events (python_function events name ``file(line): func``)."""
    names, e = [], evt
    while e is not None:
        if getattr(e, "stack", None):
            return names + list(e.stack)
        names.append(e.name)
        e = e.cpu_parent
    return names


def python_call(stack: list[str]) -> str:
    """The innermost Python-level call on a stack (``<built-in method tolist ...>`` as ``tolist``):
    which line of the innermost project frame waited."""
    for n in stack:
        m = re.match(r"<built-in (?:method|function) (\w+)", n)
        if m:
            return m.group(1)
    return "?"


PYTHON_EVENT = re.compile(r"^(\S+\.py\(\d+\): |<built-in )")  # the profiler's python_function events


def enclosing(events: list[Any]) -> Callable[[Any], list[str]]:
    """For an event, the names of the Python function events whose time span holds it, innermost
    (latest started) first: its stack when the profiler links no parent to it (CUDA runtime calls
    are recorded by another tracer than the Python calls, so their parents are often missing)."""
    import numpy as np

    py = sorted((e for e in events if PYTHON_EVENT.match(e.name)), key=lambda e: e.time_range.start)
    start = np.array([e.time_range.start for e in py], dtype=np.float64)
    end = np.array([e.time_range.end for e in py], dtype=np.float64)

    def of(e: Any) -> list[str]:
        held = np.nonzero((start <= e.time_range.start) & (end >= e.time_range.end))[0]
        return [py[i].name for i in held[::-1]]
    return of


def runtime_waits(events: list[Any], min_us: float, frames: int) -> dict[str, dict[str, Any]]:
    """Per (runtime call, site): count, total and largest host time (us) of the blocking-kind CUDA
    runtime calls of at least ``min_us``."""
    sites: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "total_us": 0.0, "max_us": 0.0})
    waits = [e for e in events if e.name.startswith("cuda") and any(b in e.name for b in BLOCKING)
             and e.time_range.elapsed_us() >= min_us]
    held = enclosing(events) if waits else None
    for e in waits:
        us = e.time_range.elapsed_us()
        stack = stack_of(e)
        if not PROJECT.search(" ".join(stack)):
            stack = held(e)
        s = sites[f"{e.name} in {python_call(stack)} @ {project_frames(stack, frames)}"]
        s["count"] += 1
        s["total_us"] += us
        s["max_us"] = max(s["max_us"], us)
    return dict(sites)


def sync_warnings(run: Any, frames: int) -> dict[str, int]:
    """Sites of the synchronising calls PyTorch warns of while ``run()`` runs (CUDA only)."""
    import torch

    sites: dict[str, int] = defaultdict(int)

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if str(message).startswith("Synchronization debug mode is a prototype"):  # the mode's own notice
            return
        stack = [f"{Path(f.filename).relative_to(ROOT) if f.filename.startswith(str(ROOT)) else f.filename}"
                 f"({f.lineno}): {f.name}" for f in reversed(traceback.extract_stack())]
        sites[f"{str(message)[:60]} @ {project_frames(stack, frames)}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(sites)


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Host waits of the single-rank engine: {r['model']}", "",
             f"Device {r['device']}, driver {r.get('driver', '-')}, torch {r['torch']}, Python {r['python']}. Command: `{r['command']}`.", "",
             f"Traffic: {r['requests']} requests over {r['duration_s']} s at {r['rate_rps']:.4g} req/s "
             f"({r['fraction']} of the predicted capacity); profiled replay {r['profiled_wall_s']} s "
             f"(unprofiled {r['replay_wall_s']} s).", "",
             f"## CUDA runtime calls that held the host at least {r['min_us']} us", "",
             "| call @ site (innermost project frames first) | count | total ms | largest ms |", "|---|---|---|---|"]
    for k, s in sorted(r["runtime_waits"].items(), key=lambda kv: -kv[1]["total_us"]):
        lines.append(f"| `{k}` | {s['count']} | {s['total_us'] / 1e3:.1f} | {s['max_us'] / 1e3:.2f} |")
    if r.get("sync_warnings") is not None:
        lines += ["", "## Synchronising calls PyTorch names (`set_sync_debug_mode`)", "",
                  "| warning @ site | count |", "|---|---|"]
        lines += [f"| `{k}` | {n} |" for k, n in sorted(r["sync_warnings"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="qwen2-vl", help="a model of bench/fidelity_2gpu.py (llama, qwen2-vl)")
    ap.add_argument("--fraction", type=float, default=0.5, help="arrival rate as a fraction of the predicted capacity")
    ap.add_argument("--duration", type=float, default=None, help="seconds of traffic (default 5; 0.05 with --tiny)")
    ap.add_argument("--min-us", type=float, default=200.0, help="shortest host wait reported")
    ap.add_argument("--frames", type=int, default=4, help="project frames that name a site")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny configs")
    a = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import executors
    from bench.common import command_line, driver_version, write_report
    from bench.fidelity_2gpu import MODELS, cap_kv, case_plan, longest_request, model_spec, predicted_capacity
    from costmodels.simulator import cost_model_for_plan
    from planner.bench_workload import engine_requests, replay_context, replay_requests, sample_requests
    from planner.inputs import cost_model_of, workload_of

    if a.model not in MODELS:
        ap.error(f"--model: unknown {a.model!r}; known: {', '.join(MODELS)}")
    device = "cpu" if a.tiny else "cuda"
    duration = a.duration or (0.05 if a.tiny else 5.0)
    max_seqs, max_tokens = (8, 256) if a.tiny else (64, 8192)
    spec, _cfg = model_spec(a.model, a.tiny, "eager" if a.tiny else "compile")
    cost, _ = cost_model_of(spec)
    wl = workload_of(spec, cost.info)
    plan = cap_kv(case_plan(a.model, spec, cost, "single", max_seqs, max_tokens), max_seqs * longest_request(wl)).check()
    cap = predicted_capacity(plan, cost_model_for_plan(plan), wl, a.seed)
    rwl, reqs = sample_requests(wl, rate=a.fraction * cap["rps"], duration=duration, seed=a.seed)
    _, warm = sample_requests(wl, rate=a.fraction * cap["rps"], duration=duration, seed=a.seed + 1000)
    model = f"tiny {MODELS[a.model]['tiny']} config" if a.tiny else MODELS[a.model]["preset"] + " shapes"
    report: dict[str, Any] = {
        "command": command_line("bench/host_waits.py", argv), "model": model,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "driver": driver_version(),
        "torch": torch.__version__,
        "python": platform.python_version(), "mesh": plan.mesh.label(), "fraction": a.fraction,
        "rate_rps": rwl.rate, "requests": len(reqs), "duration_s": duration, "min_us": a.min_us}
    ctx = replay_context(plan, None, warm + reqs, new_tokens=4)
    with executors.load(plan, device=device, backend=None if a.tiny else "compile", seed=a.seed,
                        max_context=ctx) as eng:
        v = eng.args.vision
        eng.generate(engine_requests(warm[:2 * max_seqs], eng.args.vocab, eng.args.image_token_id,
                                     v.patch_dim if v else 0, v.merge if v else 2, a.seed + 1000), max_new_tokens=4)
        t = time.perf_counter()
        replay_requests(eng, warm, a.seed + 1000)  # the step shapes of this traffic, graphs captured
        report["replay_wall_s"] = round(time.perf_counter() - t, 2)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        t = time.perf_counter()
        with profile(activities=acts, with_stack=True) as prof:
            replay_requests(eng, reqs, a.seed)
        report["profiled_wall_s"] = round(time.perf_counter() - t, 2)
        report["runtime_waits"] = runtime_waits(list(prof.events()), a.min_us, a.frames)
        report["sync_warnings"] = (sync_warnings(lambda: replay_requests(eng, reqs, a.seed), a.frames)
                                   if device == "cuda" else None)
    write_report(a.out, "host_waits", report, markdown(report), echo=True)
    return report


if __name__ == "__main__":
    main()
