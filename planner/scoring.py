"""Stages 6-7 of the compile pipeline: the ILP per candidate, then scoring and ranking.

Stage 6 solves each candidate's ``StageProblem`` (``planner.ilp.solve``).

Stage 7 first scores every feasible candidate from the ILP's own numbers with a simple queueing
correction (``static_score``: rho = rate / capacity, an M/D/1 wait on the unloaded TTFT, decode
steps sharing the GPUs with prefill, and a factor ``1 + rho (pp - 1)`` for the other micro-batches
in flight). Under load, the p90s come from the serving simulator on the shortlist (the
``SHORTLIST`` best by the static key plus the lowest-latency and the best shift candidate), and
ranking puts plans that meet the SLOs first (``Predicted.meets_slo``), then the objective's order
(``RANKING``; goodput is compared in steps of 1 / ``GOODPUT_BINS`` of the arrival rate).
``max_throughput`` also simulates the plans tied at the top at ``HEADROOM`` x the spec's rate.
``why_lost`` writes a runner-up's reason from the same metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from planner.candidates import Candidate
from planner.costing import Costed
from planner.ilp import StageSolution, solve
from planner.inputs import Model, TokenMix
from planner.spec import Spec

SHORTLIST = 5  # best candidates by the static key that the simulator scores (plus diversity picks); 3 missed
# the simulator's best on an example (tests/test_plans_fresh.py checks every example against simulating all)
SIM_REQUESTS = 200  # requests per simulated candidate (the spec's own count caps it)
# max_throughput also simulates the shortlist at this multiple of the spec's rate: at the spec's own
# rate every plan with spare capacity meets the SLOs, and the static capacity (bottleneck time, no
# queueing) favours PP/DP meshes whose TPOT breaks the SLO long before that capacity is reached.
HEADROOM = 2.0
GOODPUT_BINS = 20  # ranking compares goodput / arrival rate in steps of 1/20


# ------------------------------------------------------------------ stage 6: the ILP per candidate


@dataclass(frozen=True)
class Solved:
    costed: Costed
    solution: StageSolution

    @property
    def cand(self) -> Candidate:
        return self.costed.cand

    @property
    def ok(self) -> bool:
        return self.solution.status == "optimal"


def solve_candidate(x: Costed) -> Solved:
    return Solved(x, solve(x.problem))


# ------------------------------------------------------------------ stage 7: scoring and ranking


@dataclass(frozen=True)
class Scored:
    solved: Solved
    capacity_rps: float  # static: requests/s the mesh sustains (dp * 1000 / bottleneck)
    ttft_ms: float  # static: unloaded
    tpot_ms: float  # static: at the operating batch
    predicted: Any  # plans.schema.Predicted
    key: tuple  # sort key, smaller is better
    gpus: int
    headroom_goodput_rps: float | None = None  # simulated goodput at HEADROOM x the spec's rate

    @property
    def label(self) -> str:
        return self.solved.cand.label


def static_score(s: Solved, spec: Spec, mix: TokenMix) -> Scored:
    """Score from the ILP's own numbers with a simple queueing correction:

        rho = rate / capacity                       (bottleneck utilisation)
        TTFT ~ TTFT_0 * (1 + rho / (2 (1 - rho))) * f_pp   (M/D/1 wait on the unloaded prefill)
        TPOT ~ TPOT_0 / (1 - rho_pf) * f_pp         (decode steps share the GPUs with prefill,
                                                      rho_pf = the prefill share of rho)
        f_pp = 1 + rho (pp - 1)                     (a micro-batch's step also waits behind the
                                                      other pp - 1 in flight, busy a share rho)
    """
    from plans.schema import Percentiles, Predicted

    e = s.solution.best
    assert e is not None
    c = s.cand
    cap = c.dp * 1000.0 / e.bottleneck_ms
    served = min(mix.rate, cap)
    rho = min(mix.rate / cap, 0.99)
    rho_pf = rho * s.costed.prefill_share
    f_pp = 1 + rho * (c.pp - 1)
    ttft = e.ttft_ms * (1 + rho / (2 * (1 - rho))) * f_pp
    tpot = e.tpot_ms / max(1 - rho_pf, 0.01) * f_pp
    meets = _meets(spec, ttft, tpot) and cap >= mix.rate
    pred = Predicted(source="estimate", ttft_ms=Percentiles(p50=ttft, p90=ttft, p99=ttft),
                     tpot_ms=Percentiles(p50=tpot, p90=tpot, p99=tpot),
                     output_tok_s=served * mix.output_mean, combined_tok_s=served * (mix.prompt_mean + mix.output_mean),
                     goodput_rps=served if meets else 0.0,
                     shift_tp_fraction=s.costed.tp_mode_steps if c.sp > 1 else None, meets_slo=meets)
    key = _key(spec, meets, cap, ttft, tpot, mix, c.gpus, served if meets else 0.0)
    return Scored(s, cap, ttft, tpot, pred, key, c.gpus)


def shortlist(scored: list[Scored], mix: TokenMix, k: int = SHORTLIST) -> list[Scored]:
    """The k best by the objective's key, plus the lowest-latency and the best shift (sp > 1)
    candidates when they are not among them, so the simulator sees each kind of trade-off."""
    out = list(scored[:k])
    lat = min(scored, key=lambda x: (x.ttft_ms + mix.output_mean * x.tpot_ms, x.label))
    extra = [lat] + [x for x in scored if x.solved.cand.sp > 1][:1]
    for x in extra:
        if x not in out:
            out.append(x)
    return out


def _meets(spec: Spec, ttft: float, tpot: float) -> bool:
    return (spec.slo.ttft_p90_ms is None or ttft <= spec.slo.ttft_p90_ms) and \
        (spec.slo.tpot_p90_ms is None or tpot <= spec.slo.tpot_p90_ms)


RANKING = {
    "max_throughput": "meets the SLOs, then goodput (to the nearest 5% of the arrival rate), then goodput at 2x "
                      "the arrival rate (in 5% steps), then capacity",
    "min_latency": "meets the SLOs, then goodput, then TTFT + output tokens x TPOT",
    "balanced": "meets the SLOs, then goodput, then end-to-end latency (s) + utilisation (rate / capacity)",
    "min_gpus": "meets the SLOs, then fewest GPUs, then capacity",
}


def goodput_step(goodput: float, rate: float, nearest: bool = True) -> float:
    """``goodput / rate`` in steps of ``1 / GOODPUT_BINS``: differences below a step are simulation
    noise. At the spec's rate (``nearest``) to the nearest step: the plans that meet it cluster at
    100%, and a floor put 99.5% (one request in two hundred over its SLO) a whole step below 100%.
    At twice the rate (overload, no such cluster) floored, as before."""
    x = goodput / rate * GOODPUT_BINS
    return (round(x) if nearest else math.floor(x + 1e-9)) / GOODPUT_BINS


def _key(spec: Spec, meets: bool, cap: float, ttft: float, tpot: float, mix: TokenMix, gpus: int,
         goodput: float) -> tuple:
    lat = ttft + mix.output_mean * tpot
    good = goodput_step(goodput, mix.rate)
    if spec.objective == "min_latency":
        return (not meets, -good, round(lat, 3), -round(cap, 3))
    if spec.objective == "balanced":
        return (not meets, -good, round(lat / 1000.0 + mix.rate / max(cap, 1e-9), 4), round(lat, 3))
    if spec.objective == "min_gpus":
        return (not meets, gpus, -round(cap, 3), round(lat, 3))
    return (not meets, -good, -round(cap, 3), round(lat, 3))


def plan_coster(plan: Any, model: Model) -> Any:
    """The simulator's memoised step-time source for one shortlisted plan, shared by its runs at
    the spec's rate and at HEADROOM x it. Steps are costed on a log grid of 8 points per octave
    (exact below 32 tokens): ranking the shortlist needs less resolution than ``plan simulate``."""
    from costmodels.simulator import LogGrid, coster_for

    return coster_for(plan, model.cost, grid=LogGrid(per_octave=8, exact_below=32))


def shortlist_workload(spec: Spec, model: Model) -> Any:
    """The spec's workload cut to its first ``SIM_REQUESTS`` requests (read once per compile)."""
    from planner.inputs import workload_of

    return workload_of(spec, model.graph.info).with_requests(min(spec.workload.requests, SIM_REQUESTS))


def simulate_score(sc: Scored, plan: Any, model: Model, spec: Spec, mix: TokenMix, wl: Any, coster: Any) -> Scored:
    """Re-score a shortlisted candidate with the serving simulator on the spec's workload ``wl``
    (same seed): TTFT/TPOT percentiles, goodput, SLOs."""
    from costmodels.simulator import simulate

    r = simulate(plan, model.cost, wl, slo=spec.slo.targets(), seed=spec.workload.seed, coster=coster)
    pred = r.to_predicted()
    if plan.mesh.sp < 2:
        pred = pred.model_copy(update={"shift_tp_fraction": None})
    meets = bool(r.meets_slo) if r.meets_slo is not None else True
    ttft = pred.ttft_ms.p90 if pred.ttft_ms else float("inf")
    tpot = pred.tpot_ms.p90 if pred.tpot_ms else 0.0
    key = _key(spec, meets, sc.capacity_rps, ttft, tpot, mix, sc.gpus, r.goodput_rps)
    return replace(sc, predicted=pred, key=key)


def headroom_score(sc: Scored, plan: Any, model: Model, spec: Spec, wl: Any, coster: Any) -> Scored:
    """max_throughput: goodput at HEADROOM x the spec's rate, inserted into the key after the SLOs
    and the goodput at the spec's rate, before the static capacity."""
    from costmodels.simulator import simulate

    hi = simulate(plan, model.cost, wl.with_rate(wl.rate * HEADROOM), slo=spec.slo.targets(), seed=spec.workload.seed,
                  coster=coster)
    good_hi = goodput_step(hi.goodput_rps, wl.rate * HEADROOM, nearest=False)
    return replace(sc, key=sc.key[:2] + (-good_hi,) + sc.key[2:], headroom_goodput_rps=hi.goodput_rps)


def confirm_predicted(plan: Any, spec: Spec, model: Model) -> Any:
    """The chosen plan with its ``predicted`` block from the run ``plan simulate PLAN`` makes: the
    spec's whole workload (``workload.requests``) at the spec's rate and seed, its SLOs, and the
    simulator's default step coster (the shortlist ran on fewer requests and a coarser grid), so
    what compile claims is what simulate reports."""
    from costmodels.simulator import coster_for, simulate
    from planner.inputs import workload_of

    wl = workload_of(spec, model.graph.info)
    r = simulate(plan, model.cost, wl, slo=spec.slo.targets(), seed=spec.workload.seed,
                 coster=coster_for(plan, model.cost))
    pred = r.to_predicted()
    if plan.mesh.sp < 2:
        pred = pred.model_copy(update={"shift_tp_fraction": None})
    out = plan.model_copy(update={"predicted": pred})
    out._spec_file = plan._spec_file
    return out


def with_headroom(resim: list[Scored], plans: list[Any], model: Model, spec: Spec, wl: Any,
                  costers: list[Any]) -> list[Scored]:
    """The headroom run only where it can change the ranking: among the plans tied with the best on
    (SLOs, goodput at the spec's rate). Every other plan's key gets a neutral 0 in that place (it is
    compared only within its own tie group, which the headroom run would not reorder by much)."""
    top = min(r.key[:2] for r in resim)
    tied = [i for i, r in enumerate(resim) if r.key[:2] == top]
    out = []
    for i, r in enumerate(resim):
        if len(tied) > 1 and i in tied:
            out.append(headroom_score(r, plans[i], model, spec, wl, costers[i]))
        else:
            out.append(replace(r, key=r.key[:2] + (0.0,) + r.key[2:]))
    return out


def simulator_available() -> bool:
    try:
        from costmodels.simulator import simulate  # noqa: F401
    except ImportError:
        return False
    return True


def why_lost(r: Scored, best: Scored, spec: Spec) -> str:
    """One line with figures: the first metric, in the objective's order, where r is worse."""
    pr, pb = r.predicted, best.predicted
    if pr.source != pb.source:  # not simulated: it ranked below the shortlist on the static estimate
        slo = []
        if spec.slo.ttft_p90_ms is not None and r.ttft_ms > spec.slo.ttft_p90_ms:
            slo.append(f"TTFT {r.ttft_ms:.0f} ms > SLO {spec.slo.ttft_p90_ms:.0f} ms")
        if spec.slo.tpot_p90_ms is not None and r.tpot_ms > spec.slo.tpot_p90_ms:
            slo.append(f"TPOT {r.tpot_ms:.1f} ms > SLO {spec.slo.tpot_p90_ms:.0f} ms")
        return ("below the simulated shortlist on the static estimate: " + "; ".join(
            slo + [f"TTFT {r.ttft_ms:.0f} ms, TPOT {r.tpot_ms:.1f} ms, capacity {r.capacity_rps:.2f} req/s "
                   f"(winner's estimate: capacity {best.capacity_rps:.2f} req/s)"]) + " [estimate]")
    parts = []
    if pr.meets_slo is False and pb.meets_slo:
        if spec.slo.ttft_p90_ms is not None and pr.ttft_ms and pr.ttft_ms.p90 > spec.slo.ttft_p90_ms:
            parts.append(f"TTFT p90 {pr.ttft_ms.p90:.0f} ms > SLO {spec.slo.ttft_p90_ms:.0f} ms")
        if spec.slo.tpot_p90_ms is not None and pr.tpot_ms and pr.tpot_ms.p90 > spec.slo.tpot_p90_ms:
            parts.append(f"TPOT p90 {pr.tpot_ms.p90:.1f} ms > SLO {spec.slo.tpot_p90_ms:.0f} ms")
        if not parts:
            parts.append(f"capacity {r.capacity_rps:.2f} req/s < arrival rate")
    if r.headroom_goodput_rps is not None and best.headroom_goodput_rps is not None \
            and r.headroom_goodput_rps < best.headroom_goodput_rps - 1e-9:
        parts.append(f"goodput at {HEADROOM:g}x the arrival rate {r.headroom_goodput_rps:.2f} vs "
                     f"{best.headroom_goodput_rps:.2f} req/s")
    if spec.objective == "min_gpus" and r.gpus > best.gpus:
        parts.append(f"uses {r.gpus} GPUs vs {best.gpus}")
    if pr.goodput_rps is not None and pb.goodput_rps is not None and pr.goodput_rps < pb.goodput_rps - 1e-9:
        parts.append(f"goodput {pr.goodput_rps:.2f} vs {pb.goodput_rps:.2f} req/s")
    if pr.ttft_ms and pb.ttft_ms and spec.objective in ("min_latency", "balanced"):
        parts.append(f"TTFT p90 {pr.ttft_ms.p90:.0f} vs {pb.ttft_ms.p90:.0f} ms")
    if pr.tpot_ms and pb.tpot_ms and spec.objective in ("min_latency", "balanced"):
        parts.append(f"TPOT p90 {pr.tpot_ms.p90:.1f} vs {pb.tpot_ms.p90:.1f} ms")
    parts.append(f"capacity {r.capacity_rps:.2f} vs {best.capacity_rps:.2f} req/s "
                 f"({100 * (r.capacity_rps / best.capacity_rps - 1):+.0f}%)")
    return "; ".join(parts) + f" [{pr.source}]"
