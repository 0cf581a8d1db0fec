"""Measured TTFT / TPOT / throughput of a plan on synthetic requests (for `plan bench`)."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch


def bench(plan_path: str | Path, requests: int, input_tokens: int, output_tokens: int, weights: Any = None,
          device: str = "cpu", backend: str | None = None, seed: int = 0,
          progress: Callable[[int], None] | None = None, trace: bool = False) -> dict[str, Any]:
    """All requests arrive at t=0. TTFT: time to a request's first token; TPOT: mean gap between
    its later tokens; throughput: generated tokens / wall time of the whole run. ``progress`` is
    called with the tokens generated so far. ``trace``: the run's step trace under ``step_trace``
    (``executors.trace``). The engine serves contexts of ``input_tokens + output_tokens`` (its
    warm-up captures no longer graphs)."""
    import executors
    from executors import Request, Sampling

    g = torch.Generator().manual_seed(seed)
    with executors.load(plan_path, weights=weights, device=device, backend=backend, seed=seed, trace=trace,
                        max_context=input_tokens + output_tokens) as eng:
        V = eng.args.vocab
        reqs = [Request(tokens=torch.randint(0, V, (input_tokens,), generator=g).tolist()) for _ in range(requests)]
        eng.generate(reqs[:1], max_new_tokens=2)  # warm-up
        if trace:
            eng.step_trace.clear()
        t0 = time.perf_counter()
        times: dict[int, list[float]] = {i: [] for i in range(requests)}
        done = 0
        for i, tok, _res in eng.stream(reqs, max_new_tokens=output_tokens, sampling=Sampling(stop_on_eos=False)):
            if tok is not None:
                times[i].append(time.perf_counter() - t0)
                done += 1
                if progress is not None:
                    progress(done)
        wall = time.perf_counter() - t0
        label = eng.plan.mesh.label()
        steps = eng.step_trace
    ttft = sorted(t[0] for t in times.values() if t)
    tpot = sorted((t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1)
    n = sum(len(t) for t in times.values())

    def pct(xs: list[float], q: float) -> float:
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else float("nan")

    return {
        "plan": str(plan_path), "mesh": label, "device": device, "requests": requests,
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p90": pct(ttft, 0.9),
        "tpot_ms_p50": pct(tpot, 0.5), "tpot_ms_p90": pct(tpot, 0.9),
        "output_tok_s": round(n / wall, 2), "wall_s": round(wall, 3),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        **({"step_trace": steps} if steps is not None else {}),
    }


def replay(engine: Any, requests: list[Any], arrivals: list[float], max_new_tokens: list[int]) -> dict[str, Any]:
    """Replay ``requests`` arriving at ``arrivals`` (seconds) in real time on a loaded engine, each
    generating exactly ``max_new_tokens[i]`` tokens. Returns what a simulator's run log holds, as
    measured: per request ``(arrival, first token, finish, output tokens, prompt tokens)`` in seconds
    on the stream's clock (``Engine.clock0``: arrivals count from it; None for a request that
    failed), and the engine's step, shifted-step and preemption counts over the run."""
    from dataclasses import replace

    from executors import Sampling

    reqs = [replace(r, max_new_tokens=n) for r, n in zip(requests, max_new_tokens)]
    modes0, step0 = dict(engine.mode_counts), engine.step_id
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    count: dict[int, int] = {}
    prompt: dict[int, int] = {}
    failed: dict[int, str] = {}
    for i, tok, res in engine.stream(reqs, sampling=Sampling(stop_on_eos=False), arrivals=arrivals):
        now = time.perf_counter() - engine.clock0
        if tok is None:
            failed[i] = res.error or "failed"
            continue
        first.setdefault(i, now)
        last[i] = now
        count[i] = count.get(i, 0) + 1
        prompt[i] = len(res.prompt_tokens)
    rows = [None if i in failed or i not in first else (arrivals[i], first[i], last[i], count[i], prompt[i])
            for i in range(len(reqs))]
    tp = engine.mode_counts["tp"] - modes0.get("tp", 0)
    sp = engine.mode_counts["sp_tp"] - modes0.get("sp_tp", 0)
    return {"requests": rows, "t_end": time.perf_counter() - engine.clock0, "steps": engine.step_id - step0,
            "micro_batches_tp": tp, "micro_batches_sp_tp": sp,
            "preemptions": sum(s.preemptions for s in getattr(engine, "schedulers", [])),
            "errors": {i: failed[i] for i in sorted(failed)}}
