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
run as in the engine: TP steps of up to 2,048 tokens replay CUDA graphs (``executors.graphs.MixedGraphs``,
captured in the warm-up runs; ``--no-cuda-graphs`` runs them eagerly), SP x TP steps and larger
ones run eagerly, with the layers compiled (``--backend compile``, the default on GPUs; ``eager``
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

Reported per kind with its ratio to the planner's crossover and whether it lies within 20%.

    python bench/shift_crossover.py --out DIR            # on a machine with 2 GPUs (~1-2 min)
    python bench/shift_crossover.py --out DIR --tiny     # CPU dry run (2 gloo ranks, tiny config)

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
        torch.set_num_threads(1)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU dry run with the tiny test config")
    ap.add_argument("--min-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16384)
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
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    import transformers

    from bench.common import command_line, spec_for, write_report
    from executors.config import model_args
    from graph.hf_config import load_config
    from planner.inputs import cost_model_of

    if a.tiny:
        cfg_path = str(ROOT / "tests" / "tiny" / "llama.json")
        cfg = json.loads(Path(cfg_path).read_text())
        spec = spec_for("tiny-llama-2xh200-sp2", cfg_path, None, 2, "fp32", {"dp": [1], "pp": [1], "tp": [1], "sp": [2]},
                        tokens=(32, 64, 8))
        device = "cpu"
        a.min_tokens, a.max_tokens, a.decodes, a.context = 8, min(a.max_tokens, 64), min(a.decodes, 4), min(a.context, 16)
        a.reps, a.warmup = min(a.reps, 3), min(a.warmup, 1)
    else:
        cfg = load_config(preset="llama-3.1-8b")
        spec = spec_for("llama-3.1-8b-2xh200-sp2", None, "llama-3.1-8b", 2, "bf16",
                        {"dp": [1], "pp": [1], "tp": [1], "sp": [2]})
        device = "cuda"
    a.backend = a.backend or ("eager" if a.tiny else "compile")
    margs = model_args(cfg)
    plan, source = planner_plan(spec)
    cost, _ = cost_model_of(spec)
    cost_cross, _curve = cost.shift_crossover(tp=1, sp=2)
    grid = token_grid(a.min_tokens, a.max_tokens)
    kinds = [k for k in a.kinds.split(",") if k]
    th = plan.shift.threshold_tokens
    report: dict[str, Any] = {
        "command": command_line("bench/shift_crossover.py", argv),
        "device": "2 x " + (torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "model": ("tiny llama config" if a.tiny else "llama-3.1-8b shapes") + f", {plan.model.weights_dtype}, random weights",
        "backend": a.backend, "cuda_graphs": a.cuda_graphs,
        "mesh": "sp2 (shift: plain TP over the 2 GPUs at or below the threshold)",
        "planner": {"source": source, "threshold_tokens": th, "crossover_tokens": th + 1 if th is not None else None,
                    "stage_thresholds": [s.shift_threshold_tokens for s in plan.stages],
                    "curves": [{"tokens": c.tokens, "sp_tp_ms": c.sp_tp_ms, "tp_ms": c.tp_ms} for c in plan.shift.curves],
                    "cost_model_crossover_tokens": cost_cross,
                    "spec_workload": spec.workload.model_dump(mode="json", exclude_none=True)},
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
    planner_x = report["planner"]["crossover_tokens"]
    for kind in kinds:
        c = crossover(points_of(report["steps"].get(kind, {})))
        if c.get("tokens") and planner_x:
            c["ratio_to_planner"] = float(f"{c['tokens'] / planner_x:.4g}")
            c["within_20pct"] = abs(c["tokens"] / planner_x - 1) <= WITHIN
        report["crossover"][kind] = c
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_report(a.out, "shift_crossover", report, markdown(report), echo=True)
    return report


def run_ranks(job: dict[str, Any], world: int, timeout: float) -> dict[str, Any]:
    """Spawn the ranks, wait (at most ``timeout`` s), stop any still running; their exit codes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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


def markdown(r: dict[str, Any]) -> str:
    pl = r["planner"]
    lines = [f"# Shift threshold vs measured SP2 / TP2 crossover: {r['model']}", "",
             f"{r['device']}, torch {r['torch']}, transformers {r['transformers']}, mesh {r['mesh']}. "
             f"Command: `{r['command']}`.", "",
             f"Planner ({pl['source']}): threshold {pl['threshold_tokens']} tokens, so SP x TP from "
             f"{pl['crossover_tokens']} tokens (the cost model's own crossover on prefill chunks of up to 1,024 "
             f"tokens: {pl['cost_model_crossover_tokens']}). The spec's workload (its token mix sets the planner's "
             f"steps): `{json.dumps(pl['spec_workload'])}`.", "",
             f"Step time (median of {r['reps']} after {r['warmup']} warm-up runs) of one forward step (layers {r.get('backend', 'eager')}, {'TP steps of up to 2,048 tokens as CUDA graphs' if r.get('cuda_graphs') else 'no CUDA graph'}) forced to "
             f"each mode; `mixed`: a prefill chunk plus {r['decodes']} decodes at a context of {r['context']}.", ""]
    for kind, c in r["crossover"].items():
        if c.get("tokens"):
            lines.append(f"* **{kind}**: measured crossover {c['tokens']} tokens (between {c['bracket'][0]} and "
                         f"{c['bracket'][1]}), {c['ratio_to_planner']}x the planner's "
                         f"({'within' if c['within_20pct'] else 'outside'} 20%)")
        else:
            lines.append(f"* **{kind}**: no crossover measured: {c.get('why')}")
    for kind, steps in r["steps"].items():
        lines += ["", f"## {kind}", "", "| step tokens | TP2 ms | SP2 ms | SP2 / TP2 |", "|---|---|---|---|"]
        for T, row in steps.items():
            if "error" in row:
                lines.append(f"| {T} | error: {row['error'][:80]} | | |")
                continue
            cell = lambda m: row[m]["ms"] if "ms" in row.get(m, {}) else f"error: {row.get(m, {}).get('error', '-')[:60]}"  # noqa: E731
            lines.append(f"| {T} | {cell('tp')} | {cell('sp_tp')} | {row.get('sp_tp_over_tp', '-')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
