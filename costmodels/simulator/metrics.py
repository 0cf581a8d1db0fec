"""From a run's raw log to the numbers a user reads (``SimResult``).

Per request: TTFT = first token - arrival; TPOT = (finish - first token) / (output tokens - 1)
(requests with one output token have no TPOT); e2e = finish - arrival.

Throughput is measured in the arrival window W = [arrival of request N/5, last arrival] (the first
fifth is warm-up from an empty system; the drain after the last arrival would make slow plans
look less loaded than they are): output tok/s = output tokens emitted in W / |W|, a request's first
token at its TTFT and the others spread evenly until it finishes; combined tok/s adds the prompt
tokens (image tokens included) of requests whose first token falls in W. Below capacity this is
the offered load; above it, the plan's capacity. Goodput = measured arrival rate x the share of
requests meeting both SLO thresholds (TTFT <= ttft_p90_ms and TPOT <= tpot_p90_ms, per request);
``meets_slo`` asks whether the p90s meet them and every request was served.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from costmodels.simulator.engine import RunLog
from costmodels.simulator.state import DONE


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; nan for an empty list."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def pcts(xs: list[float]) -> dict[str, float]:
    return {"p50": percentile(xs, 50), "p90": percentile(xs, 90), "p99": percentile(xs, 99),
            "mean": sum(xs) / len(xs) if xs else math.nan}


@dataclass
class SimResult:
    """What a plan delivers on a workload. Latencies in ms, rates per second."""

    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    e2e_ms: dict[str, float]
    output_tok_s: float
    combined_tok_s: float
    goodput_rps: float
    throughput_rps: float  # completed requests / span (first arrival to last completion)
    shift_tp_fraction: float
    requests: int
    completed: int
    rejected: int
    preemptions: int
    steps: int
    mean_step_tokens: float
    span_s: float
    arrival_rate: float  # measured: (requests - 1) / (last arrival - first arrival)
    mean_in_system: float  # time average of requests in the system (Little's L)
    mean_e2e_s: float  # Little's W
    kv_peak_fraction: float
    kv_mean_fraction: float
    stage_utilisation: list[float]
    encoder_utilisation: float | None
    gpu_memory_gb: float | None = None  # per GPU, most loaded stage (from the plan)
    meets_slo: bool | None = None
    slo: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_predicted(self):
        """The plan file's ``Predicted`` block (source: simulator)."""
        from plans.schema import Percentiles, Predicted

        def p(d: dict[str, float]) -> Percentiles | None:
            return None if math.isnan(d["p50"]) else Percentiles(p50=d["p50"], p90=d["p90"], p99=d["p99"])

        return Predicted(source="simulator", ttft_ms=p(self.ttft_ms), tpot_ms=p(self.tpot_ms),
                         output_tok_s=self.output_tok_s, combined_tok_s=self.combined_tok_s,
                         goodput_rps=self.goodput_rps, shift_tp_fraction=self.shift_tp_fraction,
                         meets_slo=self.meets_slo)


def _window_tokens(done: list, w0: float, w1: float) -> tuple[float, float, float]:
    """(output tokens, prompt tokens) emitted in [w0, w1], and its width."""
    width = w1 - w0
    if width <= 0:
        return 0.0, 0.0, 0.0
    out = prompt = 0.0
    for r in done:
        f, e = r.first, r.finish
        if w0 <= f <= w1:
            out += 1
            prompt += r.prompt0
        if r.out > 1:
            if e > f:
                lo, hi = (f if f > w0 else w0), (e if e < w1 else w1)
                if hi > lo:
                    out += (r.out - 1) * (hi - lo) / (e - f)
            elif w0 <= e <= w1:
                out += r.out - 1
    return out, prompt, width


@dataclass(frozen=True)
class SloTargets:
    """p90 latency targets a run is judged against (None: no target on that metric)."""

    ttft_p90_ms: float | None = None
    tpot_p90_ms: float | None = None


def summarize(log: RunLog, *, slo: SloTargets | None = None, gpu_memory_gb: float | None = None,
              encoder_gpus: int = 0, replicas: int = 1, offered_rps: float | None = None) -> SimResult:
    """A ``SimResult`` from a run log, judged against ``slo`` (goodput, ``meets_slo``).

    Goodput is the arrival rate times the share of requests that met the SLOs; the arrival rate is
    ``offered_rps`` (the workload's nominal rate, the one reported beside the result) when given, so
    goodput never exceeds it. Without it, the sample's own rate (which a short Poisson sample can put
    above the nominal one)."""
    done = [r for r in log.reqs if r.state == DONE]
    ttft = [(r.first - r.arrival) * 1e3 for r in done]
    tpot = [(r.finish - r.first) * 1e3 / (r.out - 1) for r in done if r.out > 1]
    e2e = [(r.finish - r.arrival) * 1e3 for r in done]
    t0 = min((r.arrival for r in log.reqs), default=0.0)
    t_last_arrival = max((r.arrival for r in log.reqs), default=0.0)
    span = max(log.t_end - t0, 1e-9)
    arrivals = sorted(r.arrival for r in log.reqs)
    w0 = arrivals[len(arrivals) // 5] if arrivals else 0.0
    out_tok, in_tok, width = _window_tokens(done, w0, t_last_arrival)
    if width <= 0:  # one request, or all at once: fall back to the whole span
        out_tok, in_tok, width = sum(r.out for r in done), sum(r.prompt0 for r in done), span
    rate = (len(log.reqs) - 1) / (t_last_arrival - t0) if t_last_arrival > t0 else len(done) / span
    offered = offered_rps if offered_rps is not None and offered_rps > 0 else rate
    ttft_slo, tpot_slo = (slo.ttft_p90_ms, slo.tpot_p90_ms) if slo is not None else (None, None)
    good = 0
    for r in done:
        ok = ttft_slo is None or (r.first - r.arrival) * 1e3 <= ttft_slo
        if ok and tpot_slo is not None and r.out > 1:
            ok = (r.finish - r.first) * 1e3 / (r.out - 1) <= tpot_slo
        good += ok
    res = SimResult(
        ttft_ms=pcts(ttft), tpot_ms=pcts(tpot), e2e_ms=pcts(e2e),
        output_tok_s=out_tok / width, combined_tok_s=(in_tok + out_tok) / width,
        goodput_rps=offered * good / len(log.reqs) if log.reqs else 0.0, throughput_rps=len(done) / span,
        shift_tp_fraction=log.steps_tp / log.steps if log.steps else 0.0,
        requests=len(log.reqs), completed=len(done), rejected=log.rejected, preemptions=log.preemptions,
        steps=log.steps, mean_step_tokens=log.step_tokens / log.steps if log.steps else 0.0,
        span_s=span,
        arrival_rate=rate,
        mean_in_system=log.area / span, mean_e2e_s=sum(e2e) / len(e2e) / 1e3 if e2e else math.nan,
        kv_peak_fraction=log.kv_peak, kv_mean_fraction=log.kv_area / span,
        stage_utilisation=[b / (span * replicas) for b in log.stage_busy_s],
        encoder_utilisation=log.encoder_busy_s / span if encoder_gpus else None,
        gpu_memory_gb=gpu_memory_gb, notes=list(log.notes),
        slo={k: v for k, v in (("ttft_p90_ms", ttft_slo), ("tpot_p90_ms", tpot_slo)) if v is not None},
    )
    if res.rejected:
        res.notes.append(f"{res.rejected} requests rejected: prompt + output exceed the KV cache of a replica")
    if ttft_slo is not None or tpot_slo is not None:
        res.meets_slo = (len(done) == len(log.reqs)
                         and (ttft_slo is None or res.ttft_ms["p90"] <= ttft_slo)
                         and (tpot_slo is None or not tpot or res.tpot_ms["p90"] <= tpot_slo))
    return res
