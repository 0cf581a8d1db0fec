"""Where one step's time goes: a request shape run on the engine, its step traced and profiled.

A fidelity trace (``bench/fidelity_2gpu.py --trace``) says how long each step took on the GPU next to
what the cost model predicts; this script says why one kind of step takes longer. For each
``--requests`` shape (text tokens and the image patch counts of one request; a request of
``--tokens`` text tokens alone as a control) it runs that request ``--reps`` times on a loaded
engine (two new tokens each: the prompt's step is the one looked at), with the step trace on, and
then once more under ``torch.profiler`` (CPU ops and CUDA kernels). Reported per shape:

* each rep's prompt step: the tower's and the forward's GPU ms (CUDA events) and the forward's host
  ms (``executors.trace``), beside the cost model's prediction of the same step;
* from the profiled rep: the GPU's busy time (the union of its kernels' intervals) against the
  step's span, and its idle gaps of ``--gap-ms`` or more, each with the host ops that ran during
  it (the outermost CPU ops overlapping the gap, longest first): a gap is the GPU waiting for the
  host, and its ops say on what;
* the profiled rep's top ``--top`` CUDA kernels and CPU ops by self time;
* the GPU's SM clock and power while each rep (and the preamble) ran (``bench.common.ClockLog``).
  With ``--heat-s S`` the reps alternate: ``cold`` after ``--rest-s`` idle seconds, ``hot`` after S
  seconds of back-to-back matmuls (``bench.common.heat``), which bring the GPU to its power limit and
  the SM clock that limit allows; the calibration's tables were timed in short bursts.

``--preamble RATE`` first replays ``--preamble-s`` seconds of the report's workload at RATE req/s
under the profiler, as a fidelity rate runs it: each of its prompt steps beside its prediction, and
the GPU's idle gaps of the whole replay summed by the host ops overlapping them (outermost, and
innermost: the runtime calls). A shape fast alone but slow while serving points at what serving
adds (on one H200: eager prefill steps of new lengths stalled on cuDNN's SDPA plans,
``executors.attention.SDPA_BACKENDS``).

The plan is a fidelity report's pinned case (``--report`` JSON, ``--model``, ``--case``: its
``plan_yaml``), loaded with seeded random weights written once as a checkpoint on the device.

    python bench/step_profile.py --out DIR --requests 4033:4784,4784,4784,1024 \\
        --requests 2914:4784,4096,1024,1024 --requests 1531:4784 --tokens 4000       # step_profile.md
    python bench/step_profile.py --out DIR --preamble 12.1 --preamble-s 5 --gap-ms 1 --reps 2 \\
        --requests 2362:4096,4784                                                     # step_profile.serving.md
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

ACTIVITIES = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]


def parse_shape(text: str) -> tuple[int, list[int]]:
    """``TOKENS:P1,P2,..`` (a request of TOKENS prompt tokens in all, images of P_i patches) or
    ``TOKENS`` (text only) -> ``(text tokens, patches)``; the image tokens (``P / 4`` each, Qwen2-VL's
    2x2 merge) are part of TOKENS."""
    tokens, _, imgs = text.partition(":")
    try:
        patches = [int(p) for p in imgs.split(",") if p]
        text_tokens = int(tokens) - sum(p // 4 for p in patches)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give TOKENS or TOKENS:P1,P2,.. (integers)") from None
    if text_tokens < 1 or any(p < 4 for p in patches):
        raise argparse.ArgumentTypeError(f"{text!r}: the images' tokens (patches / 4 each) must leave at least one "
                                         "text token, and an image has at least 4 patches")
    return text_tokens, patches


def make_request(text_tokens: int, patches: list[int], a: Any, seed: int) -> Any:
    """An engine request of random ids and random pixels (``planner.bench_workload``'s requests)."""
    from costmodels.workload import Request as WorkloadRequest
    from planner.bench_workload import engine_requests

    wr = WorkloadRequest(id=0, arrival_s=0.0, text_tokens=text_tokens, output_tokens=2,
                         image_patches=tuple(patches), image_tokens=tuple(p // 4 for p in patches))
    v = a.vision
    return engine_requests([wr], a.vocab, a.image_token_id, v.patch_dim if v else 0, v.merge if v else 2, seed)[0]


def gpu_gaps(events: list[Any], gap_us: float, max_gaps: int = 50) -> dict[str, Any]:
    """Busy time, span and idle gaps of the CUDA kernels among profiler ``events`` (microseconds),
    each gap with the outermost CPU ops overlapping it."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    if not kernels:
        return {"busy_ms": 0.0, "span_ms": 0.0, "gaps": []}
    busy, gaps = 0.0, []
    cur_s, cur_e = kernels[0]
    for s, e in kernels[1:] + [(float("inf"), float("inf"))]:
        if s > cur_e:
            busy += cur_e - cur_s
            if s - cur_e >= gap_us and s != float("inf"):
                gaps.append((cur_e, s))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    out = []
    cpu.sort(key=lambda e: e.time_range.start)
    starts = [e.time_range.start for e in cpu]
    longest = max((e.time_range.end - e.time_range.start for e in cpu), default=0.0)
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:max_gaps]:
        lo, hi = bisect.bisect_left(starts, a - longest), bisect.bisect_left(starts, b)
        inside = [e for e in cpu[lo:hi] if e.time_range.end > a]
        def within(e: Any, o: Any) -> bool:
            return o is not e and o.time_range.start <= e.time_range.start and o.time_range.end >= e.time_range.end

        def named(es: list[Any]) -> list[str]:
            es = sorted(es, key=lambda e: -(min(e.time_range.end, b) - max(e.time_range.start, a)))[:6]
            return [f"{e.name} ({(min(e.time_range.end, b) - max(e.time_range.start, a)) / 1e3:.2f} ms)" for e in es]

        out.append({"at_ms": round((a - kernels[0][0]) / 1e3, 3), "ms": round((b - a) / 1e3, 3),
                    "host_ops": named([e for e in inside if not any(within(e, o) for o in inside)]),
                    "innermost": named([e for e in inside if not any(within(o, e) for o in inside)])})
    return {"busy_ms": round(busy / 1e3, 3), "span_ms": round((kernels[-1][1] - kernels[0][0]) / 1e3, 3),
            "gaps": out}


def top_ops(prof: Any, key: str, n: int = 15) -> list[dict[str, Any]]:
    rows = sorted(prof.key_averages(), key=lambda r: -getattr(r, key))[:n]
    return [{"name": r.key[:90], "calls": r.count, "self_ms": round(getattr(r, key) / 1e3, 3)} for r in rows]


def predicted(record: dict[str, Any], coster: Any, encoder: Any) -> tuple[float, float]:
    """``(tower, forward)`` ms the cost model predicts for a traced step, as ``bench/step_fidelity.py``
    costs it (the tower where the plan encodes in the step and the record names patches)."""
    from bench import step_fidelity as sf

    forward = sf.cost_steps([record], coster)[0]["predicted_ms"]
    return (sf.cost_steps([record], coster, encoder)[0]["predicted_ms"] - forward if encoder else 0.0), forward


def prompt_step(trace: list[dict[str, Any]]) -> dict[str, Any]:
    """The step of a 2-token request that ran its prompt (the one with more tokens than sequences)."""
    return max(trace, key=lambda r: r["tokens"])


def serve_first(eng: Any, report: dict[str, Any], model: str, rate: float, duration: float, coster: Any,
                gap_us: float) -> dict[str, Any]:
    """Replay ``duration`` s of the report's workload at ``rate`` req/s on ``eng`` (the fidelity run's
    requests, another seed) under the profiler: the engine's state after serving, before the shapes
    run; its prompt steps against their predictions, the GPU's idle gaps by host op, and the replay's
    wall-clock span (``clock``, turned into the GPU clock's window by ``run``)."""
    from bench.fidelity_2gpu import model_spec
    from planner.bench_workload import replay_requests, sample_requests
    from planner.inputs import cost_model_of, workload_of

    spec, _cfg = model_spec(model, False, report["backend"])
    wl = workload_of(spec, cost_model_of(spec)[0].info)
    _wl, reqs = sample_requests(wl, rate=rate, duration=duration, seed=7)
    t, t0 = time.perf_counter(), time.time()
    eng.step_trace.clear()
    with torch.profiler.profile(activities=ACTIVITIES) as prof:
        replay_requests(eng, reqs, 7)
        torch.cuda.synchronize()
    wall = round(time.perf_counter() - t, 1)
    return {"rate_rps": rate, "requests": len(reqs), "wall_s": wall, "graphs": eng.graph_captures(),
            "clock": (t0, time.time()),
            "steps": slow_steps(eng.step_trace, coster), "gaps": gap_ops(list(prof.events()), gap_us)}


def slow_steps(trace: list[dict[str, Any]], coster: Any) -> list[dict[str, Any]]:
    """The traced prompt (not all-decode) steps of a replay: forward GPU ms beside the prediction."""
    rows = []
    for r in trace:
        if all(n == 1 for m in r["new"] for n in m):
            continue
        rk = r.get("rank") or {}
        rows.append({"tokens": r["tokens"], "seqs": r["seqs"], "images": len(r.get("patches", [])),
                     "forward_gpu_ms": rk.get("forward_gpu_ms"),
                     "forward_predicted_ms": round(predicted(r, coster, None)[1], 2),
                     "forward_host_ms": rk.get("forward_host_ms"), "device_allocs": rk.get("device_allocs")})
    return rows


def gap_ops(events: list[Any], gap_us: float) -> dict[str, Any]:
    """GPU idle gaps of ``gap_us`` or more over a whole replay, summed by the name of each host op
    that overlapped them (a gap is counted once per op name: where serving waits for the host)."""
    g = gpu_gaps(events, gap_us, max_gaps=400)

    def by(key: str) -> list[dict[str, Any]]:
        acc: dict[str, list[float]] = {}
        for x in g["gaps"]:
            for name in {h.rsplit(" (", 1)[0] for h in x[key]}:
                acc.setdefault(name, []).append(x["ms"])
        top = sorted(acc.items(), key=lambda kv: -sum(kv[1]))[:15]
        return [{"op": k, "gaps": len(v), "ms": round(sum(v), 2)} for k, v in top]

    return {"busy_ms": g["busy_ms"], "span_ms": g["span_ms"], "gaps": len(g["gaps"]),
            "gap_ms": round(sum(x["ms"] for x in g["gaps"]), 2), "by_host_op": by("host_ops"),
            "by_innermost_op": by("innermost")}


def run(a: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    import executors
    from bench import step_fidelity as sf
    from bench.common import ClockLog, driver_version, heat, write_checkpoint
    from graph.hf_config import load_config

    plan = sf.plan_of(report, a.model, a.case)
    coster, encoder = sf.coster_of(plan), sf.in_step_encoder(plan)
    dev = torch.device("cuda")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "driver": driver_version(),
                           "torch": torch.__version__, "plan": f"{a.model} {a.case} (from {Path(a.report).name})",
                           "shapes": []}
    with tempfile.TemporaryDirectory() as d, ClockLog(nvidia_smi_id(0)) as clocks:
        cfg = load_config(preset=plan.model.preset)
        ckpt = Path(d) / "ckpt"
        write_checkpoint(cfg, ckpt, dev, torch.bfloat16, seed=0)
        t = time.perf_counter()
        with executors.load(plan, weights=ckpt, device="cuda", backend=a.backend, trace=True) as eng:
            out["load_s"] = round(time.perf_counter() - t, 1)
            if a.preamble:  # serving first: the report's workload replayed at a rate, as a fidelity rate runs
                out["preamble"] = serve_first(eng, report, a.model, a.preamble, a.preamble_s, coster, a.gap_ms * 1e3)
            shapes = a.requests + [(a.tokens, [])] * bool(a.tokens)
            for text, patches in shapes:
                req = make_request(text, patches, eng.args, seed=len(out["shapes"]))
                reps = []
                for i in range(a.reps + 1):  # the first: new shapes compile and capture
                    state = ("hot" if i % 2 == 0 else "cold") if a.heat_s and i else "-"
                    if state == "hot":
                        heat(a.heat_s, dev)
                    elif state == "cold":
                        time.sleep(a.rest_s)
                    eng.step_trace.clear()
                    t0 = time.time()
                    eng.generate([req], max_new_tokens=2)
                    torch.cuda.synchronize()
                    clock = (t0, time.time())
                    r = prompt_step(eng.step_trace)
                    rk = r["rank"]
                    tower, pred = predicted(r, coster, encoder)
                    reps.append({"tokens": r["tokens"], "tower_gpu_ms": rk.get("images_gpu_ms"), "tower_predicted_ms": round(tower, 2),
                                 "forward_gpu_ms": rk.get("forward_gpu_ms"), "forward_predicted_ms": round(pred, 2),
                                 "forward_host_ms": rk.get("forward_host_ms"), "gc_ms": rk.get("gc_ms"),
                                 "state": state, "clock": clock})
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=ACTIVITIES) as prof:
                    eng.generate([req], max_new_tokens=1)
                    torch.cuda.synchronize()
                out["shapes"].append({"text_tokens": text, "patches": patches, "reps": reps[1:], "first": reps[0],
                                      "profiled": gpu_gaps(list(prof.events()), a.gap_ms * 1e3),
                                      "top_cuda": top_ops(prof, "self_device_time_total", a.top),
                                      "top_cpu": top_ops(prof, "self_cpu_time_total", a.top)})
                print(json.dumps(out["shapes"][-1]["reps"]), flush=True)
    # nvidia-smi's log is read once it has stopped (and flushed): each (t0, t1) becomes its window
    for x in [out.get("preamble") or {}] + [r for sh in out["shapes"] for r in sh["reps"] + [sh["first"]]]:
        if "clock" in x:
            x["clock"] = clocks.window(*x["clock"])
    return out


def nvidia_smi_id(index: int) -> str:
    """nvidia-smi's name for CUDA device ``index``: its entry in ``CUDA_VISIBLE_DEVICES`` (an index or
    a UUID) where that is set, else the index."""
    vis = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return vis[index] if index < len(vis) else str(index)


def clock_text(c: dict[str, float] | None) -> str:
    """A ``ClockLog.window`` as text: median (lowest) SM MHz and mean power."""
    if not c or not c.get("samples"):
        return "not sampled"
    return f"SM {c['sm_mhz_median']:.0f} MHz (lowest {c['sm_mhz_min']:.0f}), {c['power_w_mean']:.0f} W"


def markdown(r: dict[str, Any], command: str) -> str:
    lines = [f"# Step profile: {r['plan']}", "",
             f"{r['device']}, driver {r['driver']}, torch {r['torch']}. Command: `{command}`.", ""]
    if r.get("preamble"):
        p = r["preamble"]
        lines += [f"Before the shapes: the workload replayed at {p['rate_rps']} req/s ({p['requests']} requests, "
                  f"{p['wall_s']} s) under the profiler; graphs {p['graphs']}; GPU clock {clock_text(p.get('clock'))}.", "",
                  "| tokens | seqs | images | forward GPU ms | forward predicted | forward host ms | cudaMalloc calls |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['tokens']} | {x['seqs']} | {x['images']} | {x['forward_gpu_ms']} | {x['forward_predicted_ms']} | "
                  f"{x['forward_host_ms']} | {x['device_allocs']} |" for x in p["steps"]]
        g = p["gaps"]
        lines += ["", f"GPU busy {g['busy_ms']} ms of {g['span_ms']} ms; {g['gaps']} idle gaps, {g['gap_ms']} ms; "
                  "by host op overlapping them:", "", "| host op | gaps | ms |", "|---|---|---|"]
        lines += [f"| {x['op']} | {x['gaps']} | {x['ms']} |" for x in g["by_host_op"]]
        lines += ["", "| innermost host op | gaps | ms |", "|---|---|---|"]
        lines += [f"| {x['op']} | {x['gaps']} | {x['ms']} |" for x in g["by_innermost_op"]] + [""]
    for s in r["shapes"]:
        lines += [f"## {s['text_tokens']} text tokens, images of {s['patches'] or 'none'} patches", "",
                  "| rep | state | tokens | tower GPU ms | tower predicted | forward GPU ms | forward predicted | "
                  "forward host ms | gc ms | GPU clock |", "|---|---|---|---|---|---|---|---|---|---|"]
        for i, x in enumerate(s["reps"]):
            lines.append(f"| {i + 1} | {x.get('state', '-')} | {x['tokens']} | {x['tower_gpu_ms']} | {x['tower_predicted_ms']} | "
                         f"{x['forward_gpu_ms']} | {x['forward_predicted_ms']} | {x['forward_host_ms']} | {x['gc_ms']} | "
                         f"{clock_text(x.get('clock'))} |")
        p = s["profiled"]
        lines += ["", f"Profiled rep: GPU busy {p['busy_ms']} ms of a {p['span_ms']} ms span; idle gaps:", ""]
        lines += [f"- at {g['at_ms']} ms, {g['ms']} ms: {', '.join(g['host_ops'])}; innermost: {', '.join(g['innermost'])}"
                  for g in p["gaps"]] or ["- none"]
        for key, title in (("top_cuda", "CUDA kernels"), ("top_cpu", "CPU ops")):
            lines += ["", f"Top {title} by self time:", "", "| name | calls | self ms |", "|---|---|---|"]
            lines += [f"| {x['name']} | {x['calls']} | {x['self_ms']} |" for x in s[key]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from bench.common import command_line, write_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--report", default=str(ROOT / "bench/results/fidelity_2gpu.vl_single.json"))
    ap.add_argument("--model", default="qwen2-vl")
    ap.add_argument("--case", default="single")
    ap.add_argument("--requests", action="append", type=parse_shape, default=[], help="TOKENS:P1,P2,.. (repeatable)")
    ap.add_argument("--tokens", type=int, default=0, help="also a text-only request of this many tokens")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--gap-ms", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=15, help="CUDA kernels and CPU ops listed per shape")
    ap.add_argument("--backend", default="compile")
    ap.add_argument("--preamble", type=float, default=0.0, metavar="RATE",
                    help="first replay the report's workload at RATE req/s (0: none)")
    ap.add_argument("--preamble-s", type=float, default=8.0, help="seconds of arrivals of that replay")
    ap.add_argument("--heat-s", type=float, default=0.0,
                    help="alternate cold reps and hot ones, each after this many seconds of full matmul load (0: off)")
    ap.add_argument("--rest-s", type=float, default=2.0, help="idle seconds before a cold rep")
    a = ap.parse_args(argv)
    if a.heat_s < 0 or a.rest_s < 0 or a.reps < 1 or a.top < 1:
        ap.error(f"--heat-s {a.heat_s} and --rest-s {a.rest_s} are seconds (0 or more), --reps {a.reps} and "
                 f"--top {a.top} at least 1")
    try:
        report = json.loads(Path(a.report).read_text())
        report["models"][a.model]["cases"][a.case]["plan_yaml"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        ap.error(f"--report {a.report}: not a fidelity report with a plan for {a.model} {a.case} ({type(e).__name__}: {e})")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (it runs the engine there)")
    r = run(a, report)
    write_report(a.out, "step_profile", r, markdown(r, command_line("bench/step_profile.py", argv)), echo=True)


if __name__ == "__main__":
    main()
