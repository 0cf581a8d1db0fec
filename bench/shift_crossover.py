"""The shift threshold, checked: measured SP2 vs TP2 step-time crossover beside the planner's threshold.

Llama-3.1-8B shapes (the preset's config), bf16, seeded random weights drawn on each GPU, two GPUs.
The plan is the planner's own: ``planner.api.compile_spec`` on a spec for this model on 2 x H200 with
the search pinned to ``sp = 2`` (dp = pp = tp = 1), which makes a shift plan; its
``shift.threshold_tokens`` is what the planner writes (steps of at most that many tokens run as TP
over both GPUs), so the planner's crossover is ``threshold + 1``. The cost model's own crossover
(``CostModel.shift_crossover``, steps modelled as prefill chunks of up to 1,024 tokens, what a
hand-pinned plan writes) is reported beside it.

Each rank builds the engine's own worker (``executors.worker.RankRunner``, the plan's stage with both
weight layouts) and runs steps it packs with the scheduler's ``build_microbatch``, the mode of the
micro-batch forced to ``tp`` (plain TP over both GPUs) or ``sp_tp`` (Ulysses SP over both GPUs,
whole weights) the way the driver sets it (``ParallelDims.mode_for``'s choice, overridden). Steps
run as in the engine: steps of up to 2,048 tokens replay CUDA graphs (``executors.graphs.MixedGraphs``,
captured in the warm-up runs; ``--no-cuda-graphs`` runs them eagerly; SP x TP steps only over the LL
all-to-all, ``SHIFTPLAN_A2A_LL``, recorded as ``sp_graphed``), larger ones run eagerly, with the layers compiled (``--backend compile``, the default on GPUs; ``eager``
launches every op from Python). Two kinds of step of ``T`` tokens:

* ``prefill``: one sequence's first ``T`` prompt tokens;
* ``mixed``: a prefill chunk of ``T - D`` tokens plus ``D`` decodes (``--decodes``, default 32),
  each at a context of ``--context`` tokens (default 512).

``T`` runs over powers of two and their midpoints (64, 96, 128, ..., 16384). A step's time is the
median of ``--reps`` timed runs after ``--warmup`` untimed ones, each between CUDA events on rank 0
after a barrier (host clock on CPU ranks). The whole ``RankRunner.run`` is timed: embedding, layers
with their collectives, lm_head and sampling.

Crossover: the smallest grid point from which SP x TP is faster at every larger grid point (the
planner's definition), interpolated between that point ``T_hi`` and the one below it ``T_lo``
(where TP is faster) linearly in ``log T`` on the time difference ``d(T) = sp_tp(T) - tp(T)``:

    log T* = log T_lo + (log T_hi - log T_lo) * d(T_lo) / (d(T_lo) - d(T_hi))

Reported per kind with its ratio to the planner's crossover and whether it lies within 20%; a
planner threshold of the spec's largest step (SP x TP never wins up to it) agrees with a
measurement where SP x TP is not faster at the largest step. The spec's runtime backend is the
run's (``--backend``), so the plan is priced for the layers that ran. Beside each measured step
the cost model's prediction of the same step (``CostModel.step_wall_ms``: GPU time, and the host
side of steps the engine launches eagerly; ``costmodels.steps``).

    python bench/shift_crossover.py --out DIR            # on a machine with 2 GPUs (~1-2 min)
    python bench/shift_crossover.py --out DIR --tiny     # CPU dry run (2 gloo ranks, tiny config)
    python bench/shift_crossover.py --out DIR --report-only bench/results/shift_crossover.json
                                                         # rebuild the report on any machine: planner
                                                         # and predictions recomputed, steps as measured

Writes DIR/shift_crossover.json and DIR/shift_crossover.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("prefill", "mixed")
MODES = ("tp", "sp_tp")
WITHIN = 0.2


def sp_graphed(device: str) -> bool:
    """Whether the engine graphs SP x TP steps on this run's ranks (its LL all-to-all, CUDA only)."""
    from executors import all_to_all

    return device == "cuda" and all_to_all.ENABLED and all_to_all.triton is not None


def token_grid(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` to ``hi`` and the midpoints ``1.5 x`` between them."""
    out, t = [], lo
    while t <= hi:
        out.append(t)
        if t * 2 <= hi:
            out.append(t * 3 // 2)
        t *= 2
    return out


def step_batch(kind: str, T: int, decodes: int, context: int, vocab: int, block: int, seed: int) -> Any:
    """The micro-batch of one step of ``T`` tokens (see the module doc), packed by the scheduler's
    ``build_microbatch``; KV blocks handed out in order from block 0."""
    from executors.scheduler import Chunk, Seq, build_microbatch

    g = torch.Generator().manual_seed(seed)
    hi = min(vocab, 100_000)
    nxt = 0

    def blocks(n: int) -> list[int]:
        nonlocal nxt
        k = -(-n // block)
        nxt += k
        return list(range(nxt - k, nxt))

    n_pre = T if kind == "prefill" else T - decodes
    if n_pre < 1:
        raise ValueError(f"a mixed step of {T} tokens cannot hold {decodes} decodes and a prefill chunk")
    pre = Seq(req=0, tokens=torch.randint(10, hi, (n_pre,), generator=g).tolist(), prompt_len=n_pre, max_new=1)
    pre.blocks = blocks(n_pre)
    chunks = [Chunk(pre, n_pre)]
    if kind == "mixed":
        for i in range(decodes):
            s = Seq(req=1 + i, tokens=torch.randint(10, hi, (context + 1,), generator=g).tolist(), prompt_len=context,
                    max_new=context, computed=context)
            s.blocks = blocks(context + 1)
            chunks.append(Chunk(s, 1))
    return build_microbatch(chunks, "tp", block, None)


def blocks_needed(grid: list[int], decodes: int, context: int, block: int) -> int:
    """KV blocks for the largest step, plus one spare (its last slot is the scratch slot)."""
    return -(-max(grid) // block) + decodes * -(-(context + 1) // block) + 1


def rank_main(rank: int, world: int, init: str, job: dict[str, Any]) -> None:
    """One rank (``_rank_steps``); an error outside a step is written beside ``job['out']``."""
    try:
        _rank_steps(rank, world, init, job)
    except BaseException as e:
        import traceback

        Path(f"{job['out']}.rank{rank}.error").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise


def _rank_steps(rank: int, world: int, init: str, job: dict[str, Any]) -> None:
    """Process group, the plan's stage as the engine builds it, every (kind, T, mode) step timed;
    rank 0 rewrites ``job['out']`` after each step (a failing step records its error)."""
    import torch.distributed as dist

    from bench.common import DeviceRandomSource, median, timed_ms
    from executors.batch import Step
    from executors.config import run_dtypes
    from executors.parallel import build_par
    from executors.model import checkpoint_shapes
    from executors.worker import RankRunner, WorkerSpec
    from plans.schema import Plan

    cuda = job["device"] == "cuda"
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(1)  # a GPU rank's RankRunner sets it
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world)
    plan = Plan.model_validate_json(job["plan"])
    args = job["args"]
    par = build_par(plan.mesh, rank, dev)
    spec = WorkerSpec(job["plan"], args, None, 0, job["device"], job["blocks"], job["backend"],
                      cuda_graphs=job["cuda_graphs"])
    t = time.perf_counter()
    runner = RankRunner(spec, par, DeviceRandomSource(checkpoint_shapes(args), dev, run_dtypes(plan)[0]))
    res: dict[str, Any] = {"build_s": round(time.perf_counter() - t, 2), "steps": {k: {} for k in job["kinds"]}}
    bar = (lambda: dist.barrier(device_ids=[rank])) if cuda else dist.barrier
    step_id = 0

    def save() -> None:
        if rank == 0:  # whole or not at all: the ranks may be stopped at any moment
            part = Path(job["out"] + ".part")
            part.write_text(json.dumps(res))
            part.replace(job["out"])

    for kind in job["kinds"]:
        for T in job["grid"]:
            row: dict[str, Any] = {}
            res["steps"][kind][str(T)] = row
            try:
                mb = step_batch(kind, T, job["decodes"], job["context"], args.vocab, plan.scheduler.block_size, T)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                save()
                continue
            for mode in MODES:
                mb.mode, mb.modes = mode, [mode] * len(plan.stages)
                step_id += 1
                st = Step(step_id, [mb])
                try:
                    ms = timed_ms(lambda: runner.run(st), dev, job["reps"], job["warmup"], before=bar)
                    row[mode] = {"ms": round(median(ms), 4), "reps_ms": [round(x, 4) for x in ms]}
                    if T in job.get("profile", ()):
                        profile_step(lambda: runner.run(st), bar, dev, rank, f"{job['out']}.profile.{kind}.{T}.{mode}.txt")
                except Exception as e:  # e.g. out of memory on one size: record it, go on
                    row[mode] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    if cuda:
                        torch.cuda.empty_cache()
            if all("ms" in row.get(m, {}) for m in MODES):
                row["sp_tp_over_tp"] = round(row["sp_tp"]["ms"] / row["tp"]["ms"], 4)
            save()
            if rank == 0:
                print(kind, T, json.dumps({m: row.get(m, {}).get("ms") for m in MODES}), flush=True)
    res["done"] = True
    save()
    dist.destroy_process_group()


def crossover(points: list[tuple[int, float, float]]) -> dict[str, Any]:
    """Measured crossover of ``(T, tp_ms, sp_tp_ms)`` points (see the module doc)."""
    pts = sorted(points)
    if not pts:
        return {"tokens": None, "why": "no step was timed in both modes"}
    wins = [sp < tp for _t, tp, sp in pts]
    if not wins[-1]:
        return {"tokens": None, "why": f"SP x TP is not faster at the largest step ({pts[-1][0]} tokens)"}
    i = len(pts) - 1
    while i > 0 and wins[i - 1]:
        i -= 1
    if i == 0:
        return {"tokens": None, "bracket": [None, pts[0][0]],
                "why": f"SP x TP is faster from the smallest step ({pts[0][0]} tokens) on"}
    (t0, a0, b0), (t1, a1, b1) = pts[i - 1], pts[i]
    d0, d1 = b0 - a0, b1 - a1  # d0 >= 0 (TP not slower), d1 < 0
    f = d0 / (d0 - d1) if d0 != d1 else 0.5
    x = math.exp(math.log(t0) + (math.log(t1) - math.log(t0)) * f)
    return {"tokens": round(x, 1), "bracket": [t0, t1]}


def points_of(steps: dict[str, Any]) -> list[tuple[int, float, float]]:
    return [(int(T), r["tp"]["ms"], r["sp_tp"]["ms"]) for T, r in steps.items()
            if "ms" in r.get("tp", {}) and "ms" in r.get("sp_tp", {})]


def profile_step(fn: Any, before: Any, dev: torch.device, rank: int, path: str) -> None:
    """One more run of ``fn`` on every rank (they stay in step), profiled on rank 0: the ops with the
    most host time and the kernels with the most device time, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    before()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    if rank == 0:
        ka = prof.key_averages()
        parts = [ka.table(sort_by="self_cpu_time_total", row_limit=30)]
        if dev.type == "cuda":
            parts.append(ka.table(sort_by="self_device_time_total", row_limit=20))
        Path(path).write_text("\n\n".join(parts))


def planner_plan(spec: Any) -> tuple[Any, str]:
    """The planner's plan for the spec (``compile_spec``), or a hand-pinned shift plan with the cost
    model's crossover if compiling fails (the report says which)."""
    from planner.api import compile_spec

    try:
        plan = compile_spec(spec)
        if plan.shift.enabled and plan.mesh.sp == 2 and plan.mesh.size == 2:
            return plan, "planner.api.compile_spec"
        why = f"compile chose {plan.mesh.label()} shift={plan.shift.enabled}"
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
    from planner.inputs import cost_model_of
    from planner.pinned import pinned_plan

    cost, _ = cost_model_of(spec)
    return pinned_plan(spec, cost, sp=2, shift=True), f"planner.pinned.pinned_plan (compile: {why[:200]})"


def spec_of(tiny: bool, backend: str) -> Any:
    """The spec the planner compiles: Llama-3.1-8B (or the tiny test config) on 2 x H200, sp pinned
    to 2, the run's layers as its runtime backend."""
    from bench.common import spec_for

    if tiny:
        return spec_for("tiny-llama-2xh200-sp2", str(ROOT / "tests" / "tiny" / "llama.json"), None, 2, "fp32",
                        {"dp": [1], "pp": [1], "tp": [1], "sp": [2]}, tokens=(32, 64, 8), backend=backend)
    return spec_for("llama-3.1-8b-2xh200-sp2", None, "llama-3.1-8b", 2, "bf16",
                    {"dp": [1], "pp": [1], "tp": [1], "sp": [2]}, backend=backend)


def planner_side(spec: Any) -> tuple[Any, dict[str, Any]]:
    """The plan and the report's ``planner`` section: threshold, crossover (None when SP x TP never
    wins up to the spec's largest step: the threshold is that step), curves, the cost model's own
    crossover and the terms it priced the steps with."""
    from planner.inputs import cost_model_of

    plan, source = planner_plan(spec)
    cost, _ = cost_model_of(spec)
    cost_cross, _curve = cost.shift_crossover(tp=1, sp=2)
    th = plan.shift.threshold_tokens
    never = th is not None and th >= plan.scheduler.max_batch_tokens
    launch = cost.launch
    return plan, {"source": source, "threshold_tokens": th, "crossover_tokens": None if th is None or never else th + 1,
                  "never_switches_up_to": plan.scheduler.max_batch_tokens if never else None,
                  "stage_thresholds": [s.shift_threshold_tokens for s in plan.stages],
                  "curves": [{"tokens": c.tokens, "sp_tp_ms": c.sp_tp_ms, "tp_ms": c.tp_ms} for c in plan.shift.curves],
                  "cost_model_crossover_tokens": cost_cross, "cost_profile": cost.profile_id,
                  "runtime_backend": spec.runtime.backend,
                  "launch": None if launch is None else {"host_ms_per_layer": launch.host_ms_per_layer,
                                                         "graph_max_tokens": launch.graph_max_tokens,
                                                         "ulysses_ns_per_byte": launch.ulysses_ns_per_byte,
                                                         "sp_graphed": launch.all_to_all is not None},
                  "spec_workload": spec.workload.model_dump(mode="json", exclude_none=True)}


def predicted_steps(spec: Any, kinds: list[str], grid: list[int], decodes: int, context: int) -> dict[str, Any]:
    """The cost model's time (ms) of each measured step in both modes (``step_wall_ms``)."""
    from costmodels.steps import step_shape
    from planner.inputs import cost_model_of

    cost, _ = cost_model_of(spec)
    out: dict[str, Any] = {}
    for kind in kinds:
        out[kind] = {}
        for T in grid:
            if kind == "mixed" and T <= decodes:
                continue
            sh = step_shape(kind, T, decodes, context)
            tp, sp = (cost.step_wall_ms(sh, tp=1, sp=2, mode=m) for m in MODES)
            out[kind][str(T)] = {"tp_ms": round(tp, 4), "sp_tp_ms": round(sp, 4), "sp_tp_over_tp": round(sp / tp, 4)}
    return out


def compare(report: dict[str, Any]) -> dict[str, Any]:
    """Measured crossover per kind against the planner's (module doc)."""
    pl = report["planner"]
    planner_x, never = pl["crossover_tokens"], pl.get("never_switches_up_to")
    out = {}
    for kind, steps in report["steps"].items():
        c = crossover(points_of(steps))
        if c.get("tokens") and planner_x:
            c["ratio_to_planner"] = float(f"{c['tokens'] / planner_x:.4g}")
            c["within_20pct"] = abs(c["tokens"] / planner_x - 1) <= WITHIN
        elif c.get("tokens") is None and "not faster at the largest" in c.get("why", ""):
            c["agrees_with_planner"] = bool(never)  # agree when neither switches up to the largest step
        else:  # one switches and the other not, or SP x TP measured faster from the smallest step
            c["agrees_with_planner"] = False
        out[kind] = c
    return out


def report_only(path: Path, out: Path, argv: list[str] | None) -> dict[str, Any]:
    """Rebuild a report from a measured one on any machine: the planner side and the predictions
    recomputed, the steps as measured."""
    from bench.common import command_line, write_report

    r = json.loads(path.read_text())
    tiny = r["model"].startswith("tiny")
    spec = spec_of(tiny, r.get("backend") or "eager")
    _plan, r["planner"] = planner_side(spec)
    kinds = list(r["steps"])
    r["predicted"] = predicted_steps(spec, kinds, r["grid"], r["decodes"], r["context"])
    r["crossover"] = compare(r)
    r["report_command"] = command_line("bench/shift_crossover.py", argv)
    write_report(out, "shift_crossover", r, markdown(r), echo=True)
    return r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny test config")
    ap.add_argument("--min-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--tokens", default="", help="comma-separated step sizes to run instead of the grid "
                    "(a diagnosis: with --profile; the crossover needs the grid)")
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--backend", default=None, help="layers: compile (default on GPUs) or eager (default with --tiny)")
    ap.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="run every step eagerly (the engine replays small TP steps as CUDA graphs)")
    ap.add_argument("--profile", default="", help="comma-separated step sizes to profile once more on rank 0 "
                    "(host ops and kernels; written to DIR/shift_crossover.profile.md)")
    ap.add_argument("--timeout", type=float, default=360.0,
                    help="seconds before the ranks are stopped (what they measured so far is reported)")
    ap.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                    help="rebuild the report from this measured one (no GPU): planner and predictions recomputed")
    a = ap.parse_args(argv)
    if a.report_only is not None:
        if not a.report_only.is_file():
            ap.error(f"--report-only: no measured report at {a.report_only}")
        return report_only(a.report_only, a.out, argv)
    t_start = time.perf_counter()
    import transformers

    from bench.common import command_line, write_report
    from executors.config import model_args
    from graph.hf_config import load_config

    if a.tiny:
        cfg = json.loads((ROOT / "tests" / "tiny" / "llama.json").read_text())
        device = "cpu"
        a.min_tokens, a.max_tokens, a.decodes, a.context = 8, min(a.max_tokens, 64), min(a.decodes, 4), min(a.context, 16)
        a.reps, a.warmup = min(a.reps, 3), min(a.warmup, 1)
    else:
        cfg = load_config(preset="llama-3.1-8b")
        device = "cuda"
    a.backend = a.backend or ("eager" if a.tiny else "compile")
    spec = spec_of(a.tiny, a.backend)
    margs = model_args(cfg)
    plan, planner = planner_side(spec)
    grid = sorted({int(t) for t in a.tokens.split(",") if t}) or token_grid(a.min_tokens, a.max_tokens)
    kinds = [k for k in a.kinds.split(",") if k]
    report: dict[str, Any] = {
        "command": command_line("bench/shift_crossover.py", argv),
        "device": "2 x " + (torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "model": ("tiny llama config" if a.tiny else "llama-3.1-8b shapes") + f", {plan.model.weights_dtype}, random weights",
        "backend": a.backend, "cuda_graphs": a.cuda_graphs, "sp_graphed": sp_graphed(device),
        "mesh": "sp2 (shift: plain TP over the 2 GPUs at or below the threshold)",
        "planner": planner,
        "grid": grid, "decodes": a.decodes, "context": a.context, "reps": a.reps, "warmup": a.warmup,
        "steps": {}, "crossover": {},
    }
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="shift-crossover-")) / "rank0.json"
    job = {"plan": plan.model_dump_json(), "args": margs.portable(), "device": device, "grid": grid, "kinds": kinds,
           "decodes": a.decodes, "context": a.context, "reps": a.reps, "warmup": a.warmup, "out": str(tmp),
           "blocks": blocks_needed(grid, a.decodes, a.context, plan.scheduler.block_size),
           "profile": [int(t) for t in a.profile.split(",") if t], "backend": a.backend,
           "cuda_graphs": a.cuda_graphs}
    report["ranks"] = run_ranks(job, 2, a.timeout)
    errors = {p.name.rsplit(".", 2)[-2]: p.read_text()[-2000:] for p in sorted(tmp.parent.glob("rank0.json.rank*.error"))}
    if errors:
        report["ranks"]["errors"] = errors
    got = json.loads(tmp.read_text()) if tmp.is_file() else {}
    profiles = sorted(tmp.parent.glob("rank0.json.profile.*.txt"))
    if profiles:
        (a.out / "shift_crossover.profile.md").write_text("".join(
            f"## {p.name[len('rank0.json.profile.'):-4]}\n\n```\n{p.read_text()}\n```\n\n" for p in profiles))
    shutil.rmtree(tmp.parent, ignore_errors=True)
    report["steps"] = got.get("steps", {})
    report["build_s"] = got.get("build_s")
    report["predicted"] = predicted_steps(spec, kinds, grid, a.decodes, a.context)
    report["crossover"] = compare({"planner": planner, "steps": {k: report["steps"].get(k, {}) for k in kinds}})
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_report(a.out, "shift_crossover", report, markdown(report), echo=True)
    return report


def run_ranks(job: dict[str, Any], world: int, timeout: float) -> dict[str, Any]:
    """Spawn the ranks, wait (at most ``timeout`` s), stop any still running; their exit codes."""
    import torch.multiprocessing as mp

    from executors.engine import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, world, f"tcp://127.0.0.1:{port}", job), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(1.0, end - time.monotonic()))
    timed_out = any(p.is_alive() for p in procs)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    return {"exit_codes": [p.exitcode for p in procs], "timed_out": timed_out}


def planner_line(pl: dict[str, Any]) -> str:
    """The planner's threshold in words."""
    own = pl["cost_model_crossover_tokens"]
    own = f"{own} tokens" if own is not None else "none up to 65,536 tokens"
    if pl.get("never_switches_up_to"):
        head = (f"threshold {pl['threshold_tokens']} tokens, the spec's largest step: SP x TP never wins up to "
                f"{pl['never_switches_up_to']} tokens, every step runs TP")
    else:
        head = f"threshold {pl['threshold_tokens']} tokens, so SP x TP from {pl['crossover_tokens']} tokens"
    lu = pl.get("launch")
    terms = ("no host or Ulysses terms" if not lu else
             f"host {lu['host_ms_per_layer']} ms per layer of an eager step ({'' if lu.get('sp_graphed') else 'plain-TP '}"
             f"steps up to {lu['graph_max_tokens']} tokens graphed), Ulysses exchange {lu['ulysses_ns_per_byte']} ns per byte")
    return (f"Planner ({pl['source']}, runtime backend {pl.get('runtime_backend', '?')}, profile "
            f"{pl.get('cost_profile', '?')}; {terms}): {head} (the cost model's own crossover on prefill chunks of "
            f"up to 1,024 tokens: {own}). The spec's workload (its token mix sets the planner's steps): "
            f"`{json.dumps(pl['spec_workload'])}`.")


def markdown(r: dict[str, Any]) -> str:
    pl = r["planner"]
    rebuilt = f" Report rebuilt from the measured steps: `{r['report_command']}`." if r.get("report_command") else ""
    lines = [f"# Shift threshold vs measured SP2 / TP2 crossover: {r['model']}", "",
             f"{r['device']}, torch {r['torch']}, transformers {r['transformers']}, mesh {r['mesh']}. "
             f"Command: `{r['command']}`.{rebuilt}", "",
             planner_line(pl), "",
             f"Step time (median of {r['reps']} after {r['warmup']} warm-up runs) of one forward step (layers {r.get('backend', 'eager')}, {(('TP and SP x TP' if r.get('sp_graphed') else 'TP') + ' steps of up to 2,048 tokens as CUDA graphs') if r.get('cuda_graphs') else 'no CUDA graph'}) forced to "
             f"each mode; `mixed`: a prefill chunk plus {r['decodes']} decodes at a context of {r['context']}.", ""]
    for kind, c in r["crossover"].items():
        if c.get("tokens") and "ratio_to_planner" in c:
            lines.append(f"* **{kind}**: measured crossover {c['tokens']} tokens (between {c['bracket'][0]} and "
                         f"{c['bracket'][1]}), {c['ratio_to_planner']}x the planner's "
                         f"({'within' if c['within_20pct'] else 'outside'} 20%)")
        elif c.get("tokens"):
            lines.append(f"* **{kind}**: measured crossover {c['tokens']} tokens (between {c['bracket'][0]} and "
                         f"{c['bracket'][1]}); the planner never switches: disagree")
        else:
            agree = {True: "; the planner never switches either: agree", False: "; the planner switches: disagree"}
            lines.append(f"* **{kind}**: no crossover measured: {c.get('why')}{agree.get(c.get('agrees_with_planner'), '')}")
    pred = r.get("predicted", {})
    for kind, steps in r["steps"].items():
        lines += ["", f"## {kind}", "", "| step tokens | TP2 ms | SP2 ms | SP2 / TP2 | predicted TP2 ms | predicted SP2 ms "
                  "| predicted SP2 / TP2 |", "|---|---|---|---|---|---|---|"]
        for T, row in steps.items():
            p = pred.get(kind, {}).get(T, {})
            guess = f"{p['tp_ms']:.1f} | {p['sp_tp_ms']:.1f} | {p['sp_tp_over_tp']:.3f}" if p else "- | - | -"
            if "error" in row:
                lines.append(f"| {T} | error: {row['error'][:80]} | | | {guess} |")
                continue
            cell = lambda m: row[m]["ms"] if "ms" in row.get(m, {}) else f"error: {row.get(m, {}).get('error', '-')[:60]}"  # noqa: E731
            lines.append(f"| {T} | {cell('tp')} | {cell('sp_tp')} | {row.get('sp_tp_over_tp', '-')} | {guess} |")
    if r.get("assembled_from"):
        lines += ["", f"Steps assembled from {r['assembled_from']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
