"""How long tracing each preset takes: cold process, warm process, and served from the cache.

* cold:   a fresh ``python`` process that imports the tracer and traces the preset (cache off);
          we report the whole process wall time and the trace itself.
* warm:   one process that has already traced another model (torch, transformers and
          torch.export warmed up) traces the preset; best of ``--repeats``.
* cached: a fresh process runs ``plan graph PRESET --json`` with the graph in the cache; we
          report the process wall time, the cache load time and whether torch/transformers
          were imported (they must not be).

Writes ``bench/results/trace_speed.json`` and ``.md``. Usage::

    python bench/trace_speed.py [--repeats 3] [--presets a,b,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

COLD = """
import json, sys, time
t0 = time.perf_counter()
from graph.hf_config import load_config
from graph.trace import trace_config
t1 = time.perf_counter()
g = trace_config(load_config(preset=sys.argv[1]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "trace_s": t2 - t1, "params": g.total_params}))
"""

CACHED = """
import json, sys, time, io, contextlib
t0 = time.perf_counter()
from planner.cli import main

from machine import cpu_name  # bench/machine.py (bench/ is on sys.path when run as a script)
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = main(["graph", sys.argv[1], "--json"])
out = json.loads(buf.getvalue())
print(json.dumps({"rc": rc, "cached": out["cached"], "load_s": out["trace_seconds"],
                  "in_process_s": time.perf_counter() - t0, "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}))
"""

WARMUP = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
          "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_hidden_layers": 2, "vocab_size": 1000}


def _run(code: str, arg: str, env: dict[str, str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, cwd=ROOT,
                       check=True)
    wall = time.perf_counter() - t0
    return json.loads(p.stdout.strip().splitlines()[-1]), wall


def _machine() -> dict:
    import torch
    import transformers

    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from graph.cache import load_or_trace
    from graph.hf_config import load_config, preset_names
    from graph.trace import trace_config

    presets = args.presets.split(",") if args.presets else preset_names()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SHIFTPLAN_CACHE": cache, "PYTHONPATH": str(ROOT)}
        os.environ["SHIFTPLAN_CACHE"] = cache
        trace_config(WARMUP)  # warm torch.export and transformers in this process
        for name in presets:
            cfg = load_config(preset=name)
            cold, cold_wall = _run(COLD, name, env)
            warm, warm_cpu = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                g = trace_config(cfg)
                warm.append(time.perf_counter() - t0)
                warm_cpu.append(time.process_time() - c0)
            load_or_trace(cfg)  # fill the cache
            cached, cached_wall = _run(CACHED, name, env)
            rows.append({
                "preset": name, "params": g.total_params, "ops": g.graph.number_of_nodes(),
                "cold_process_s": round(cold_wall, 3), "cold_trace_s": round(cold["trace_s"], 3),
                "warm_trace_s": round(min(warm), 3), "warm_trace_median_s": round(statistics.median(warm), 3),
                "warm_trace_cpu_s": round(min(warm_cpu), 3),
                "cached_process_s": round(cached_wall, 3), "cached_load_s": round(cached["load_s"], 4),
                "cached_imports_torch": cached["torch"], "cached_imports_transformers": cached["transformers"],
            })
            print(json.dumps(rows[-1]), flush=True)
    doc = {
        "command": "python bench/trace_speed.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": _machine(),
        "note": "machine shared with other jobs while measuring; warm = best of repeats in one process",
        "target": "warm trace <= 2 s for every preset; cached does not import transformers",
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trace_speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    m = doc["machine"]
    lines = [
        "# Trace speed",
        "",
        f"Command: `{doc['command'].strip()}` ({doc['date_utc']})",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}. {doc['note']}.",
        "",
        "| preset | params | ops | cold process (s) | cold trace (s) | warm trace (s) | warm trace CPU (s) "
        "| cached process (s) | cache load (s) | cached imports transformers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params']:,} | {r['ops']} | {r['cold_process_s']:.2f} | "
                     f"{r['cold_trace_s']:.2f} | {r['warm_trace_s']:.2f} | {r['warm_trace_cpu_s']:.2f} | "
                     f"{r['cached_process_s']:.2f} | "
                     f"{r['cached_load_s']:.3f} | {'yes' if r['cached_imports_transformers'] else 'no'} |")
    worst = max(rows, key=lambda r: r["warm_trace_s"])
    load = os.getloadavg()
    doc["load_average_after"] = [round(x, 2) for x in load]
    (RESULTS / "trace_speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines += ["", f"Slowest warm trace: {worst['preset']} {worst['warm_trace_s']:.2f} s wall, "
              f"{worst['warm_trace_cpu_s']:.2f} s CPU (target <= 2 s). Load average at the end "
              f"(1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} cores."]
    (RESULTS / "trace_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
