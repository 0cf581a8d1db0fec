"""How long `plan compile` takes for every example, cold and warm.

    python bench/compile_speed.py [--repeat 3] [--examples examples/a.yaml ...]

Each measurement is a fresh process (`python -c "from planner.cli import main; main([...])"`)
timed by wall clock, so interpreter start and imports count:

* cold: an empty graph cache (``SHIFTPLAN_CACHE`` pointed at a new temporary directory), so the
  model is traced (torch + transformers imported);
* warm: the same cache again (a hit); the process reports whether torch or transformers got
  imported (they must not be).

Wall time is what a user waits; on a shared machine it grows with the load, so the CPU time of
the child (user + system, from ``getrusage``) is reported too: what the compile costs a free core.

Targets (issue 4, point 9): warm <= 2 s, cold <= 15 s per example. Results are written to
bench/results/compile_speed.json and .md with the machine, the versions and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WARM_TARGET_S, COLD_TARGET_S = 2.0, 15.0

CHILD = """
import sys
from planner.cli import main
rc = main(["compile", {spec!r}, "-q", "-o", {out!r}])
print("RESULT", rc, int("torch" in sys.modules), int("transformers" in sys.modules))
"""


def run_once(spec: Path, cache: Path, out: Path) -> tuple[float, int, bool, bool, float]:
    """(wall s, exit code, torch imported, transformers imported, CPU s of the child)."""
    env = dict(os.environ, SHIFTPLAN_CACHE=str(cache))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD.format(spec=str(spec), out=str(out))], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(f"{spec.name}: compile failed:\n{p.stderr[-3000:]}")
    _, rc, torch, tf = line.split()
    return dt, int(rc), torch == "1", tf == "1", cpu


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "pulp", "pydantic", "networkx"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - report what is installed
            out[pkg] = "not installed"
    return out


def machine() -> dict[str, object]:
    from machine import cpu_name  # bench/machine.py (bench/ is on sys.path when run as a script)

    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="warm runs per example (median and min reported)")
    ap.add_argument("--examples", nargs="*", type=Path, default=None)
    args = ap.parse_args()
    examples = args.examples or sorted((ROOT / "examples").glob("*.yaml"))
    box = machine()  # before the runs: the load average is the other users' load
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in examples:
            load = round(os.getloadavg()[0], 2)
            cache = Path(tmp) / f"cache-{spec.stem}"
            out = Path(tmp) / f"{spec.stem}.plan.yaml"
            cold, rc, cold_torch, _, cold_cpu = run_once(spec, cache, out)
            warm = [run_once(spec, cache, out) for _ in range(args.repeat)]
            w = [x[0] for x in warm]
            row = {"example": spec.stem, "load_avg_1m": load, "exit_code": rc, "cold_s": round(cold, 2),
                   "cold_imported_torch": cold_torch, "warm_median_s": round(statistics.median(w), 2),
                   "warm_min_s": round(min(w), 2), "cold_cpu_s": round(cold_cpu, 2),
                   "warm_cpu_median_s": round(statistics.median(x[4] for x in warm), 2),
                   "warm_imported_torch": any(x[2] for x in warm),
                   "warm_imported_transformers": any(x[3] for x in warm)}
            row["meets_targets"] = (row["warm_median_s"] <= WARM_TARGET_S and row["cold_s"] <= COLD_TARGET_S
                                    and not row["warm_imported_torch"] and not row["warm_imported_transformers"])
            row["meets_targets_cpu"] = (row["warm_cpu_median_s"] <= WARM_TARGET_S and row["cold_cpu_s"] <= COLD_TARGET_S
                                        and not row["warm_imported_torch"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"benchmark": "plan compile, cold (empty graph cache) and warm (cache hit), fresh process each",
           "command": "python bench/compile_speed.py" + (f" --repeat {args.repeat}" if args.repeat != 3 else "")
           + (" --examples " + " ".join(str(p) for p in args.examples) if args.examples else ""),
           "targets": {"warm_s": WARM_TARGET_S, "cold_s": COLD_TARGET_S},
           "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": box, "versions": versions(),
           "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compile_speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "compile_speed.md").write_text(markdown(doc))
    print(f"wrote {RESULTS / 'compile_speed.json'} and .md")


def markdown(doc: dict) -> str:
    m, v = doc["machine"], doc["versions"]
    lines = [f"# plan compile speed ({doc['date']})", "",
             f"Command: `{doc['command']}`. Machine: {m['cpu']}, {m['cores']} cores, {m['system']} "
             f"(1-min load average {m['load_avg_1m_at_start']} at start; the machine is shared). Versions: "
             + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             f"Each run is a fresh process; cold = empty graph cache (the model is traced), warm = cache hit. "
             f"Targets: warm <= {doc['targets']['warm_s']} s, cold <= {doc['targets']['cold_s']} s.", "",
             "| example | load avg (1 min) | cold s | cold CPU s | warm median s | warm min s | warm CPU median s "
             "| torch imported warm | meets targets (wall) | meets targets (CPU) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in doc["results"]:
        lines.append(f"| {r['example']} | {r.get('load_avg_1m', '-')} | {r['cold_s']} | {r['cold_cpu_s']} | "
                     f"{r['warm_median_s']} | {r['warm_min_s']} | {r['warm_cpu_median_s']} | "
                     f"{'yes' if r['warm_imported_torch'] or r['warm_imported_transformers'] else 'no'} | "
                     f"{'yes' if r['meets_targets'] else 'NO'} | {'yes' if r.get('meets_targets_cpu') else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
