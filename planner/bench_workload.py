"""`plan bench --workload`: replay a workload on the engine in real time and report it as `plan simulate`
reports a prediction, optionally side by side with the prediction for the very same requests.

The workload (a spec's synthetic traffic or a trace, at ``--rate``, cut at ``--duration`` seconds of
arrivals) is sampled once; the engine replays those requests at their arrival times
(``executors.bench.replay``: random token ids of each request's prompt length, random pixels of each
image's patch grid, exactly its output length) and the simulator runs the same list. Both outcomes go
through ``costmodels.simulator.metrics.summarize``, so every figure has one definition.
"""

from __future__ import annotations

import math
from typing import Any

from costmodels.simulator.engine import RunLog
from costmodels.simulator.metrics import SimResult, SloTargets, summarize
from costmodels.simulator.state import DONE, Req
from costmodels.workload import Request as WorkloadRequest

COMPARED = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("tpot_ms", "p50"), ("tpot_ms", "p90"), ("e2e_ms", "p50"),
            ("e2e_ms", "p90"), ("output_tok_s", None), ("goodput_rps", None), ("shift_tp_fraction", None),
            ("preemptions", None))


def patch_grid(patches: int, merge: int = 2) -> tuple[int, int, int]:
    """A ``(1, h, w)`` grid of ``patches`` ViT patches with h and w multiples of ``merge``, as square
    as the count allows (the tokens an image gives depend only on ``h * w``)."""
    best = (merge, max(merge, patches // merge))
    for h in range(merge, int(math.isqrt(patches)) + 1, merge):
        if patches % h == 0 and (patches // h) % merge == 0:
            best = (h, patches // h)
    return (1, best[0], best[1])


def engine_requests(reqs: list[WorkloadRequest], vocab: int, image_token: int | None, patch_dim: int,
                    merge: int, seed: int) -> list[Any]:
    """The executor's requests for a workload's: random ids (no special tokens) of each prompt's text
    length, one image-pad token per image (expanded by the engine), random pixels per image."""
    import torch

    from executors import Request
    from executors.images import ImageInput

    g = torch.Generator().manual_seed(seed)
    hi = min(vocab, 100_000, (image_token - 8) if image_token else vocab)  # ordinary ids: below the vision tokens
    out = []
    for r in reqs:
        tokens = torch.randint(10, hi, (max(1, r.text_tokens),), generator=g).tolist()
        images = []
        if r.image_patches and image_token is not None:
            for p in r.image_patches:
                grid = patch_grid(p, merge)
                images.append(ImageInput(torch.randn(grid[1] * grid[2], patch_dim, generator=g), grid))
            tokens = [image_token] * len(images) + tokens
        out.append(Request(tokens=tokens, images=images))
    return out


def measured_log(measured: dict[str, Any], reqs: list[WorkloadRequest], shift_on: bool) -> RunLog:
    """A run log from an engine replay (``executors.bench.replay``): what the engine did not report
    (KV occupancy, stage busy time, tokens per step) stays at zero and is named in the notes."""
    log_reqs, area = [], 0.0
    for r, m in zip(reqs, measured["requests"]):
        q = Req(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens, tuple(r.image_patches), sum(r.image_tokens))
        if m is not None:
            _arrival, first, finish, out, _prompt = m
            q.state, q.first, q.finish, q.out, q.produced = DONE, first, finish, out, out
            area += finish - r.arrival_s
        log_reqs.append(q)
    tp, sp = measured["micro_batches_tp"], measured["micro_batches_sp_tp"]
    steps = measured["steps"]
    log = RunLog(reqs=log_reqs, t_end=measured["t_end"], steps=steps,
                 steps_tp=steps * tp / (tp + sp) if (shift_on and tp + sp) else 0.0,
                 preemptions=measured["preemptions"], rejected=sum(m is None for m in measured["requests"]),
                 area=area)
    log.notes.append("measured on the engine: KV occupancy, stage utilisation and tokens per step are not recorded")
    for i, err in list(measured.get("errors", {}).items())[:3]:
        log.notes.append(f"request {i} refused by the engine: {err}")
    return log


def compare(measured: SimResult, predicted: SimResult) -> list[dict[str, Any]]:
    """Rows ``{figure, measured, predicted, error}``; error = predicted / measured - 1."""
    rows = []
    for key, sub in COMPARED:
        m, p = getattr(measured, key), getattr(predicted, key)
        if sub is not None:
            m, p = m[sub], p[sub]
        err = (p / m - 1) if (m and math.isfinite(m) and math.isfinite(p)) else math.nan
        rows.append({"figure": key + (f" {sub}" if sub else ""), "measured": m, "predicted": p, "error": err})
    return rows


def replay_context(plan: Any, base: Any, reqs: list[WorkloadRequest], new_tokens: int = 2) -> int:
    """Tokens the longest of ``reqs`` holds in the engine: its text (at least one token), its images'
    tokens as the engine expands them (``engine_requests``' patch grids, ``merge**2`` patches a
    token) and its output, at least ``new_tokens`` (``replay_requests`` warms up on two tokens of the
    first): the ``max_context`` a replay of them needs, so the engine's warm-up captures no step graph
    for contexts they never reach. ``base``: the plan file's folder (its model config)."""
    from executors.config import model_args, plan_config

    a = model_args(plan_config(plan, base))
    merge = a.vision.merge if a.vision else 2

    def prompt(r: WorkloadRequest) -> int:
        images = r.image_patches if a.image_token_id is not None else ()
        return max(1, r.text_tokens) + sum(math.prod(patch_grid(p, merge)) // merge**2 for p in images)

    return max(prompt(r) + max(r.output_tokens, new_tokens) for r in reqs)


def sample_requests(workload: Any, *, rate: float | None, duration: float | None,
                    seed: int) -> tuple[Any, list[WorkloadRequest]]:
    """The workload at ``rate`` (default its own) and the requests it sends in the first ``duration``
    seconds (all of its ``requests`` without one): ``(workload at that rate, requests)``."""
    wl = workload.with_rate(rate) if rate is not None else workload
    if duration is not None:
        wl = wl.with_requests(max(1, math.ceil(wl.rate * duration * 1.5) + 8))
    reqs = wl.sample(seed)
    if duration is not None:
        reqs = [r for r in reqs if r.arrival_s <= duration] or reqs[:1]
    return wl, reqs


def replay_requests(eng: Any, reqs: list[WorkloadRequest], seed: int) -> dict[str, Any]:
    """Replay ``reqs`` at their arrival times on a loaded engine (after a two-token warm-up request,
    which a step trace leaves out): ``executors.bench.replay``'s record."""
    from executors.bench import replay

    a = eng.args
    v = a.vision
    ereqs = engine_requests(reqs, a.vocab, a.image_token_id, v.patch_dim if v else 0, v.merge if v else 2, seed)
    eng.generate(ereqs[:1], max_new_tokens=2)  # warm-up: lazy inits, first graphs
    if eng.step_trace is not None:
        eng.step_trace.clear()  # a traced engine's steps: the replay's alone
    return replay(eng, ereqs, [r.arrival_s for r in reqs], [r.output_tokens for r in reqs])


def measured_result(plan: Any, measured: dict[str, Any], reqs: list[WorkloadRequest],
                    slo: SloTargets | None) -> SimResult:
    """The engine's replay summarised as the simulator summarises its runs."""
    shift_on = plan.shift.enabled and plan.mesh.sp > 1
    return summarize(measured_log(measured, reqs, shift_on), slo=slo, gpu_memory_gb=plan.memory_gb.total,
                     encoder_gpus=plan.dims().encoder_gpus, replicas=plan.mesh.dp)


def predicted_result(plan: Any, cost: Any, reqs: list[WorkloadRequest], slo: SloTargets | None) -> SimResult:
    """The simulator's run of the very same requests on ``plan`` (``cost``: its ``CostModel``)."""
    from costmodels.simulator import coster_for
    from costmodels.simulator.config import SimConfig
    from costmodels.simulator.engine import run

    log = run(SimConfig.from_plan(plan), coster_for(plan, cost), reqs)
    return summarize(log, slo=slo, gpu_memory_gb=plan.memory_gb.total, encoder_gpus=plan.dims().encoder_gpus,
                     replicas=plan.mesh.dp)


def bench_workload(plan_path: Any, workload: Any, *, rate: float | None, duration: float | None, seed: int,
                   slo: SloTargets | None, weights: Any, device: str, backend: str | None,
                   compare_sim: bool, trace: bool = False, max_context: int | None = None) -> dict[str, Any]:
    """Replay the workload on the engine; return ``{"measured": SimResult, "predicted": SimResult | None,
    "requests": n}`` (and ``step_trace``, the replay's steps, with ``trace``: ``executors.trace``).
    ``max_context``: ``executors.load``'s (requests past it fail, as a server would refuse them;
    default: the longest of the replay's requests, ``replay_context``)."""
    import executors
    from costmodels.simulator import cost_model_for_plan
    from plans.schema import load_plan

    plan = load_plan(plan_path)
    wl, reqs = sample_requests(workload, rate=rate, duration=duration, seed=seed)
    if max_context is None:
        max_context = replay_context(plan, plan_path.parent, reqs)
    with executors.load(plan_path, weights=weights, device=device, backend=backend, seed=seed, trace=trace,
                        max_context=max_context) as eng:
        measured = replay_requests(eng, reqs, seed)
        steps = eng.step_trace
    res = measured_result(plan, measured, reqs, slo)
    predicted = None
    if compare_sim:
        predicted = predicted_result(plan, cost_model_for_plan(plan, base_dir=plan_path.parent), reqs, slo)
    return {"measured": res, "predicted": predicted, "requests": len(reqs), "rate_rps": wl.rate,
            **({"step_trace": steps} if steps is not None else {})}
