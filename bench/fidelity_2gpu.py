"""The simulator checked against the engine on two GPUs: predicted vs measured serving figures.

For each model and case (a mesh, and for the vision-language model an encoder placement) the
plan is pinned by hand (``planner.pinned.pinned_plan``: even stages, the cost model's memory and,
for shift, its threshold; the cases are those of ``bench/mesh_speed.py`` and ``bench/vl_speed.py``),
its capacity is predicted by the simulator, and the workload is replayed in real time on the engine
at three arrival rates, ``--rates`` fractions of that capacity (default 0.2, 0.5, 0.9: light, about
50% and about 90%), each for ``--duration`` seconds of arrivals, on ONE engine load per case.

Models and traffic (seeded random weights, written once per model as a safetensors checkpoint that
every rank reads its slices of; bf16 on GPUs):

* ``llama``: Llama-3.1-8B shapes, text: input tokens lognormal mean 512 (max 2,048), output mean
  128 (max 512). Cases ``single``, ``tp2``, ``sp2``, ``shift-sp2``, ``pp2``, ``dp2``.
* ``qwen2-vl``: Qwen2-VL-7B shapes, image-text: 0-4 images per request (weights 0.2, 0.3, 0.2,
  0.15, 0.15), each 448x448, 896x896 or 1280x720 (256, 1,024 and 1,196 tokens by the model's own
  resize rule), text mean 256 (max 1,024), output mean 128 (max 512). Cases: every case of
  ``vl_speed`` (each encoder placement: ``tp2/stage0_tp``, ``tp2/stage0_dp``, ``sp2/stage0_dp``,
  ``shift-sp2/stage0_dp``, ``pp2/stage0_tp``, ``pp2/all_dp``, ``dp2``, ``dedicated``; and ``single``).

Each rate goes through the code of ``plan bench --workload --compare-sim``
(``planner.bench_workload``: the same requests sampled once, replayed on the engine and run in the
simulator, both summarised by ``costmodels.simulator.metrics.summarize``, compared by ``compare``):
the relative error of a figure is ``predicted / measured - 1``. Figures: TTFT p50 / p90, TPOT p50 /
p90 (ms) and output tokens/s (in the arrival window, as the simulator defines it; below capacity it
follows the offered load on both sides, so its error is small by construction).

Predicted capacity (the project has no other notion of one for a whole plan): the simulator's
completed requests per second (``SimResult.throughput_rps``: completed / first arrival to last
completion) when ``8 x max_seqs x dp`` requests of the workload arrive at once (rate 1e6 req/s).
After the three rates the same requests are replayed on the engine, all at once, and its completed
requests/s recorded beside the prediction (``capacity_check``; not one of the acceptance's figures;
``--no-capacity-check`` skips it).

The KV cache of each plan is capped at what ``max_seqs`` requests of the longest prompt and output
need (the plan's own capacity would fill the GPU); the engine and the simulator both read the
capped ``memory_gb.kv_tokens``. The plan's ``backend`` is the engine's (``--backend``), so the cost
model costs the layers the engine runs.

Summary per model and over all: the median and the p90 (linear interpolation) of the absolute
errors of every (case, rate, figure); the acceptance asks for at most 10% and 20%, with every case of
both models measured at three rates (``complete`` and ``covers`` in the summaries).

Each case runs in a fresh subprocess (its own session, killed with its worker ranks after
``--case-timeout`` s), so a hang or an out-of-memory records an error and the run goes on; the
report is rewritten after each case (and the child writes after each rate, so a timed-out case keeps
the rates it finished). Before the rates, the engine is warmed up with the workload's prompt lengths and with one replay
of each rate's traffic (other requests, untimed): the engine's load captures every decode and
mixed step graph, but the vision tower's graphs are captured per image grid the first time one is
met, and a capture inside a measured window costs that step tens of milliseconds that no
steady-state server pays. Each rate records the graphs still captured during it
(``graphs_captured``: the replicas' reporting ranks, ``Engine.graph_captures``).

``--trace`` records every step of each rate, and of the capacity check (under ``capacity``), in
DIR/fidelity_2gpu.steps.json.gz (``executors.trace``) and costs each again (``bench/step_fidelity.py``:
a table by kind of step in the report).

``--resume`` keeps the cases of an existing DIR/fidelity_2gpu.json that
have no error (and its other models), so the run can be split across several shorter calls; it
must be given the report's rates, duration, backend, rate cap and seed (else a usage error, exit 2,
and the report stays as it was); ``--rerun CASES`` measures those of the run's cases again all the same
(after an engine change, say);
``--weights-dir`` keeps the random checkpoints for those calls.

``--tiny``: the tiny test configs (fp32, 2 gloo ranks), costed on the catalog's nominal ``cpu``
device, 1 s per rate, the rates scaled together so the highest is at most ``--max-rate`` (4 req/s):
it checks the plumbing and the report, not the simulator (the nominal CPU is no measured device).

    python bench/fidelity_2gpu.py --out DIR                    # on a machine with 2 GPUs (~1.5 h, 4-6 min a case)
    python bench/fidelity_2gpu.py --out DIR --resume --weights-dir W --models llama --cases single,tp2
    python bench/fidelity_2gpu.py --out DIR --tiny             # CPU dry run (gloo ranks, tiny configs)

Writes DIR/fidelity_2gpu.json and DIR/fidelity_2gpu.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import step_fidelity  # noqa: E402

# the figures the acceptance names, as ``planner.bench_workload.compare`` names its rows
FIGURES = ("ttft_ms p50", "ttft_ms p90", "tpot_ms p50", "tpot_ms p90", "output_tok_s")
CAPACITY = "capacity"  # the steps file's key of a traced capacity check (beside the rates' fractions)
MEDIAN_MAX, P90_MAX = 0.10, 0.20
LLAMA_CASES = ("single", "tp2", "sp2", "shift-sp2", "pp2", "dp2")  # bench/mesh_speed.py's meshes

MODELS: dict[str, dict[str, Any]] = {
    "llama": {
        "preset": "llama-3.1-8b", "tiny": "llama", "kind": "text",
        "workload": {"input_tokens": {"mean": 512, "max": 2048}, "output_tokens": {"mean": 128, "max": 512}},
        "tiny_workload": {"input_tokens": {"mean": 16, "max": 48}, "output_tokens": {"mean": 8, "max": 16}},
    },
    "qwen2-vl": {
        "preset": "qwen2-vl-7b", "tiny": "qwen2_vl", "kind": "image-text",
        "workload": {"input_tokens": {"mean": 256, "max": 1024}, "output_tokens": {"mean": 128, "max": 512},
                     "images": {"per_request": [0, 1, 2, 3, 4], "weights": [0.2, 0.3, 0.2, 0.15, 0.15],
                                "resolution": [[448, 448], [896, 896], [1280, 720]]}},
        "tiny_workload": {"input_tokens": {"mean": 16, "max": 48}, "output_tokens": {"mean": 8, "max": 16},
                          "images": {"per_request": [0, 1, 2, 3, 4], "weights": [0.2, 0.3, 0.2, 0.15, 0.15],
                                     "resolution": [[56, 56], [112, 112]]}},
    },
}


def model_cases(model: str) -> list[str]:
    """The cases of a model: mesh_speed's meshes for the text model, vl_speed's cases for the VL one."""
    if MODELS[model]["kind"] == "text":
        from bench.mesh_speed import MESHES

        assert all(c in MESHES for c in LLAMA_CASES)
        return list(LLAMA_CASES)
    from bench.vl_speed import CASES

    return list(CASES)


def pick_cases(model: str, wanted: str | None) -> list[str]:
    """``--cases``: names, each matching a case or the mesh before its ``/`` (``tp2`` picks
    ``tp2/stage0_tp`` and ``tp2/stage0_dp`` of the VL model)."""
    cases = model_cases(model)
    if not wanted:
        return cases
    names = [w for w in wanted.split(",") if w]
    return [c for c in cases if c in names or c.split("/")[0] in names]


def kept_cases(old: dict[str, Any] | None, model: str, cases: list[str], rerun: set[str]) -> dict[str, Any]:
    """The cases of ``model`` a resumed run keeps from the ``old`` report: those it runs (``cases``),
    finished without an error, and not named to be measured again (``rerun``)."""
    done = ((old or {}).get("models", {}).get(model, {}).get("cases", {}))
    return {c: x for c, x in done.items() if c in cases and "error" not in x and c not in rerun}


def model_spec(model: str, tiny: bool, backend: str) -> tuple[Any, dict]:
    """(the spec the plans are pinned for, the model's HF config): 2 GPUs of one node (CPU ranks
    with ``--tiny``), the model's traffic, the engine's backend."""
    from bench.common import spec_for
    from graph.hf_config import load_config
    from planner.spec import RuntimeSection, WorkloadSection

    m = MODELS[model]
    vl = m["kind"] != "text"
    if tiny:
        cfg_path = str(ROOT / "tests" / "tiny" / f"{m['tiny']}.json")
        spec = spec_for(f"tiny-{model}-fidelity", cfg_path, None, 2, "fp32", images=vl)
        spec = spec.model_copy(update={"hardware": spec.hardware.model_copy(update={"gpu": "cpu"})})
        cfg = json.loads(Path(cfg_path).read_text())
        traffic = m["tiny_workload"]
    else:
        spec = spec_for(f"{m['preset']}-2xh200-fidelity", None, m["preset"], 2, "bf16", images=vl)
        cfg = load_config(preset=m["preset"])
        traffic = m["workload"]
    workload = WorkloadSection.model_validate({"arrival_rate": 1.0, **traffic})
    runtime = RuntimeSection(backend=backend if backend in ("eager", "compile", "tensorrt") else "eager")
    return spec.model_copy(update={"workload": workload, "runtime": runtime}), cfg


def case_plan(model: str, spec: Any, cost: Any, case: str, max_seqs: int, max_tokens: int) -> Any:
    """The pinned plan of a case (vl_speed's ``case_plan`` for the VL model; mesh_speed's meshes as
    ``pinned_plan`` arguments for the text model)."""
    if MODELS[model]["kind"] != "text":
        from bench.vl_speed import case_plan as vl_case_plan

        return vl_case_plan(spec, cost, case, max_seqs, max_tokens)
    from bench.mesh_speed import MESHES
    from planner.pinned import pinned_plan

    m = MESHES[case]
    kw = {k: m[k] for k in ("dp", "pp", "tp", "sp") if k in m}
    return pinned_plan(spec, cost, name=f"fidelity-{model}-{case}", max_seqs=max_seqs, max_batch_tokens=max_tokens,
                       shift="shift" in m, **kw)


def longest_request(wl: Any) -> int:
    """Tokens of the longest request the workload can draw (prompt with the most image tokens + output)."""
    img = max((wl.rule.tokens(w, h)[0] for w, h in wl.resolutions), default=0) if wl.rule else 0
    return int(wl.input_tokens.hi) + max(wl.image_counts) * img + int(wl.output_tokens.hi)


def cap_kv(plan: Any, tokens: int) -> Any:
    """The plan with its KV capacity (tokens per replica) at most ``tokens``, in whole blocks."""
    b = plan.scheduler.block_size
    kvt = min(int(plan.memory_gb.kv_tokens), -(-tokens // b) * b)
    mem = plan.memory_gb.model_copy(update={"kv_tokens": kvt})
    return plan.model_copy(update={"memory_gb": mem})


def predicted_capacity(plan: Any, cost: Any, workload: Any, seed: int) -> dict[str, Any]:
    """The simulator's completed requests/s with ``8 x max_seqs x dp`` requests arriving at once."""
    from costmodels.simulator import coster_for, simulate

    n = 8 * plan.scheduler.max_seqs * plan.mesh.dp
    r = simulate(plan, None, workload.with_rate(1e6).with_requests(n), seed=seed, coster=coster_for(plan, cost))
    return {"rps": r.throughput_rps, "requests": n, "output_tok_s": r.output_tok_s, "span_s": r.span_s,
            "preemptions": r.preemptions}


# ------------------------------------------------------------------ one case (in its own process)


def run_case(job: dict[str, Any]) -> None:
    """One engine load, then each rate in turn; ``job["out"]`` rewritten after each rate."""
    import executors
    from costmodels.simulator import cost_model_for_plan
    from planner.bench_workload import compare, measured_result, predicted_result, replay_requests, sample_requests
    from planner.bench_workload import engine_requests, replay_context
    from plans.schema import load_plan

    out: dict[str, Any] = {"rates": []}
    save = lambda: Path(job["out"]).write_text(json.dumps(clean(out), indent=1))  # noqa: E731
    try:
        plan_path = Path(job["plan"])
        plan = load_plan(plan_path)
        cost = cost_model_for_plan(plan, base_dir=plan_path.parent)
        # every request the case sends, sampled once: the warm-up's, each rate's untimed and timed
        # replays, the capacity check's; the engine serves the longest of them, so its load captures
        # step graphs up to that context only
        wl_of = lambda rate, seed: sample_requests(job["workload"], rate=rate, duration=job["duration"], seed=seed)  # noqa: E731
        warm_reqs = sample_requests(job["workload"].with_requests(job["warmup"]), rate=1e6, duration=None,
                                    seed=job["seed"] + 1000)[1]
        untimed = [wl_of(rate, job["seed"] + 1000)[1] for rate in job["rates"]]
        timed = [wl_of(rate, job["seed"]) for rate in job["rates"]]
        capacity = (sample_requests(job["workload"].with_requests(job["capacity_requests"]), rate=1e6, duration=None,
                                    seed=job["seed"])[1] if job["capacity_requests"] else [])
        sent = warm_reqs + [r for reqs in untimed for r in reqs] + [r for _wl, reqs in timed for r in reqs] + capacity
        out["max_context"] = replay_context(plan, plan_path.parent, sent, new_tokens=4)  # the warm-up asks 4 tokens
        t = time.perf_counter()
        with executors.load(plan, weights=job["weights"], device=job["device"], backend=job["backend"],
                            seed=job["seed"], trace=job.get("trace", False), max_context=out["max_context"]) as eng:
            out["load_s"] = round(time.perf_counter() - t, 2)
            # warm-up beyond replay's own: prompts of the workload's lengths (compiled shapes, graphs)
            t = time.perf_counter()
            a, v = eng.args, eng.args.vision
            eng.generate(engine_requests(warm_reqs, a.vocab, a.image_token_id, v.patch_dim if v else 0,
                                         v.merge if v else 2, job["seed"] + 1000), max_new_tokens=4)
            # and every rate's traffic (other requests), untimed: the step shapes serving meets get
            # their graphs here, as on a server that has been up a while (light traffic forms steps
            # of few sequences that heavy traffic does not)
            for warm in untimed:
                replay_requests(eng, warm, job["seed"] + 1000)
            out["warmup_s"] = round(time.perf_counter() - t, 2)
            out["graphs_after_warmup"] = eng.graph_captures()
            save()
            for frac, (wl, reqs) in zip(job["fractions"], timed):
                t = time.perf_counter()
                before = eng.graph_captures()
                if eng.step_trace is not None:
                    eng.step_trace.clear()
                measured = replay_requests(eng, reqs, job["seed"])
                after = eng.graph_captures()
                m = measured_result(plan, measured, reqs, None)
                p = predicted_result(plan, cost, reqs, None)
                rows = {r["figure"]: r for r in compare(m, p)}
                out["rates"].append({
                    "fraction": frac, "rate_rps": wl.rate, "requests": len(reqs), "completed": m.completed,
                    "rejected": m.rejected, "engine_errors": list(measured["errors"].values())[:3],
                    "figures": {f: {k: rows[f][k] for k in ("predicted", "measured", "error")} for f in FIGURES},
                    "other": {f: {k: r[k] for k in ("predicted", "measured", "error")}
                              for f, r in rows.items() if f not in FIGURES},
                    "wall_s": round(time.perf_counter() - t, 2),
                    # graphs captured while this rate ran (their capture time is in the measured figures;
                    # the replicas' reporting ranks; None without graphs)
                    "graphs_captured": None if after is None else {
                        "graphs": sum(after[k] - before[k] for k in ("decode", "mixed", "tower")),
                        "capture_s": round(after["capture_s"] - before["capture_s"], 3)}})
                if eng.step_trace is not None:  # the replay's own steps (``replay_requests`` leaves its warm-up out)
                    out["rates"][-1]["steps"] = step_fidelity.compact(eng.step_trace)
                print(f"  rate {wl.rate:.4g} req/s ({frac} of capacity): {len(reqs)} requests, "
                      + ", ".join(f"{f} {r['predicted']:.4g}/{r['measured']:.4g}" for f, r in rows.items()
                                  if f in FIGURES), flush=True)
                save()
            if capacity:
                out["capacity_check"] = capacity_check(eng, plan, cost, capacity, job["seed"])
                save()
            out["modes"] = dict(eng.mode_counts)
    except Exception as e:  # the parent records it beside the rates that ran
        out["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    save()


def capacity_check(eng: Any, plan: Any, cost: Any, reqs: list[Any], seed: int) -> dict[str, Any]:
    """The capacity itself, measured: ``reqs`` (the requests of ``predicted_capacity``, all at once)
    replayed on the engine and run in the simulator; completed requests/s of each and the error."""
    from planner.bench_workload import measured_result, predicted_result, replay_requests

    t = time.perf_counter()
    m = measured_result(plan, replay_requests(eng, reqs, seed), reqs, None)
    p = predicted_result(plan, cost, reqs, None)
    err = p.throughput_rps / m.throughput_rps - 1 if m.throughput_rps else math.nan
    print(f"  capacity: predicted {p.throughput_rps:.4g} req/s, measured {m.throughput_rps:.4g} req/s", flush=True)
    out = {"requests": len(reqs), "completed": m.completed, "predicted_rps": p.throughput_rps,
           "measured_rps": m.throughput_rps, "error": err, "wall_s": round(time.perf_counter() - t, 2)}
    if eng.step_trace is not None:  # its own steps (``replay_requests`` leaves its warm-up out)
        out["steps"] = step_fidelity.compact(eng.step_trace)
    return out


def spawn_case(job: dict[str, Any], timeout: float, work: Path,
               env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``run_case`` in a fresh Python process of its own session; after ``timeout`` s kill that
    session (the process and its worker ranks). Returns what the child wrote, with ``error`` set
    when it failed, crashed or timed out."""
    jf = work / "job.pkl"
    jf.write_bytes(pickle.dumps(job))
    err = work / "stderr.txt"
    Path(job["out"]).unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.update({k: v for k, v in (env_extra or {}).items() if k not in os.environ})
    with open(err, "w") as ef:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(jf)], cwd=ROOT, env=env,
                                stderr=ef, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    try:
        r = json.loads(Path(job["out"]).read_text())
    except (OSError, ValueError):
        r = {"rates": []}
    tail = err.read_text(errors="replace")[-600:].strip()
    if timed_out:
        r["error"] = f"timed out after {timeout:g} s ({len(r['rates'])} of {len(job['rates'])} rates done)"
    elif rc != 0 and "error" not in r:
        r["error"] = f"exit code {rc}: {tail}"
    if "error" in r and tail:
        r["stderr_tail"] = tail
    return r


# ------------------------------------------------------------------ summaries


def error_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and p90 of the absolute errors of every figure of ``rows`` (the rate rows of one or
    several cases), overall and per figure; ``missing``: figures without a finite error."""
    from costmodels.simulator.metrics import percentile

    def stats(errs: list[float]) -> dict[str, Any]:
        med, p90 = percentile(errs, 50), percentile(errs, 90)
        return {"n": len(errs), "median_abs_error": med, "p90_abs_error": p90,
                "meets": bool(errs) and med <= MEDIAN_MAX and p90 <= P90_MAX}

    per: dict[str, list[float]] = {f: [] for f in FIGURES}
    missing = 0
    for r in rows:
        for f in FIGURES:
            e = r["figures"][f]["error"]
            if e is None or not math.isfinite(e):
                missing += 1
            else:
                per[f].append(abs(e))
    out = stats([e for f in FIGURES for e in per[f]])
    out["missing"] = missing
    out["per_figure"] = {f: stats(per[f]) for f in FIGURES}
    return out


def summarize_report(report: dict[str, Any]) -> None:
    """Per model and overall: the error statistics; ``complete``: every asked case measured every
    rate; ``covers``: what was asked is what the acceptance names (every case of every model, at
    least three rates)."""
    every: list[dict[str, Any]] = []
    complete, covers = True, set(report["models"]) == set(MODELS)
    for name, m in report["models"].items():
        rows = [r for c in m["cases"].values() for r in c.get("rates", [])]
        m["summary"] = error_stats(rows)
        done = all("error" not in c and len(c.get("rates", [])) == len(report["rate_fractions"])
                   for c in m["cases"].values()) and len(m["cases"]) == len(m["asked_cases"])
        m["summary"]["complete"] = done
        m["summary"]["covers"] = (m["asked_cases"] == model_cases(name)) and len(report["rate_fractions"]) >= 3
        complete, covers = complete and done, covers and m["summary"]["covers"]
        every += rows
    report["summary"] = error_stats(every)
    report["summary"]["complete"] = complete and bool(report["models"])
    report["summary"]["covers"] = covers


def verdict(s: dict[str, Any], what: str) -> str:
    """One plain sentence: whether the acceptance holds for ``what``."""
    if not s["n"]:
        return f"Nothing was measured for {what}, so the acceptance is not shown."
    nums = (f"median absolute error {100 * s['median_abs_error']:.1f}% (at most {100 * MEDIAN_MAX:.0f}%) and p90 "
            f"{100 * s['p90_abs_error']:.1f}% (at most {100 * P90_MAX:.0f}%) over {s['n']} figures")
    if s["meets"] and s["complete"] and s.get("covers", True):
        return f"The acceptance holds for {what}: {nums}."
    if s["meets"] and s["complete"]:
        return (f"The error bounds hold for {what} ({nums}), but the run did not ask for every model, case and "
                "rate the acceptance names, so the acceptance is not shown.")
    if s["meets"]:
        return (f"The error bounds hold for {what} on what was measured ({nums}), but not every case and rate was "
                "measured, so the acceptance is not shown.")
    return f"The acceptance does not hold for {what}: {nums}."


def clean(x: Any) -> Any:
    """JSON without NaN or infinities (null instead)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def markdown(r: dict[str, Any]) -> str:
    def cell(x: dict[str, Any]) -> str:
        p, m, e = x["predicted"], x["measured"], x["error"]
        f = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        return f"{f(p)} / {f(m)} ({'-' if e is None else f'{100 * e:+.1f}%'})"

    lines = ["# Simulator vs engine on two GPUs", "",
             f"{r['device']}, driver {r.get('driver', '-')}, torch {r['torch']}, transformers {r['transformers']}, "
             f"python {r['python']}, layers "
             f"{r['backend']}. " + (f"Command: `{r['command']}`." if len(r.get("commands", [])) < 2 else
                                    "Commands (one report, cases run in turn): "
                                    + "; ".join(f"`{c}`" for c in r["commands"]) + "."), "",
             f"Each rate replays {r['duration_s']} s of arrivals at a fraction "
             f"({', '.join(map(str, r['rate_fractions']))}) "
             "of the plan's capacity as the simulator predicts it (requests/s with the workload's requests all "
             "arriving at once), on one engine load per case, through `plan bench --workload --compare-sim`'s code. "
             "Each cell: predicted / measured (error = predicted / measured - 1). TTFT and TPOT in ms, throughput "
             "in output tokens/s.", ""]
    if r.get("repredicted"):
        lines[5:5] = [f"Predictions made again without the engine (`{r['repredicted']['command']}`, cost profile "
                      f"`{r['repredicted'].get('profile', '-')}`): the measured figures and the rates are those of the "
                      "run above.", ""]
    for name, m in r["models"].items():
        lines += [f"## {name}: {m['model']}", "", f"Traffic: {m['traffic']}", "",
                  "| case | mesh | capacity req/s | rate req/s (fraction) | requests | TTFT p50 | TTFT p90 | "
                  "TPOT p50 | TPOT p90 | output tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for case, c in m["cases"].items():
            mesh = c.get("mesh", "-") + (f" shift {c['shift_threshold']}" if c.get("shift_threshold") else "") \
                + (f", encoder {c['placement']}" if c.get("placement") not in (None, "none") else "")
            cap = c.get("capacity", {}).get("rps")
            cap_s = "-" if cap is None else f"{cap:.3g}"
            for x in c.get("rates", []):
                lines.append(f"| {case} | {mesh} | {cap_s} | {x['rate_rps']:.3g} ({x['fraction']}) | {x['requests']} | "
                             + " | ".join(cell(x["figures"][f]) for f in FIGURES) + " |")
            if "error" in c:
                lines.append(f"| {case} | {mesh} | {cap_s} | error: {c['error'][:160].replace('|', '/')} | | | | | | |")
        checks = [(case, c["capacity_check"]) for case, c in m["cases"].items() if c.get("capacity_check")]
        if checks:
            lines += ["", "Capacity (not in the acceptance's figures): the capacity prediction's requests, all at once, "
                      "on the engine; completed requests/s.", "",
                      "| case | requests | predicted req/s | measured req/s | error |", "|---|---|---|---|---|"]
            lines += [f"| {case} | {x['requests']} | {x['predicted_rps']:.4g} | "
                      + ("-" if x["measured_rps"] is None else f"{x['measured_rps']:.4g}") + " | "
                      + ("-" if x["error"] is None else f"{100 * x['error']:+.1f}%") + " |" for case, x in checks]
        costed = [(case, key, x["step_costs"]) for case, c in m["cases"].items()
                  for key, x in traceable_runs(c) if x.get("step_costs")]
        if costed:
            lines += ["", "Steps (`--trace`; `bench/step_fidelity.py`): each step the engine ran, costed again by the "
                      "simulator's coster, against its share of the engine's wall time (period) and its GPU time; "
                      "milliseconds.", ""] + step_fidelity.markdown(costed)
        lines += ["", summary_lines(m["summary"]), "", verdict(m["summary"], name), ""]
    lines += ["## All models", "", summary_lines(r["summary"]), "", verdict(r["summary"], "the whole run"), ""]
    return "\n".join(lines)


def traceable_runs(c: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Case ``c``'s replays by their key in the steps file: each rate (its fraction) and the capacity check."""
    return [(str(x["fraction"]), x) for x in c.get("rates", [])] + [(CAPACITY, c.get("capacity_check") or {})]


def cost_steps_of(c: dict[str, Any], traced: dict[str, list[dict[str, Any]]], plan: Any) -> None:
    """Each traced rate of case ``c``, and its traced capacity check, gets ``step_costs``: its steps
    costed again (``bench/step_fidelity.py``)."""
    coster, encoder = step_fidelity.coster_of(plan), step_fidelity.in_step_encoder(plan)
    for key, x in traceable_runs(c):
        if key in traced:
            x["step_costs"] = step_fidelity.summarize(step_fidelity.cost_steps(traced[key], coster, encoder))


def summary_lines(s: dict[str, Any]) -> str:
    pct = lambda v: "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"  # noqa: E731
    rows = ["| figures | n | median abs error | p90 abs error |", "|---|---|---|---|",
            f"| all | {s['n']} | {pct(s['median_abs_error'])} | {pct(s['p90_abs_error'])} |"]
    rows += [f"| {f} | {x['n']} | {pct(x['median_abs_error'])} | {pct(x['p90_abs_error'])} |"
             for f, x in s["per_figure"].items()]
    if s.get("missing"):
        rows.append(f"\n{s['missing']} figures had no finite error (nothing measured) and are left out.")
    return "\n".join(rows)


# ------------------------------------------------------------------ predictions again, measurements kept


def repredict(report: dict[str, Any], src: Path, out: Path, command: str,
              traced: dict[str, Any] | None = None) -> dict[str, Any]:
    """A finished run's report (read from ``src``) with every prediction made again by the cost
    model as it is now: per case the plan the run pinned (``plan_yaml``), per rate the same requests
    (the workload sampled at the run's rate, duration and seed), the measured figures kept. The rates stay the run's (they
    were fractions of the capacity predicted then). ``traced``: the steps file beside ``src`` (a
    ``--trace`` run), costed again too and copied to ``out``."""
    from bench.common import write_report
    from costmodels.simulator import cost_model_for_plan
    from planner.bench_workload import predicted_result, sample_requests
    from planner.inputs import cost_model_of, workload_of

    report["repredicted"] = {"command": command, "from": src.name}
    steps_path = step_fidelity.steps_beside(src)
    traced = traced or {}
    for model, m in report["models"].items():
        spec, _cfg = model_spec(model, report["device"].startswith("2 x cpu"), report["backend"])
        cost, _ = cost_model_of(spec)
        wl = workload_of(spec, cost.info)
        for case, c in m["cases"].items():
            if "plan_yaml" not in c:
                c["repredict_error"] = "no plan_yaml in the report (a run before --repredict existed)"
                continue
            plan = step_fidelity.plan_of(report, model, case)
            pcost = cost_model_for_plan(plan)
            if case in traced.get(model, {}):
                cost_steps_of(c, traced[model][case], plan)
            k = c.get("capacity_check")
            if k:  # the capacity's requests, all at once, predicted again beside the engine's completions
                _wl, reqs = sample_requests(wl.with_requests(k["requests"]), rate=1e6, duration=None, seed=report["seed"])
                k["predicted_rps"] = predicted_result(plan, pcost, reqs, None).throughput_rps
                k["error"] = k["predicted_rps"] / k["measured_rps"] - 1 if k["measured_rps"] else None
            for row in c.get("rates", []):
                _wl, reqs = sample_requests(wl, rate=row["rate_rps"], duration=report["duration_s"], seed=report["seed"])
                p = predicted_result(plan, pcost, reqs, None)
                for f, x in {**row["figures"], **row.get("other", {})}.items():
                    key, _, sub = f.partition(" ")
                    v = getattr(p, key)
                    v = v[sub] if sub else v
                    mv = x["measured"]
                    x["predicted"] = v
                    x["error"] = (v / mv - 1) if (mv and math.isfinite(v)) else None
            report["repredicted"]["profile"] = pcost.profile_id
    summarize_report(report)
    write_report(out, "fidelity_2gpu", clean(report), markdown(clean(report)))
    if traced and steps_path.resolve() != (out / step_fidelity.STEPS_FILE).resolve():
        shutil.copyfile(steps_path, out / step_fidelity.STEPS_FILE)
    print((out / "fidelity_2gpu.md").read_text())
    return report


# ------------------------------------------------------------------ the run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="writes DIR/fidelity_2gpu.json and .md")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: tiny configs, 2 gloo ranks, short runs")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cases", default=None, help="case names or meshes (default every case of each model)")
    ap.add_argument("--rates", default="0.2,0.5,0.9", help="fractions of the predicted capacity")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of arrivals per rate (default 30; 1 with --tiny)")
    ap.add_argument("--max-rate", type=float, default=None,
                    help="cap on the replayed rate, requests/s (default none; 4 with --tiny, where CPU ranks run "
                         "far below the cost model's nominal CPU)")
    ap.add_argument("--backend", default=None, help="layers: compile (default on GPUs) or eager (default with --tiny)")
    ap.add_argument("--case-timeout", type=float, default=None,
                    help="seconds after which a case's processes are killed (default 300 + 6 x duration x rates)")
    ap.add_argument("--max-seqs", type=int, default=None,
                    help="running requests per replica (default 64; 8 with --tiny)")
    ap.add_argument("--no-capacity-check", action="store_true",
                    help="skip replaying the capacity prediction's requests (all at once) on the engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace", action="store_true",
                    help="record each rate's step trace (DIR/fidelity_2gpu.steps.json.gz) and cost every step again "
                         "(bench/step_fidelity.py: predicted against measured step times by kind of step)")
    ap.add_argument("--weights-dir", type=Path, default=None,
                    help="keep each model's random checkpoint here and reuse it in later calls "
                         "(default: a temporary folder)")
    ap.add_argument("--resume", action="store_true", help="keep the cases of DIR/fidelity_2gpu.json without errors")
    ap.add_argument("--rerun", default="", help="with --resume: these cases (names or meshes) are measured again")
    ap.add_argument("--repredict", type=Path, default=None, metavar="JSON",
                    help="no engine: the predictions of a finished run's cases again, with the cost model as it is "
                         "now, beside that run's measurements (writes DIR/fidelity_2gpu.{json,md})")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        run_case(pickle.loads(a.child.read_bytes()))
        return {}
    if a.out is None:
        ap.error("--out DIR is required")
    from bench.common import command_line, driver_version, write_checkpoint, write_report

    command = command_line("bench/fidelity_2gpu.py", argv)
    if a.repredict is not None:
        try:
            report = json.loads(a.repredict.read_text())
            report["models"], report["duration_s"], report["seed"]  # noqa: B018 -- a fidelity report's keys
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--repredict: {a.repredict} is not a readable fidelity_2gpu report ({type(e).__name__}: {e})")
        steps_path = step_fidelity.steps_beside(a.repredict)
        try:
            traced = step_fidelity.read_steps(steps_path) if steps_path.is_file() else {}
        except (OSError, ValueError, EOFError) as e:
            ap.error(f"--repredict: {steps_path} is not a readable steps file ({type(e).__name__}: {e})")
        return repredict(report, a.repredict, a.out, command, traced)
    import torch
    import transformers

    from costmodels.simulator import cost_model_for_plan
    from planner.inputs import cost_model_of, workload_of
    from plans.schema import save_plan

    device = "cpu" if a.tiny else "cuda"
    a.backend = a.backend or ("eager" if a.tiny else "compile")
    a.duration = a.duration or (1.0 if a.tiny else 30.0)
    a.max_rate = a.max_rate or (4.0 if a.tiny else None)
    max_seqs = a.max_seqs or (8 if a.tiny else 64)
    max_tokens = 256 if a.tiny else 8192
    fractions = [float(x) for x in a.rates.split(",") if x]
    timeout = a.case_timeout or (300 + 6 * a.duration * len(fractions))  # the warm-up replays every rate too
    dtype = torch.float32 if a.tiny else torch.bfloat16
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; known: {', '.join(MODELS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "fidelity_2gpu.json"
    if a.rerun and not a.resume:
        ap.error("--rerun measures cases of a resumed report again: give --resume too")
    unknown = [n for n in a.rerun.split(",") if n and not any(pick_cases(m, n) for m in models)]
    if unknown:
        ap.error(f"--rerun: {', '.join(unknown)} names no case of {', '.join(models)}")
    try:
        old = json.loads(path.read_text()) if a.resume and path.is_file() else None
    except (OSError, ValueError) as e:
        ap.error(f"--resume: {path} is not a readable report ({type(e).__name__}: {e})")
    keys = ("rate_fractions", "duration_s", "backend", "max_rate", "seed")
    if old is not None and [old.get(k) for k in keys] != [fractions, a.duration, a.backend, a.max_rate, a.seed]:
        differ = {k: (old.get(k), v) for k, v in zip(keys, [fractions, a.duration, a.backend, a.max_rate, a.seed])
                  if old.get(k) != v}
        ap.error(f"--resume: {path} was run with other settings ({', '.join(f'{k} {o} there, {n} here' for k, (o, n) in differ.items())}); "
                 "give the same ones, or another --out (nothing was written)")
    report: dict[str, Any] = {
        "command": command, "commands": (old or {}).get("commands", []) + [command],
        "device": (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}") if device == "cuda"
                  else "2 x cpu (gloo ranks)",
        "driver": driver_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "backend": a.backend, "duration_s": a.duration, "rate_fractions": fractions, "max_rate": a.max_rate,
        "seed": a.seed, "max_seqs": max_seqs, "max_batch_tokens": max_tokens, "case_timeout_s": timeout,
        "acceptance": {"median_abs_error_max": MEDIAN_MAX, "p90_abs_error_max": P90_MAX, "figures": list(FIGURES)},
        # with --resume, the models of the existing report that this call does not run stay as they were
        "models": {k: v for k, v in (old or {}).get("models", {}).items() if k not in models},
    }

    # model -> case -> rate fraction -> step records (--trace); with --resume the kept cases' steps stay
    steps_path = a.out / step_fidelity.STEPS_FILE
    try:
        steps: dict[str, dict[str, Any]] = step_fidelity.read_steps(steps_path) if old is not None and steps_path.is_file() else {}
    except (OSError, ValueError, EOFError) as e:
        ap.error(f"--resume: {steps_path} is not a readable steps file ({type(e).__name__}: {e})")

    def save() -> None:
        summarize_report(report)
        write_report(a.out, "fidelity_2gpu", clean(report), markdown(clean(report)))
        if steps:
            step_fidelity.write_steps(steps_path, steps)

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fidelity-"))
    try:
        for model in models:
            spec, cfg = model_spec(model, a.tiny, a.backend)
            cost, _ = cost_model_of(spec)
            wl = workload_of(spec, cost.info)
            cases = pick_cases(model, a.cases)
            kept = kept_cases(old, model, cases, set(pick_cases(model, a.rerun)) if a.rerun else set())
            mr = report["models"][model] = {
                "model": ("tiny " + MODELS[model]["tiny"] + " config" if a.tiny
                          else MODELS[model]["preset"] + " shapes") + f", {str(dtype)[6:]}, random weights",
                "traffic": spec.workload.model_dump(exclude_none=True, exclude={"arrival_rate", "requests", "seed"}),
                "asked_cases": cases, "cases": dict(kept)}
            todo = [c for c in cases if c not in kept]
            if not todo:
                save()
                continue
            ckpt = (a.weights_dir or work) / f"{model}-{'tiny' if a.tiny else 'full'}-seed{a.seed}"
            if not (ckpt / "model.safetensors.index.json").is_file():
                mr["checkpoint"] = write_checkpoint(cfg, ckpt, torch.device(device), dtype, seed=a.seed)
                if device == "cuda":
                    torch.cuda.empty_cache()
            for case in todo:
                t = time.perf_counter()
                c: dict[str, Any] = {}
                steps.get(model, {}).pop(case, None)  # a case measured again keeps none of its old steps
                try:
                    plan = case_plan(model, spec, cost, case, max_seqs, max_tokens)
                    plan = cap_kv(plan, max_seqs * longest_request(wl)).check()
                    c.update(mesh=plan.mesh.label(), placement=plan.vision.placement,
                             shift_threshold=plan.shift.threshold_tokens, kv_tokens=plan.memory_gb.kv_tokens)
                    c["capacity"] = predicted_capacity(plan, cost_model_for_plan(plan), wl, a.seed)  # as the child predicts
                    rates = [f * c["capacity"]["rps"] for f in fractions]
                    if a.max_rate and max(rates) > a.max_rate:  # all rates scaled alike: the fractions stay
                        c["rate_scale"] = a.max_rate / max(rates)
                        rates = [r * c["rate_scale"] for r in rates]
                    pf = work / f"{model}-{case.replace('/', '-')}.plan.yaml"
                    save_plan(plan, pf)
                    c["plan_yaml"] = pf.read_text()  # what --repredict costs again
                    print(f"{model} {case}: {plan.mesh.label()}, capacity {c['capacity']['rps']:.4g} req/s", flush=True)
                    job = {"plan": str(pf), "weights": str(ckpt), "device": device, "backend": a.backend,
                           "seed": a.seed, "workload": wl, "fractions": fractions, "rates": rates,
                           "duration": a.duration, "warmup": 2 * max_seqs if not a.tiny else 2,
                           "capacity_requests": 0 if a.no_capacity_check else c["capacity"]["requests"],
                           "trace": a.trace, "out": str(work / "case.json")}
                    # CPU ranks: one thread each (a single-rank engine's threads spin against the replay loop)
                    c.update(spawn_case(job, timeout, work, {"OMP_NUM_THREADS": "1"} if a.tiny else None))
                    traced = {str(r["fraction"]): r.pop("steps") for r in c.get("rates", []) if "steps" in r}
                    if "steps" in c.get("capacity_check", {}):
                        traced[CAPACITY] = c["capacity_check"].pop("steps")
                    if traced:
                        steps.setdefault(model, {})[case] = traced
                        cost_steps_of(c, traced, plan)
                except Exception as e:
                    c["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                c["wall_s"] = round(time.perf_counter() - t, 1)
                mr["cases"][case] = c
                print(f"{model} {case}: " + (c["error"] if "error" in c else f"{len(c['rates'])} rates"), flush=True)
                save()
            if a.weights_dir is None:
                shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    print((a.out / "fidelity_2gpu.md").read_text())
    return json.loads(path.read_text())


if __name__ == "__main__":
    main()
