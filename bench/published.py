"""Predictions checked against published 8-GPU (and 2-GPU) results of the best engines.

    python bench/published.py                 # writes bench/results/published.json and .md
    python bench/published.py --only trtllm   # the cases whose id contains 'trtllm' (prints, writes nothing)

Each case is a spec under examples/published/ that reproduces a published setup as closely as the
spec allows (model, FP8 weights and KV, GPU, GPU count, the workload's length statistics, the mesh
where it was published). The prediction is made the way `plan simulate` makes it: a plan pinned to a
mesh (``costmodels.simulator.pinned``), the spec's synthetic workload, the serving simulator. Where
the publication does not give the mesh, every candidate mesh below is simulated and the best is kept
(what an engine tuned for the benchmark would pick). Two kinds of figure:

* ``offline`` (MLPerf Offline, trtllm-bench throughput): every request queued at t = 0; output
  tokens/s over the saturated part of the run, [0, first token of the last admitted request] (the
  drain after it, where the batch empties, is left out: MLPerf runs 24,576 samples and trtllm-bench
  1,500-3,000, so their drain is a small share of the run);
* ``server`` (MLPerf Server / Interactive): Poisson arrivals at the published throughput / the mean
  output length; the predicted mean TTFT and mean TPOT against the published means, and the p99s
  against the scenario's limits.

The ``plan estimate`` (static batch) figure of each offline case is reported beside it, for reference.
``RATIO_BAND`` is the acceptance band: predicted / published within [0.8, 1.2]; a case outside it
carries its explanation in ``GAPS``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodels.build import cost_model_for  # noqa: E402
from costmodels.estimate import estimate  # noqa: E402
from costmodels.simulator import coster_for  # noqa: E402
from costmodels.simulator.pinned import pinned_plan  # noqa: E402
from costmodels.workload import from_spec  # noqa: E402
from planner.spec import load_spec  # noqa: E402
from plans.errors import UserError  # noqa: E402

SPECS = ROOT / "examples" / "published"
OUT_JSON = ROOT / "bench" / "results" / "published.json"
OUT_MD = ROOT / "bench" / "results" / "published.md"
BEFORE_JSON = ROOT / "bench" / "results" / "published.before.json"
RATIO_BAND = (0.8, 1.2)
OFFLINE_RATE = 1e6  # requests/s: every request arrives within a few ms of t = 0

MLPERF = ("MLPerf Inference v5.0 datacenter results, closed division, 8x H200-SXM-141GB, TensorRT-LLM "
          "(https://mlcommons.org/benchmarks/inference-datacenter/)")
TRTLLM = ("TensorRT-LLM performance overview, LLaMA v3.3 70B table (NVIDIA/TensorRT-LLM "
          "docs/source/developer-guide/perf-overview.md; "
          "https://nvidia.github.io/TensorRT-LLM/developer-guide/perf-overview.html)")

# Meshes tried where the publication does not give one (8 GPUs; those that do not fit are skipped).
MESHES_8 = [dict(dp=8), dict(dp=4, tp=2), dict(dp=2, tp=4), dict(tp=8), dict(pp=2, tp=4), dict(pp=8)]


@dataclass
class Case:
    id: str
    spec: str  # file under examples/published/
    kind: str  # offline | server
    source: str
    published: dict[str, float]  # metric -> published value
    per_gpu: bool = False  # the throughput figure is per GPU
    meshes: list[dict[str, int]] = field(default_factory=lambda: list(MESHES_8))
    limits: dict[str, float] = field(default_factory=dict)  # server: p99 limits (ms)
    sweep_input: tuple[float, ...] = ()  # input means to re-run the chosen mesh at (sensitivity)
    no_evict: bool = True  # TensorRT-LLM's scheduler: admit only with KV for the whole output (no preemption)


CASES = [
    Case("mlperf5-llama2-70b-offline", "mlperf5-llama2-70b-offline-8xh200.yaml", "offline", MLPERF,
         {"output_tok_s": 34988.0}, sweep_input=(150, 600)),
    Case("mlperf5-llama2-70b-interactive", "mlperf5-llama2-70b-interactive-8xh200.yaml", "server", MLPERF,
         {"output_tok_s": 19424.0, "ttft_mean_ms": 119.0, "tpot_mean_ms": 33.7},
         limits={"ttft_p99_ms": 450.0, "tpot_p99_ms": 40.0}),
    Case("mlperf5-llama3.1-405b-offline", "mlperf5-llama3.1-405b-offline-8xh200.yaml", "offline", MLPERF,
         {"output_tok_s": 560.65}, meshes=[dict(tp=8), dict(pp=2, tp=4), dict(pp=8)], sweep_input=(4700, 14100)),
    Case("mlperf5-llama3.1-405b-server", "mlperf5-llama3.1-405b-server-8xh200.yaml", "server", MLPERF,
         {"output_tok_s": 291.37, "ttft_mean_ms": 1830.0, "tpot_mean_ms": 53.9},
         meshes=[dict(tp=8), dict(pp=2, tp=4)], limits={"ttft_p99_ms": 6000.0, "tpot_p99_ms": 175.0}),
    *[Case(f"trtllm-llama3.3-70b-tp2-{g}-{w}", f"trtllm-llama3.3-70b-fp8-tp2-{g}-{w}.yaml", "offline", TRTLLM,
           {"output_tok_s_per_gpu": v}, per_gpu=True, meshes=[dict(tp=2)])
      for g, w, v in (("h200", "1k1k", 2587.0), ("h200", "8k1k", 537.0), ("h100", "1k1k", 2209.0),
                      ("h100", "8k1k", 398.0))],
]

# Where a ratio falls outside RATIO_BAND, the stated difference in setup that explains it (filled in
# from the results; an unexplained gap is a failure of the check, see tests/test_published.py).
GAPS: dict[str, str] = {}


def _label(m: dict[str, int]) -> str:
    return "x".join(f"{k}{v}" for k, v in m.items() if v > 1) or "1 GPU"


def run_case(case: Case, log=print, before: bool = False) -> dict[str, Any]:
    """Simulate ``case`` on each candidate mesh; ``before``: the models as they were before the fixes
    this check led to (vLLM-style admission that preempts, HF's unfused memory-bound ops)."""
    spec = load_spec(SPECS / case.spec)
    if before:
        spec = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"backend": "eager"})})
        case = replace(case, no_evict=False, sweep_input=())
    cost, _ = cost_model_for(spec)
    wl = from_spec(spec, cost.info)
    gpus = spec.hardware.world_size
    tried = []
    for mesh in case.meshes:
        try:
            plan = pinned_plan(spec, cost, max_seqs=spec.search.max_seqs, name=f"{spec.name}-{_label(mesh)}", **mesh)
        except UserError as e:
            tried.append({"mesh": _label(mesh), "skipped": str(e)})
            continue
        t0 = time.perf_counter()
        row = _simulate(case, spec, cost, plan, wl)
        row.update(mesh=_label(mesh), sim_s=round(time.perf_counter() - t0, 1))
        tried.append(row)
        log(f"  {case.id} {row['mesh']}: " + ", ".join(f"{k} {row[k]:.4g}" for k in case.published if k in row))
    runs = [r for r in tried if "skipped" not in r]
    if not runs:
        raise UserError(f"{case.id}: no candidate mesh fits: {tried}")
    key = "output_tok_s_per_gpu" if case.per_gpu else "output_tok_s"
    if case.kind == "server":  # the mesh that meets the limits with the lowest mean TTFT (MLPerf's own pick)
        ok = [r for r in runs if r["meets_limits"]] or runs
        best = min(ok, key=lambda r: r["ttft_mean_ms"] + 100 * r["tpot_mean_ms"])
    else:
        best = max(runs, key=lambda r: r[key])
    out: dict[str, Any] = {"id": case.id, "spec": f"examples/published/{case.spec}", "kind": case.kind,
                           "source": case.source, "gpus": gpus, "gpu": spec.hardware.gpu,
                           "mesh": best["mesh"], "profile": cost.profile_id, "candidates": tried,
                           "metrics": {}}
    for metric, pub in case.published.items():
        pred = best[metric]
        out["metrics"][metric] = {"published": pub, "predicted": round(pred, 4), "ratio": round(pred / pub, 4)}
    if case.limits:
        out["limits"] = case.limits
        out["predicted_p99"] = {k: round(best[k], 2) for k in case.limits}
        out["meets_limits"] = best["meets_limits"]
    if case.kind == "offline":
        mesh = next(m for m in case.meshes if _label(m) == best["mesh"])
        w = spec.workload
        b = min(spec.search.max_seqs, best["kv_tokens"] // int(w.input_tokens.mean + w.output_tokens.mean))
        est = estimate(cost, tp=mesh.get("tp", 1), pp=mesh.get("pp", 1), dp=mesh.get("dp", 1),
                       batch=b * mesh.get("dp", 1), isl=int(w.input_tokens.mean), osl=int(w.output_tokens.mean),
                       max_batch_tokens=spec.search.max_batch_tokens, world=gpus,
                       gpus_per_node=spec.hardware.gpus_per_node)
        val = est.output_tok_s / (gpus if case.per_gpu else 1)
        out["estimate"] = {"batch": b * mesh.get("dp", 1), "output_tok_s": round(val, 2),
                           "ratio": round(val / case.published[key], 4),
                           "command": f"plan estimate examples/published/{case.spec} "
                                      + " ".join(f"--{k} {v}" for k, v in mesh.items())
                                      + f" --batch {b * mesh.get('dp', 1)} --isl {int(w.input_tokens.mean)} "
                                        f"--osl {int(w.output_tokens.mean)}"}
        sweep = []
        for mean in case.sweep_input:
            s2 = spec.model_copy(update={"workload": w.model_copy(update={
                "input_tokens": w.input_tokens.model_copy(update={"mean": float(mean)})})})
            plan = pinned_plan(s2, cost, max_seqs=spec.search.max_seqs, **mesh)
            r = _simulate(case, s2, cost, plan, from_spec(s2, cost.info))
            sweep.append({"input_mean": mean, key: round(r[key], 2), "ratio": round(r[key] / case.published[key], 4)})
        if sweep:
            out["input_mean_sweep"] = sweep
    out["command"] = f"python bench/published.py --only {case.id}"
    return out


def _simulate(case: Case, spec, cost, plan, wl) -> dict[str, Any]:
    """One simulation of ``plan`` on ``wl`` (offline: every request at t = 0)."""
    from costmodels.simulator.config import SimConfig
    from costmodels.simulator.engine import run
    from costmodels.simulator.metrics import summarize

    if case.kind == "offline":
        wl = wl.with_rate(OFFLINE_RATE)
    reqs = wl.sample(spec.workload.seed)
    cfg = SimConfig.from_plan(plan)
    if case.no_evict:
        cfg = replace(cfg, reserve_output=True)
    log = run(cfg, coster_for(plan, cost), reqs)
    res = summarize(log)
    row: dict[str, Any] = {"kv_tokens": int(plan.memory_gb.kv_tokens), "preemptions": res.preemptions,
                           "ttft_mean_ms": res.ttft_ms["mean"], "tpot_mean_ms": res.tpot_ms["mean"],
                           "ttft_p99_ms": res.ttft_ms["p99"], "tpot_p99_ms": res.tpot_ms["p99"],
                           "mean_step_tokens": round(res.mean_step_tokens, 1)}
    tok_s = saturated_output_tok_s(log) if case.kind == "offline" else res.output_tok_s
    row["output_tok_s"] = tok_s
    row["output_tok_s_per_gpu"] = tok_s / plan.mesh.size
    if case.limits:
        row["meets_limits"] = all(row[k] <= v for k, v in case.limits.items()) and res.completed == len(reqs)
    return row


def saturated_output_tok_s(log) -> float:
    """Output tokens/s of a run with every request queued at t = 0, over [0, the last first token]."""
    from costmodels.simulator.metrics import _window_tokens
    from costmodels.simulator.state import DONE

    done = [r for r in log.reqs if r.state == DONE]
    end = max(r.first for r in done)
    out, _, width = _window_tokens(done, 0.0, end)
    return out / width


def render_md(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Predictions against published results", "",
             "Regenerate: `python bench/published.py` (about "
             f"{meta['wall_s'] / 60:.0f} min on the 2-core dev machine). Every predicted figure is the serving "
             "simulator's on the spec under `examples/published/` (see the spec's header for the setup and what "
             "was assumed where the publication is silent). Acceptance: predicted / published within "
             f"{RATIO_BAND[0]}-{RATIO_BAND[1]}, or the gap explained below.", "",
             "| case | GPUs | mesh | metric | published | predicted | ratio | static estimate (ratio) |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        for i, (m, v) in enumerate(r["metrics"].items()):
            est = r.get("estimate") if i == 0 else None
            e = f"{est['output_tok_s']:,.0f} ({est['ratio']:.2f})" if est else ""
            lines.append(f"| {r['id'] if i == 0 else ''} | {r['gpus'] if i == 0 else ''} | "
                         f"{r['mesh'] if i == 0 else ''} | {m} | {v['published']:,.4g} | {v['predicted']:,.4g} | "
                         f"{v['ratio']:.2f} | {e} |")
    lines += ["", "Sources:", ""]
    for s in dict.fromkeys(r["source"] for r in rows):
        lines.append(f"- {s}")
    lines += ["", "## Per case", ""]
    for r in rows:
        lines.append(f"### {r['id']}")
        lines.append("")
        lines.append(f"- spec `{r['spec']}`, profile `{r['profile']}`, command `{r['command']}`")
        if "estimate" in r:
            lines.append(f"- static estimate: `{r['estimate']['command']}`")
        if "limits" in r:
            lines.append(f"- p99 limits {r['limits']}: predicted {r['predicted_p99']}, "
                         f"{'met' if r['meets_limits'] else 'NOT met'}")
        cands = ", ".join(f"{c['mesh']}: skipped" if "skipped" in c else
                          f"{c['mesh']}: {c.get('output_tok_s', 0):,.0f} tok/s, TTFT mean {c['ttft_mean_ms']:,.0f} ms, "
                          f"TPOT mean {c['tpot_mean_ms']:.1f} ms"
                          for c in r["candidates"])
        lines.append(f"- meshes simulated: {cands}")
        if "input_mean_sweep" in r:
            lines.append("- input-mean sensitivity (the mean is assumed): " + ", ".join(
                f"{s['input_mean']} tokens -> ratio {s['ratio']:.2f}" for s in r["input_mean_sweep"]))
        if r["id"] in GAPS:
            lines.append(f"- gap: {GAPS[r['id']]}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the cases whose id contains this text; print, write nothing")
    ap.add_argument("--before", action="store_true",
                    help=f"the models before the fixes (preempting admission, unfused memory ops); writes {BEFORE_JSON.name}")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.only or args.only in c.id]
    t0 = time.perf_counter()
    rows = []
    for c in cases:
        rows.append(run_case(c, before=args.before))
        for m, v in rows[-1]["metrics"].items():
            print(f"{c.id}: {m} published {v['published']:,.4g} predicted {v['predicted']:,.4g} ratio {v['ratio']:.2f}")
    meta = {"wall_s": time.perf_counter() - t0, "band": RATIO_BAND}
    if args.only:
        return 0
    if args.before:
        BEFORE_JSON.write_text(json.dumps({"cases": rows}, indent=1) + "\n")
        print(f"wrote {BEFORE_JSON.relative_to(ROOT)}")
        return 0
    OUT_JSON.write_text(json.dumps({"meta": {"band": list(RATIO_BAND)}, "cases": rows, "gaps": GAPS}, indent=1) + "\n")
    OUT_MD.write_text(render_md(rows, meta))
    print(f"wrote {OUT_JSON.relative_to(ROOT)} and {OUT_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
