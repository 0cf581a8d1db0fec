"""Simulator speed and the error of its step-time memoisation.

    python bench/sim_speed.py            # writes bench/results/sim_speed.json and .md

1. Speed: 10,000 requests of the multimodal example workload (Qwen2.5-VL-72B on 8xH200,
   examples/qwen2.5-vl-72b-8xh200.yaml: 0-4 images per request at four resolutions) simulated on
   pinned plans. "cold" starts from a fresh CostModel and an empty step-time cache (the first
   simulation of a plan); "warm" reuses the plan's coster (the next rates of a sweep). Wall time
   includes sampling the workload and summarising. The op graph is built once beforehand
   (tracing is the tracer's cost, reported separately).
2. Error of the log-grid memoisation: every step shape of a 2,000-request run at 8 req/s, step time
   bucketed vs the cost model's exact answer (relative error); and the end metrics of the same run
   with bucketing vs exact step times.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodels.build import graph_for_config  # noqa: E402
from costmodels.model import CostModel  # noqa: E402
from costmodels.simulator import LogGrid, coster_for, simulate  # noqa: E402
from planner.pinned import pinned_plan  # noqa: E402
from planner.inputs import cost_model_of, workload_of  # noqa: E402
from graph.hf_config import load_config  # noqa: E402
from planner.spec import load_spec  # noqa: E402

from machine import cpu_name  # bench/machine.py (bench/ is on sys.path when run as a script)

SPEC = ROOT / "examples" / "qwen2.5-vl-72b-8xh200.yaml"
MESHES = {"tp8": dict(tp=8), "tp2xsp4-shift": dict(tp=2, sp=4, shift=True),
          "pp2xtp4": dict(pp=2, tp=4), "dp2xtp4": dict(dp=2, tp=4)}
N = 10_000
REPEAT = 3


def machine() -> dict:
    cpu = cpu_name()
    import torch  # noqa: PLC0415 (versions only)
    import transformers  # noqa: PLC0415

    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": list(os.getloadavg()), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform()}


def fresh_cost(spec, graph) -> CostModel:
    cm, _ = cost_model_of(spec, graph=graph)
    return cm


def speed(spec, graph) -> dict:
    out = {}
    info = graph.info
    wl = workload_of(spec, info).with_requests(N)
    reqs = wl.sample()
    images = sum(len(r.image_tokens) for r in reqs)
    for label, kw in MESHES.items():
        cold, warm, cold_cpu, warm_cpu = [], [], [], []
        for _ in range(REPEAT):
            cost = fresh_cost(spec, graph)
            plan = pinned_plan(spec, cost, **kw)
            coster = coster_for(plan, cost)
            t, c = time.perf_counter(), time.process_time()
            res = simulate(plan, cost, wl, slo=spec.slo.targets(), coster=coster)
            cold.append(time.perf_counter() - t)
            cold_cpu.append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            simulate(plan, cost, wl, slo=spec.slo.targets(), coster=coster)
            warm.append(time.perf_counter() - t)
            warm_cpu.append(time.process_time() - c)
        med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
        out[label] = {"cold_s": med(cold), "warm_s": med(warm), "cold_cpu_s": med(cold_cpu), "warm_cpu_s": med(warm_cpu),
                      "cold_runs_s": [round(x, 3) for x in cold], "steps": res.steps,
                      "cost_model_calls": coster.misses, "step_lookups": coster.calls,
                      "completed": res.completed, "ttft_p90_ms": round(res.ttft_ms["p90"], 1)}
        print(f"{label:>14}: cold {out[label]['cold_s']:.2f} s (CPU {out[label]['cold_cpu_s']:.2f}), "
              f"warm {out[label]['warm_s']:.2f} s, "
              f"{res.steps} steps, {coster.misses} cost-model calls", flush=True)
    return {"requests": N, "images": images, "rate_rps": wl.rate, "per_plan": out}


def grid_error(spec, graph) -> dict:
    out = {}
    wl = workload_of(spec, graph.info).with_requests(2000).with_rate(8.0)
    for label, kw in MESHES.items():
        cost = fresh_cost(spec, graph)
        plan = pinned_plan(spec, cost, **kw)
        bucketed = coster_for(plan, cost, grid=LogGrid())
        seen = []
        orig = bucketed.stage_ms

        def spy(shape, mode, decode=None, orig=orig, seen=seen):
            seen.append((shape, mode, decode))
            return orig(shape, mode, decode)

        bucketed.stage_ms = spy
        a = simulate(plan, cost, wl, slo=spec.slo.targets(), coster=bucketed)
        exact = coster_for(plan, cost, exact=True)
        errs = []
        for shape, mode, decode in seen[::5]:
            q, e = sum(orig(shape, mode, decode)), sum(exact.stage_ms(shape, mode, decode))
            errs.append(abs(q - e) / e)
        b = simulate(plan, cost, wl, slo=spec.slo.targets(), coster=exact)
        b1 = simulate(plan, cost, wl, slo=spec.slo.targets(), coster=exact, seed=1)  # the workload's own noise, for scale
        rel = lambda x, y: round(abs(x - y) / y, 5)  # noqa: E731
        out[label] = {
            "steps_checked": len(errs), "step_time_rel_err_mean": round(statistics.mean(errs), 5),
            "step_time_rel_err_p99": round(sorted(errs)[int(0.99 * (len(errs) - 1))], 5),
            "step_time_rel_err_max": round(max(errs), 5),
            "ttft_p90_rel_diff": rel(a.ttft_ms["p90"], b.ttft_ms["p90"]),
            "tpot_p90_rel_diff": rel(a.tpot_ms["p90"], b.tpot_ms["p90"]),
            "combined_tok_s_rel_diff": rel(a.combined_tok_s, b.combined_tok_s),
            "ttft_p90_seed0_vs_seed1": rel(b1.ttft_ms["p90"], b.ttft_ms["p90"]),
        }
        print(f"{label:>14}: step error mean {out[label]['step_time_rel_err_mean']:.3%} "
              f"max {out[label]['step_time_rel_err_max']:.3%}; TTFT p90 diff {out[label]['ttft_p90_rel_diff']:.3%}, "
              f"TPOT p90 diff {out[label]['tpot_p90_rel_diff']:.3%}", flush=True)
    return {"grid": "16 points per octave, exact below 64", "requests": 2000, "rate_rps": 8.0, "per_plan": out}


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# Simulator speed", "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}; load average at start {m['load_average_at_start'][0]:.1f} (the machine "
        "is shared: wall time includes waiting for a core, CPU time does not)", "",
        f"Workload: {doc['speed']['requests']} requests ({doc['speed']['images']} images) of "
        f"`examples/qwen2.5-vl-72b-8xh200.yaml` at {doc['speed']['rate_rps']} req/s; op graph built once "
        f"({doc['graph_seconds']:.1f} s, not counted). Median of {REPEAT} runs. Target: <= 5 s.", "",
        "| plan | cold wall (s) | cold CPU (s) | warm wall (s) | warm CPU (s) | steps | cost-model calls |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in doc["speed"]["per_plan"].items():
        lines.append(f"| {k} | {v['cold_s']:.2f} | {v['cold_cpu_s']:.2f} | {v['warm_s']:.2f} | {v['warm_cpu_s']:.2f} | "
                     f"{v['steps']} | {v['cost_model_calls']} |")
    g = doc["grid_error"]
    lines += ["", f"## Log-grid memoisation error ({g['grid']})", "",
              f"{g['requests']} requests at {g['rate_rps']} req/s; every 5th step re-costed exactly; the same run "
              "with exact step times for the end metrics.", "",
              "| plan | step err mean | step err p99 | step err max | TTFT p90 diff | TPOT p90 diff | tok/s diff | "
              "TTFT p90, seed 0 vs 1 (exact) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, v in g["per_plan"].items():
        lines.append(f"| {k} | {v['step_time_rel_err_mean']:.2%} | {v['step_time_rel_err_p99']:.2%} | "
                     f"{v['step_time_rel_err_max']:.2%} | {v['ttft_p90_rel_diff']:.2%} | {v['tpot_p90_rel_diff']:.2%} | "
                     f"{v['combined_tok_s_rel_diff']:.2%} | {v['ttft_p90_seed0_vs_seed1']:.2%} |")
    p99 = max(v["step_time_rel_err_p99"] for v in g["per_plan"].values())
    worst = max(v["step_time_rel_err_max"] for v in g["per_plan"].values())
    lines += ["", f"The grid rounds each number by at most 2^(1/32) - 1 = 2.2%; 99% of step times are within "
              f"{p99:.1%} of the exact ones, and the few beyond (at most {worst:.1%}) were not itemised. Throughput "
              "and TPOT move by under 1%; the TTFT p90 of a queue at 70% load can move more, because a 0.2% change in "
              "step times reorders batches near the tail. The last column gives the scale: the same plan's "
              "TTFT p90 under another workload seed, with exact step times."]
    return "\n".join(lines) + "\n"


def main() -> None:
    spec = load_spec(SPEC)
    t = time.perf_counter()
    graph = graph_for_config(load_config(preset=spec.model.preset))
    graph_s = time.perf_counter() - t
    doc = {"command": "python bench/sim_speed.py", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": machine(), "graph_seconds": round(graph_s, 2), "speed": speed(spec, graph),
           "grid_error": grid_error(spec, graph)}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sim_speed.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "sim_speed.md").write_text(markdown(doc))
    print(f"wrote {out / 'sim_speed.json'} and .md")


if __name__ == "__main__":
    main()
