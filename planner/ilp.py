"""The stage-assignment ILP: split decoder layers into contiguous pipeline stages and place
the vision encoder, over plain numbers (no graph, no cost model), solved with PuLP.

Inputs are per-item cost vectors (``ItemCost``): for every decoder layer ``l``

* ``thr[l]``  -- ms of that layer's work per request (throughput term: the workload's
  prefill and decode steps, amortised per request, in the modes the shift threshold picks);
* ``ttft[l]`` -- ms it adds to an unloaded request's time to first token;
* ``tpot[l]`` -- ms it adds to one decode step of the reference batch;
* ``mem[l]``  -- GB per GPU of the stage that holds it (weights, shift copy, minimum KV).

The embedding sits on stage 0, final norm + lm_head on the last stage; ``stage_mem`` is
fixed per stage (activations, workspace). With stages ``s = 0..S-1`` and vision placement
binaries ``v_p``::

    T_s = sum_{l in s} thr[l] + [s=0](thr_emb + sum_p v_p a_p) + [s=S-1] thr_head + sum_p v_p e_p
    z  >= T_s  (all s),   z >= sum_p v_p d_p            (d_p: a dedicated encoder's own stage)
    M_s = sum_{l in s} mem[l] + stage_mem + [s=0](...) + [s=S-1](...) + sum_p v_p (..) <= capacity
    TTFT = sum_l ttft[l] + emb + head + (S-1) p2p_ttft + sum_p v_p ttft_p        <= SLO
    TPOT = sum_l tpot[l] + emb + head + (S-1) p2p_tpot                           <= SLO
    minimise  w_thr * z + w_lat * (TTFT + out_tokens * TPOT)

Two exact formulations share those constraints:

* identical layers (every real decoder stack): integer stage boundaries ``b_0=0 < b_1 <
  ... < b_S=L`` so stage ``s`` has ``n_s = b_{s+1} - b_s`` layers -- a handful of variables;
* heterogeneous layers: cumulative binaries ``y[l][s] = 1`` iff layer ``l`` lies in a stage
  ``<= s`` (monotone in ``l`` and ``s``), ``x[l][s] = y[l][s] - y[l][s-1]``.

``evaluate`` computes the same objective for a given split and placement; the brute-force
test enumerates every split with it and checks the ILP reaches the same optimum.

Objectives set the weights (``objective_weights``): max_throughput minimises z with a small
latency term, min_latency the reverse, balanced normalises both by the uniform split's values;
min_gpus adds the rate floor ``z <= max_thr_ms`` (the candidate must carry the arrival rate) and
the planner then prefers the feasible candidate with the fewest GPUs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

ObjectiveKind = Literal["max_throughput", "min_latency", "balanced", "min_gpus"]
EPS_LAT = 1e-3  # weight of the secondary term


@dataclass(frozen=True)
class ItemCost:
    """Cost vector of one block (or group of blocks) on the stage that holds it."""

    thr: float = 0.0
    ttft: float = 0.0
    tpot: float = 0.0
    mem: float = 0.0


@dataclass(frozen=True)
class VisionOption:
    """One encoder placement and what it adds: on stage 0, on every stage, or as its own
    pipeline stage (dedicated GPUs); ``ttft`` is the encoder's time on a request's path."""

    placement: str
    stage0_thr: float = 0.0
    every_thr: float = 0.0
    separate_thr: float = 0.0
    stage0_mem: float = 0.0
    every_mem: float = 0.0
    ttft: float = 0.0


@dataclass(frozen=True)
class Weights:
    throughput: float = 1.0
    latency: float = EPS_LAT


def objective_weights(kind: ObjectiveKind, z_ref: float = 1.0, lat_ref: float = 1.0) -> Weights:
    """Objective weights. ``balanced`` normalises both terms by reference values (those of
    the uniform split), so each counts as much as the other."""
    if kind == "min_latency":
        return Weights(throughput=EPS_LAT, latency=1.0)
    if kind == "balanced":
        return Weights(throughput=1.0 / max(z_ref, 1e-9), latency=1.0 / max(lat_ref, 1e-9))
    return Weights(throughput=1.0, latency=EPS_LAT)  # max_throughput, min_gpus (rate floor via max_thr_ms)


@dataclass(frozen=True)
class StageProblem:
    layers: tuple[ItemCost, ...]
    stages: int
    first: ItemCost = ItemCost()  # embedding, on stage 0
    last: ItemCost = ItemCost()  # final norm + lm_head, on the last stage
    stage_mem: float = 0.0
    capacity_gb: float = float("inf")
    p2p_ttft_ms: float = 0.0  # per stage boundary
    p2p_tpot_ms: float = 0.0
    vision: tuple[VisionOption, ...] = ()  # allowed placements; empty when no encoder
    output_tokens: float = 1.0
    weights: Weights = Weights()
    max_ttft_ms: float | None = None
    max_tpot_ms: float | None = None
    max_thr_ms: float | None = None  # rate floor: bottleneck ms per request at most this
    pinned: tuple[tuple[int, int], ...] | None = None  # fixed stage ranges (inclusive)


@dataclass(frozen=True)
class Violation:
    label: str  # e.g. "mem_stage0", "slo_ttft"
    value: float
    limit: float
    text: str


@dataclass(frozen=True)
class Evaluation:
    stages: tuple[tuple[int, int], ...]
    vision: str | None
    stage_thr_ms: tuple[float, ...]
    stage_mem_gb: tuple[float, ...]
    bottleneck_ms: float
    ttft_ms: float
    tpot_ms: float
    objective: float
    violations: tuple[Violation, ...] = ()

    @property
    def feasible(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class StageSolution:
    status: Literal["optimal", "infeasible"]
    best: Evaluation | None
    formulation: str  # "boundaries", "cumulative", "single-stage", "pinned"
    solver: str
    binding: tuple[str, ...] = ()  # labels of constraints tight at the optimum
    variables: int = 0
    constraints: int = 0


# ------------------------------------------------------------------ evaluation (the oracle's ruler)


def evaluate(p: StageProblem, stages: tuple[tuple[int, int], ...], vision: str | None) -> Evaluation:
    """Objective and constraint check of one split (inclusive layer ranges) and placement."""
    S = len(stages)
    opt = next((v for v in p.vision if v.placement == vision), None) if vision else None
    thr, mem = [], []
    for s, (a, b) in enumerate(stages):
        t = sum(p.layers[l].thr for l in range(a, b + 1))
        m = sum(p.layers[l].mem for l in range(a, b + 1)) + p.stage_mem
        if s == 0:
            t += p.first.thr + (opt.stage0_thr if opt else 0.0)
            m += p.first.mem + (opt.stage0_mem if opt else 0.0)
        if s == S - 1:
            t += p.last.thr
            m += p.last.mem
        if opt:
            t += opt.every_thr
            m += opt.every_mem
        thr.append(t)
        mem.append(m)
    z = max(thr + ([opt.separate_thr] if opt else []))
    ttft, tpot = latency(p, S, opt)
    obj = p.weights.throughput * z + p.weights.latency * (ttft + p.output_tokens * tpot)
    viol: list[Violation] = []
    for s, m in enumerate(mem):
        if m > p.capacity_gb + 1e-9:
            viol.append(Violation(f"mem_stage{s}", m, p.capacity_gb,
                                  f"stage {s} needs {m:.1f} GB per GPU; capacity {p.capacity_gb:.1f} GB"))
    if p.max_ttft_ms is not None and ttft > p.max_ttft_ms + 1e-9:
        viol.append(Violation("slo_ttft", ttft, p.max_ttft_ms,
                              f"unloaded TTFT {ttft:.0f} ms > SLO {p.max_ttft_ms:.0f} ms"))
    if p.max_tpot_ms is not None and tpot > p.max_tpot_ms + 1e-9:
        viol.append(Violation("slo_tpot", tpot, p.max_tpot_ms,
                              f"TPOT {tpot:.1f} ms > SLO {p.max_tpot_ms:.1f} ms"))
    if p.max_thr_ms is not None and z > p.max_thr_ms + 1e-9:
        viol.append(Violation("rate", z, p.max_thr_ms,
                              f"bottleneck {z:.2f} ms per request > {p.max_thr_ms:.2f} ms the arrival rate allows"))
    return Evaluation(tuple(stages), opt.placement if opt else None, tuple(thr), tuple(mem), z, ttft, tpot, obj,
                      tuple(viol))


def latency(p: StageProblem, S: int, opt: VisionOption | None) -> tuple[float, float]:
    """(TTFT, TPOT) of an unloaded request: every stage on its path, plus the hops."""
    ttft = sum(x.ttft for x in p.layers) + p.first.ttft + p.last.ttft + (S - 1) * p.p2p_ttft_ms
    ttft += opt.ttft if opt else 0.0
    tpot = sum(x.tpot for x in p.layers) + p.first.tpot + p.last.tpot + (S - 1) * p.p2p_tpot_ms
    return ttft, tpot


def all_splits(layers: int, stages: int):
    """Every contiguous split of ``layers`` into ``stages`` non-empty ranges."""
    for cuts in itertools.combinations(range(1, layers), stages - 1):
        bounds = (0, *cuts, layers)
        yield tuple((bounds[i], bounds[i + 1] - 1) for i in range(stages))


# ------------------------------------------------------------------ the solver


def _placements(p: StageProblem) -> list[str | None]:
    return [v.placement for v in p.vision] if p.vision else [None]


def _best_of(p: StageProblem, splits, formulation: str) -> StageSolution:
    evals = [evaluate(p, st, v) for st in splits for v in _placements(p)]
    ok = [e for e in evals if e.feasible]
    if not ok:
        return StageSolution("infeasible", None, formulation, "enumeration")
    best = min(ok, key=lambda e: e.objective)
    return StageSolution("optimal", best, formulation, "enumeration")


def solve(p: StageProblem, *, solver: str | None = None) -> StageSolution:
    """Optimal contiguous split and vision placement, or status "infeasible".

    Pinned stages leave only the placement to choose (enumerated exactly), and one stage with at
    most one placement leaves nothing. Otherwise a PuLP model (CBC by default, HiGHS when
    ``highspy`` is installed) chooses the split and the placement."""
    L, S = len(p.layers), p.stages
    if S < 1 or S > L:
        raise ValueError(f"{S} stages for {L} layers")
    if p.pinned is not None:
        return _best_of(p, [p.pinned], "pinned")
    if S == 1 and len(p.vision) <= 1:
        return _best_of(p, [((0, L - 1),)], "single-stage")  # nothing to decide
    return _solve_pulp(p, solver)


def _solver(name: str | None):
    import pulp

    if name in (None, "highs"):
        try:
            import highspy  # noqa: F401

            return pulp.HiGHS(msg=False), "highs"
        except ImportError:
            if name == "highs":
                raise
    return pulp.PULP_CBC_CMD(msg=False), "cbc"


def _solve_pulp(p: StageProblem, solver_name: str | None) -> StageSolution:
    import warnings

    with warnings.catch_warnings():  # PuLP 3.3 announces its 4.0 API on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return _build_and_solve(p, solver_name)


def lp_text(p: StageProblem) -> str:
    """The PuLP model of a problem in LP format: every constraint under its label
    (``bottleneck_stage0``, ``mem_stage1``, ``slo_ttft``, ``vision_one_placement``, ...)."""
    import os
    import tempfile
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prob = _build(p)[0]
        fd, path = tempfile.mkstemp(suffix=".lp")
        os.close(fd)
        try:
            prob.writeLP(path)
            with open(path) as f:
                return f.read()
        finally:
            os.unlink(path)


def _build(p: StageProblem):
    """(LpProblem, formulation, decode(), placement options, placement binaries, presolve-infeasible)."""
    import pulp

    L, S = len(p.layers), p.stages
    uniform = all(x == p.layers[0] for x in p.layers)
    prob = pulp.LpProblem("stages", pulp.LpMinimize)
    # per-stage layer sums of each cost field, as linear expressions
    if S == 1:  # only the encoder placement to choose
        formulation = "single-stage"
        lay_thr = [sum(x.thr for x in p.layers)]
        lay_mem = [sum(x.mem for x in p.layers)]
        decode = lambda: ((0, L - 1),)  # noqa: E731
    elif uniform:
        formulation = "boundaries"
        b = [pulp.LpVariable(f"boundary_{s}", 1, L - 1, cat="Integer") for s in range(1, S)]
        bounds = [0, *b, L]
        n = [bounds[s + 1] - bounds[s] for s in range(S)]
        for s in range(S):
            prob += n[s] >= 1, f"stage{s}_nonempty"
        c = p.layers[0]
        lay_thr = [c.thr * n[s] for s in range(S)]
        lay_mem = [c.mem * n[s] for s in range(S)]
        decode = lambda: _boundaries_solution(b, L)  # noqa: E731
    else:
        formulation = "cumulative"
        y = [[pulp.LpVariable(f"y_l{l}_s{s}", cat="Binary") for s in range(S - 1)] for l in range(L)]

        def yy(l: int, s: int):
            return 1 if s >= S - 1 else (0 if s < 0 else y[l][s])

        for l in range(L):
            for s in range(S - 2):
                prob += y[l][s] <= y[l][s + 1], f"cum_l{l}_s{s}"
            if l:
                for s in range(S - 1):
                    prob += y[l][s] <= y[l - 1][s], f"contig_l{l}_s{s}"
        x = [[yy(l, s) - yy(l, s - 1) for s in range(S)] for l in range(L)]
        for s in range(S):
            prob += pulp.lpSum(x[l][s] for l in range(L)) >= 1, f"stage{s}_nonempty"
        lay_thr = [pulp.lpSum(p.layers[l].thr * x[l][s] for l in range(L)) for s in range(S)]
        lay_mem = [pulp.lpSum(p.layers[l].mem * x[l][s] for l in range(L)) for s in range(S)]
        decode = lambda: _cumulative_solution(y, L, S)  # noqa: E731

    opts = list(p.vision)
    v = [pulp.LpVariable(f"vision_{o.placement}", cat="Binary") for o in opts]
    if opts:
        prob += pulp.lpSum(v) == 1, "vision_one_placement"
    z = pulp.LpVariable("bottleneck_ms", 0)
    for s in range(S):
        t = lay_thr[s] + pulp.lpSum(o.every_thr * vi for o, vi in zip(opts, v))
        m = lay_mem[s] + p.stage_mem + pulp.lpSum(o.every_mem * vi for o, vi in zip(opts, v))
        if s == 0:
            t += p.first.thr + pulp.lpSum(o.stage0_thr * vi for o, vi in zip(opts, v))
            m += p.first.mem + pulp.lpSum(o.stage0_mem * vi for o, vi in zip(opts, v))
        if s == S - 1:
            t += p.last.thr
            m += p.last.mem
        prob += z >= t, f"bottleneck_stage{s}"
        if p.capacity_gb != float("inf"):
            prob += m <= p.capacity_gb, f"mem_stage{s}"
    if opts:
        prob += z >= pulp.lpSum(o.separate_thr * vi for o, vi in zip(opts, v)), "bottleneck_vision"
    base_ttft, tpot = latency(p, S, None)
    ttft = base_ttft + pulp.lpSum(o.ttft * vi for o, vi in zip(opts, v))
    if p.max_ttft_ms is not None:
        prob += ttft <= p.max_ttft_ms, "slo_ttft"
    tpot_fails = p.max_tpot_ms is not None and tpot > p.max_tpot_ms + 1e-9  # no split changes TPOT
    if p.max_thr_ms is not None:
        prob += z <= p.max_thr_ms, "rate"
    prob += p.weights.throughput * z + p.weights.latency * (ttft + p.output_tokens * tpot)
    return prob, formulation, decode, opts, v, tpot_fails


def _build_and_solve(p: StageProblem, solver_name: str | None) -> StageSolution:
    import pulp

    prob, formulation, decode, opts, v, tpot_fails = _build(p)
    if tpot_fails:
        return StageSolution("infeasible", None, formulation, "presolve", ("slo_tpot",))
    solver, name = _solver(solver_name)
    try:
        prob.solve(solver)
    except pulp.PulpSolverError as e:  # a broken or missing solver binary: the environment, not a bug
        from plans.errors import UserError

        raise UserError(f"the {name} MILP solver could not run ({e}); reinstall pulp==3.3.2 (it ships CBC) "
                        "or install highspy") from None
    status = pulp.LpStatus[prob.status]
    nvars, ncons = len(prob.variables()), len(prob.constraints)
    if status != "Optimal":
        return StageSolution("infeasible", None, formulation, name, variables=nvars, constraints=ncons)
    stages = decode()
    placement = next((o.placement for o, vi in zip(opts, v) if (vi.value() or 0) > 0.5), None)
    best = evaluate(p, stages, placement)
    binding = tuple(sorted(k for k, c in prob.constraints.items() if abs(c.slack or 0.0) < 1e-6
                           and (k.startswith(("mem_", "slo_", "rate", "bottleneck_")))))
    return StageSolution("optimal", best, formulation, name, binding, nvars, ncons)


def _boundaries_solution(b, L: int) -> tuple[tuple[int, int], ...]:
    cuts = [int(round(bi.value())) for bi in b]
    bounds = [0, *cuts, L]
    return tuple((bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1))


def _cumulative_solution(y, L: int, S: int) -> tuple[tuple[int, int], ...]:
    stage_of = []
    for l in range(L):
        s = next((s for s in range(S - 1) if (y[l][s].value() or 0) > 0.5), S - 1)
        stage_of.append(s)
    out = []
    for s in range(S):
        ls = [l for l in range(L) if stage_of[l] == s]
        out.append((ls[0], ls[-1]))
    return tuple(out)
