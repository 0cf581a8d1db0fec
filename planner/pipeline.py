"""The compile pipeline: spec -> graph -> cost model -> candidates -> ILP -> scoring -> Plan.

Each stage is a function with typed input and output, so any of them can be run, cached
and tested alone::

    spec = load(path)                         # planner.spec.Spec
    model = build_model(spec)                 # Model: HF config, OpGraph (cached trace), CostModel
    mix = token_mix(spec, model)              # TokenMix: the workload's reference steps
    cands = candidate_set(spec, model, mix)   # CandidateSet (rules + memory bound)
    costed = [cost_candidate(c, model, mix, spec) for c in cands.candidates]   # StageProblems
    solved = [solve_candidate(x) for x in costed]                               # ILP per candidate
    ranked = rank(solved, spec, model, mix)   # static estimate, then the simulator on the shortlist
    plan = to_plan(ranked, spec, model, mix)  # plans.schema.Plan

``compile_spec`` runs them all. Costs per request (the ILP's throughput term) come from the
workload's mix: a request of mean prompt length P and mean output O costs
``P / T_pf`` prefill steps of ``T_pf = max_batch_tokens`` tokens and ``O / b`` decode steps of
a batch of ``b`` sequences (``b`` limited by ``max_seqs`` and by the KV capacity), each step
in the mode the shift threshold picks for its token count.

SLOs are used twice. In the ILP they are hard bounds on what no load can improve: the
unloaded TTFT (a request's prefill through every stage, plus its images' encoder time) and the
TPOT of a decode step at the operating batch (Little's law at the spec's rate); a spec that
misses them on every mesh is infeasible and ``planner.infeasible`` says which bound binds. Under
load, the p90s come from the serving simulator on the shortlist, and ranking puts plans that
meet the SLOs first (``Predicted.meets_slo``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from graph.opgraph import OpGraph, StepShape
from planner.candidates import (Candidate, CandidateSet, ModelFacts, SearchSpace, enumerate_candidates,
                                kv_heads_per_gpu)
from planner.ilp import (ItemCost, StageProblem, StageSolution, VisionOption, evaluate, latency,
                         objective_weights, solve, uniform_split)
from planner.spec import Spec, load_spec
from planner.threshold import Crossover, crossover
from plans.errors import UserError

Progress = Callable[[str], None]
SHORTLIST = 3  # best candidates by the static key that the simulator scores (plus diversity picks)
SIM_REQUESTS = 200  # requests per simulated candidate (the spec's own count caps it)
# max_throughput also simulates the shortlist at this multiple of the spec's rate: at the spec's own
# rate every plan with spare capacity meets the SLOs, and the static capacity (bottleneck time, no
# queueing) favours PP/DP meshes whose TPOT breaks the SLO long before that capacity is reached.
HEADROOM = 2.0
MIX_REQUESTS = 500  # requests sampled to measure the workload's means
VISION_BATCH = 8
GOODPUT_BINS = 20  # ranking compares goodput / arrival rate in steps of 1/20
UTIL_TARGET = 0.8  # min_gpus: the bottleneck may be busy at most this share of the time at the arrival rate  # images per encoder batch when amortising encoder time per request


# ------------------------------------------------------------------ stage 1-2: spec, model


@dataclass
class Model:
    """The spec's model on the spec's hardware: config, traced graph and cost model."""

    cfg: dict[str, Any]
    config_sha256: str
    graph: OpGraph
    cost: Any  # costmodels.model.CostModel
    name: str
    _memory: dict = field(default_factory=dict, repr=False)

    @property
    def has_vision(self) -> bool:
        return any(b.tower == "vision" for b in self.graph.blocks)

    def memory(self, **kw: Any) -> Any:
        """``CostModel.memory`` memoised on its arguments (the planner asks the same ones often)."""
        key = tuple(sorted(kw.items()))
        hit = self._memory.get(key)
        if hit is None:
            hit = self._memory[key] = self.cost.memory(**kw)
        return hit

    @functools.cached_property
    def layer_keys(self) -> list[tuple]:
        """Per decoder layer, a signature of its ops (kind, shard, shape, params): equal keys cost the same."""
        keys = []
        for b in self.graph.blocks_of("decoder"):
            keys.append(tuple((op.kind, op.shard, tuple(sorted((k, str(v)) for k, v in op.shape.items())), op.params)
                              for op in self.graph.block_ops(b)))
        return keys


def load(path: str | Path) -> Spec:
    return load_spec(path)


def build_model(spec: Spec) -> Model:
    """HF config -> cached op graph -> cost model (``costmodels.build``: the committed calibration
    profile of the spec's GPU, the datasheet roofline for an inline GPU or one without a profile)."""
    from costmodels.build import cost_model_for, graph_for_config
    from graph.hf_config import config_sha256, load_config

    m = spec.model
    cfg = load_config(m.preset, spec.resolve(m.config) if m.config else None)
    graph = graph_for_config(cfg)
    cost, _ = cost_model_for(spec, graph=graph)
    name = m.preset or Path(m.config or "model").stem
    return Model(cfg, config_sha256(cfg), graph, cost, name)


# ------------------------------------------------------------------ stage 3: the workload's mix


@dataclass(frozen=True)
class TokenMix:
    """Means of the spec's workload and the scheduler's limits (tokens per request)."""

    rate: float  # requests/s
    prompt_mean: float  # text + image tokens
    output_mean: float
    prompt_max: int
    output_max: int
    images_mean: float  # images per request
    patches_mean: float  # ViT patches per image
    image_tokens_mean: float  # LLM tokens per image
    max_batch_tokens: int
    max_seqs: int

    @property
    def context_mean(self) -> float:
        """Mean context of a decoding sequence: prompt plus half the output."""
        return self.prompt_mean + self.output_mean / 2

    def prefill_step(self) -> StepShape:
        """A full step of prefill chunks: prompts of mean length packed into max_batch_tokens."""
        p = max(1, int(round(self.prompt_mean)))
        if p >= self.max_batch_tokens:
            return StepShape.prefill([self.max_batch_tokens], [p // 2])
        n, rest = divmod(self.max_batch_tokens, p)
        return StepShape.prefill([p] * n + ([rest] if rest else []))

    def ttft_step(self) -> StepShape:
        """An unloaded request's prefill (chunked as the scheduler would), as one shape."""
        return StepShape.prefill([max(1, int(round(self.prompt_mean)))])

    def decode_step(self, batch: int) -> StepShape:
        return StepShape.decode([max(1, int(round(self.context_mean)))] * max(1, batch))

    def step_of(self, tokens: int, batch: int) -> tuple[StepShape, StepShape | None]:
        """A step of ``tokens`` tokens: up to ``batch`` decodes, the rest one prefill chunk
        (the two parts, so attention can be costed per part: see ``mixed_ms``)."""
        d = min(tokens, batch)
        return self.decode_step(d), (StepShape.prefill([tokens - d]) if tokens > d else None)


def mixed_ms(fn: Callable[[StepShape], float], decode: StepShape, prefill: StepShape | None) -> float:
    """Time of a step holding decodes and a prefill chunk.

    A summed StepShape would blur the two attention regimes (a decode batch reads KV, a prefill
    chunk is compute-bound), so, as the simulator's coster does, everything but attention is
    costed on the whole step and attention per part::

        t = f(d + p) - attn(d + p) + attn(d) + attn(p),   attn(x) = f(x) - f(x without pairs/KV)
    """
    if prefill is None:
        return fn(decode)
    total = decode + prefill

    def attn(x: StepShape) -> float:
        return fn(x) - fn(StepShape(x.tokens, 0.0, 0.0, x.seqs))

    return fn(total) - attn(total) + attn(decode) + attn(prefill)


def token_mix(spec: Spec, model: Model) -> TokenMix:
    """The workload's means, from a seeded sample of its requests (synthetic or trace)."""
    from costmodels.workload import from_spec

    reqs = from_spec(spec, model.graph.info).with_requests(min(spec.workload.requests, MIX_REQUESTS)).sample(spec.workload.seed)
    n = max(1, len(reqs))
    imgs = [p for r in reqs for p in r.image_patches]
    toks = [t for r in reqs for t in r.image_tokens]
    return TokenMix(
        rate=_rate(spec, reqs),
        prompt_mean=sum(r.prompt_tokens for r in reqs) / n,
        output_mean=sum(r.output_tokens for r in reqs) / n,
        prompt_max=max((r.prompt_tokens for r in reqs), default=1),
        output_max=max((r.output_tokens for r in reqs), default=1),
        images_mean=len(imgs) / n,
        patches_mean=sum(imgs) / len(imgs) if imgs else 0.0,
        image_tokens_mean=sum(toks) / len(toks) if toks else 0.0,
        max_batch_tokens=spec.search.max_batch_tokens,
        max_seqs=spec.search.max_seqs,
    )


def _rate(spec: Spec, reqs: list) -> float:
    if spec.workload.arrival_rate:
        return float(spec.workload.arrival_rate)
    span = reqs[-1].arrival_s - reqs[0].arrival_s if len(reqs) > 1 else 0.0
    return (len(reqs) - 1) / span if span > 0 else 1.0


# ------------------------------------------------------------------ stage 4: candidates


def model_facts(spec: Spec, model: Model) -> ModelFacts:
    """Sizes (GB, spec dtypes) read from the cost model's memory arithmetic."""
    cm, info = model.cost, model.graph.info
    one = model.memory(pp=1, tp=1, sp=1, stage_layers=(0, 0), with_embedding=False, with_lm_head=False)
    emb = model.memory(pp=1, tp=1, sp=1, stage_layers=(0, 0), with_embedding=True, with_lm_head=False)
    both = model.memory(pp=1, tp=1, sp=1, stage_layers=(0, 0), with_embedding=True, with_lm_head=True)
    vis_params = sum(b.params for b in model.graph.blocks if b.tower == "vision")
    return ModelFacts(
        layers=info.layers, heads=info.heads, kv_heads=info.kv_heads,
        layer_weights_gb=one.weights_gb, embed_gb=emb.weights_gb - one.weights_gb,
        head_gb=both.weights_gb - emb.weights_gb,
        kv_gb_per_token_head=one.kv_bytes_per_token / max(1, info.kv_heads) / 1e9,
        vision_gb=vis_params * cm.rates.w_bytes / 1e9,
        vision_heads=_vision_heads(model),
        weights_dtype=spec.model.weights_dtype,
    )


def _vision_heads(model: Model) -> int:
    """Attention heads of the vision encoder (0 without one), from the graph or the config."""
    if not model.has_vision:
        return 0
    vis = model.graph.info.vision or {}
    vc = model.cfg.get("vision_config") or {}
    return int(vis.get("heads") or vis.get("num_heads") or vc.get("num_heads") or vc.get("num_attention_heads") or 1)


def min_kv_tokens(mix: TokenMix) -> int:
    """The KV each replica must hold at least: one longest request, or one full step."""
    return max(mix.prompt_max + mix.output_max, mix.max_batch_tokens)


def search_space(spec: Spec, model: Model, mix: TokenMix) -> SearchSpace:
    from costmodels.memory import USABLE_FRACTION

    s = spec.search
    act = model.memory(pp=1, tp=1, sp=1, stage_layers=(0, 0), with_embedding=False, with_lm_head=False,
                            max_batch_tokens=mix.max_batch_tokens).activations_gb
    tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
    return SearchSpace(
        gpus=spec.hardware.world_size, gpus_per_node=spec.hardware.gpus_per_node,
        capacity_gb=model.cost.gpu.hbm_gb * USABLE_FRACTION, hbm_gb=model.cost.gpu.hbm_gb, activations_gb=act, min_kv_tokens=min_kv_tokens(mix),
        allow_cross_node_tp=s.allow_cross_node_tp, allow_fewer_gpus=spec.objective == "min_gpus",
        dp=tup(s.dp), pp=tup(s.pp) if s.stages is None else (len(s.stages),), tp=tup(s.tp), sp=tup(s.sp),
        placements=tuple(s.vision_placement) if s.vision_placement else
        ("stage0_tp", "stage0_dp", "all_dp", "dedicated"),
        dedicated_gpus=tup(s.dedicated_vision_gpus),
    )


def candidate_set(spec: Spec, model: Model, mix: TokenMix) -> tuple[CandidateSet, ModelFacts, SearchSpace]:
    facts = model_facts(spec, model)
    space = search_space(spec, model, mix)
    return enumerate_candidates(facts, space), facts, space


# ------------------------------------------------------------------ stage 5: costs per candidate


@dataclass(frozen=True)
class Costed:
    cand: Candidate
    problem: StageProblem
    threshold: Crossover | None  # decoder-layer crossover (sp > 1)
    threshold_tokens: int | None  # what the plan uses (pinned or derived)
    decode_batch: int  # throughput reference batch
    operating_batch: int  # decode batch at the spec's arrival rate (TPOT reference)
    steps_per_request: tuple[float, float]  # (prefill steps, decode steps)
    tp_mode_steps: float  # share of a request's steps that run in shifted TP mode
    prefill_share: float  # share of a request's bottleneck work that is prefill


def _layer_ms(model: Model, c: Candidate, shape: StepShape, mode: str, layer: int = 0) -> float:
    return model.cost.layers_time(layer, layer, shape, tp=c.tp, sp=c.sp, mode=mode).total_ms


def _blocks_ms(model: Model, c: Candidate, kinds: tuple[str, ...], shape: StepShape, mode: str) -> float:
    blocks = [b for b in model.graph.blocks if b.tower == "text" and b.kind in kinds]
    return model.cost.blocks_time(blocks, shape, tp=c.tp, sp=c.sp, mode=mode).total_ms


def layer_crossover(model: Model, c: Candidate, mix: TokenMix, batch: int) -> Crossover | None:
    """Crossover of one decoder layer's step time, SP x TP vs TP(tp*sp), on the mix's steps: a step
    of T tokens holds min(T, batch) decodes at the mean context and the rest as one prefill chunk
    (batch = the scheduler's max_seqs, so candidates of equal tp, sp share the cost model's memo)."""
    if c.sp < 2:
        return None
    def ms(tokens: int, mode: str) -> float:
        return mixed_ms(lambda sh: _layer_ms(model, c, sh, mode), *mix.step_of(tokens, batch))

    return crossover(lambda t: ms(t, "sp_tp"), lambda t: ms(t, "tp"), mix.max_batch_tokens)


def cost_candidate(c: Candidate, model: Model, mix: TokenMix, spec: Spec, facts: ModelFacts,
                   space: SearchSpace) -> Costed:
    """Cost vectors of every block of a candidate (see the module doc) as a StageProblem."""
    cm, info = model.cost, model.graph.info
    L = info.layers
    uni = uniform_split(L, c.pp)
    kv_tok = min(model.memory(pp=1, tp=c.tp, sp=c.sp, stage_layers=st, with_embedding=i == 0,
                           with_lm_head=i == c.pp - 1, max_batch_tokens=mix.max_batch_tokens).kv_tokens
                 for i, st in enumerate(uni))
    b_max = max(1, min(mix.max_seqs, int(kv_tok // max(1.0, mix.context_mean))))
    cross = layer_crossover(model, c, mix, mix.max_seqs)
    pinned = spec.search.shift_threshold
    thr = None if c.sp < 2 else (pinned if pinned is not None else cross.threshold_tokens)
    mode = lambda tokens: "tp" if thr is not None and tokens <= thr else "sp_tp"  # noqa: E731

    pf, ttft_shape = mix.prefill_step(), mix.ttft_step()
    n_pf = mix.prompt_mean / pf.tokens
    dec = mix.decode_step(b_max)
    n_dec = mix.output_mean / b_max
    b_op = _operating_batch(model, c, mix, b_max, mode)
    dec_op = mix.decode_step(b_op)
    m_pf, m_dec, m_tt, m_op = mode(int(pf.tokens)), mode(b_max), mode(int(ttft_shape.tokens)), mode(b_op)

    def item(kinds: tuple[str, ...] | None, layer: int = 0) -> ItemCost:
        f = (lambda s, m: _layer_ms(model, c, s, m, layer)) if kinds is None else \
            (lambda s, m: _blocks_ms(model, c, kinds, s, m))
        return ItemCost(thr=n_pf * f(pf, m_pf) + n_dec * f(dec, m_dec), ttft=f(ttft_shape, m_tt), tpot=f(dec_op, m_op))

    # memory: per-layer weights (+ shift copy) and minimum KV; fixed activations per stage
    m1 = model.memory(pp=1, tp=c.tp, sp=c.sp, stage_layers=(0, 0), with_embedding=False, with_lm_head=False,
                   max_batch_tokens=mix.max_batch_tokens)
    me = model.memory(pp=1, tp=c.tp, sp=c.sp, stage_layers=(0, 0), with_embedding=True, with_lm_head=False,
                   max_batch_tokens=mix.max_batch_tokens)
    mh = model.memory(pp=1, tp=c.tp, sp=c.sp, stage_layers=(0, 0), with_embedding=False, with_lm_head=True,
                   max_batch_tokens=mix.max_batch_tokens)
    fixed = lambda m: m.weights_gb + m.shift_copy_gb + m.activations_gb  # noqa: E731
    kv_layer = space.min_kv_tokens * m1.kv_bytes_per_token / 1e9
    layer_mem = m1.weights_gb + m1.shift_copy_gb + kv_layer
    layers = []
    costs_of: dict[tuple, ItemCost] = {}
    for l, key in enumerate(model.layer_keys):  # identical layers are costed once
        if key not in costs_of:
            costs_of[key] = replace(item(None, l), mem=layer_mem)
        layers.append(costs_of[key])
    first = replace(item(("embedding",)), mem=fixed(me) - fixed(m1))
    last = replace(item(("final_norm", "lm_head")), mem=fixed(mh) - fixed(m1))
    if c.pp == 1 and info.tie_embeddings:
        last = replace(last, mem=0.0)
    hops = c.pp - 1
    p2p_tt = _p2p_total(model, c, ttft_shape.tokens) / hops if hops else 0.0
    p2p_tp = _p2p_total(model, c, b_op) / hops if hops else 0.0
    vision = tuple(_vision_option(p, model, c, mix, facts) for p in c.placements) if mix.images_mean > 0 or \
        model.has_vision else ()
    vision = tuple(v for v in vision if v is not None)
    prob = StageProblem(
        layers=tuple(layers), stages=c.pp, first=first, last=last, stage_mem=m1.activations_gb,
        capacity_gb=space.capacity_gb, p2p_ttft_ms=p2p_tt, p2p_tpot_ms=p2p_tp, vision=vision,
        output_tokens=mix.output_mean, max_ttft_ms=spec.slo.ttft_p90_ms, max_tpot_ms=spec.slo.tpot_p90_ms,
        max_thr_ms=(c.dp * 1000.0 * UTIL_TARGET / mix.rate) if spec.objective == "min_gpus" else None,
        pinned=pinned_stages(spec, L),
    )
    # balanced: normalise by the uniform split's own values
    ref = evaluate(prob, uni if prob.pinned is None else prob.pinned, vision[0].placement if vision else None)
    w = objective_weights(spec.objective, ref.bottleneck_ms, ref.ttft_ms + mix.output_mean * ref.tpot_ms)
    prob = replace(prob, weights=w)
    steps = n_pf + n_dec
    tp_steps = (n_pf if m_pf == "tp" else 0.0) + (n_dec if m_dec == "tp" else 0.0)
    pf_ms = n_pf * _layer_ms(model, c, pf, m_pf)
    dec_ms = n_dec * _layer_ms(model, c, dec, m_dec)
    share = pf_ms / (pf_ms + dec_ms) if pf_ms + dec_ms > 0 else 0.0
    return Costed(c, prob, cross, thr, b_max, b_op, (n_pf, n_dec), tp_steps / steps if steps else 0.0, share)


def pinned_stages(spec: Spec, layers: int) -> tuple[tuple[int, int], ...] | None:
    """``search.stages`` checked: contiguous inclusive ranges covering layers 0..layers-1."""
    if not spec.search.stages:
        return None
    st = tuple((int(a), int(b)) for a, b in spec.search.stages)
    expect = 0
    for i, (a, b) in enumerate(st):
        if a != expect or b < a:
            raise UserError(f"search.stages[{i}] = [{a}, {b}]: stages must be contiguous, non-empty ranges "
                            f"starting at layer {expect}")
        expect = b + 1
    if expect != layers:
        raise UserError(f"search.stages cover layers 0-{expect - 1}, but the model has {layers} decoder layers "
                        f"(0-{layers - 1})")
    return st


def _operating_batch(model: Model, c: Candidate, mix: TokenMix, b_max: int, mode: Callable[[int], str]) -> int:
    """Decode batch at the spec's rate: Little's law, concurrency = rate/dp * O * TPOT (fixed point)."""
    b = 1
    for _ in range(4):
        tpot = model.cost.layers_time(0, model.graph.info.layers - 1, mix.decode_step(b), tp=c.tp, sp=c.sp,
                                      mode=mode(b)).total_ms
        b = max(1, min(b_max, int(math.ceil(mix.rate / c.dp * mix.output_mean * tpot / 1000.0))))
    return b


def _p2p_total(model: Model, c: Candidate, tokens: float) -> float:
    """Activation sends between consecutive stages of replica 0 (T/sp x hidden x act bytes)."""
    cm = model.cost
    nbytes = tokens / c.sp * model.graph.info.hidden * cm.rates.a_bytes
    P, g = c.shift_degree, cm.gpus_per_node
    total = 0.0
    for i in range(c.pp - 1):
        inter = ((i + 1) * P - 1) // g != ((i + 1) * P) // g
        total += cm.p2p_ms(nbytes, inter_node=inter)
    return total


def _vision_option(placement: str, model: Model, c: Candidate, mix: TokenMix, facts: ModelFacts) -> VisionOption | None:
    """What one encoder placement adds per request (images_mean images of patches_mean patches)."""
    cm = model.cost
    P = c.shift_degree
    p = max(1, int(round(mix.patches_mean))) if mix.patches_mean else 0
    m = mix.images_mean
    own = [p] * max(1, int(round(m))) if p else []

    def per_image(tp: int, dp: int) -> float:
        return cm.vision_time([p] * VISION_BATCH, tp=tp, dp=dp).total_ms / VISION_BATCH if p else 0.0

    def request(tp: int, dp: int) -> float:
        return cm.vision_time(own, tp=tp, dp=dp).total_ms if own else 0.0

    if placement == "stage0_tp":
        return VisionOption(placement, stage0_thr=m * per_image(P, 1), stage0_mem=facts.vision_gb / P,
                            ttft=request(P, 1))
    if placement == "stage0_dp":
        return VisionOption(placement, stage0_thr=m * per_image(1, P), stage0_mem=facts.vision_gb, ttft=request(1, P))
    if placement == "all_dp":
        D = P * c.pp
        return VisionOption(placement, every_thr=m * per_image(1, D), every_mem=facts.vision_gb, ttft=request(1, D))
    if placement == "dedicated":
        k = c.dedicated_gpus
        send = cm.p2p_ms(m * mix.image_tokens_mean * model.graph.info.hidden * cm.rates.a_bytes, inter_node=False)
        return VisionOption(placement, separate_thr=m * per_image(1, k), ttft=request(1, k) + send)
    return None


# ------------------------------------------------------------------ stage 5b: dominance pruning


@dataclass(frozen=True)
class Bounds:
    """What a candidate can reach at best (any split, any placement) and what its uniform split
    surely reaches (when feasible); used to drop dominated candidates before the ILP."""

    gpus: int
    best: tuple[float, float, float, float]  # (z/dp lower bound, TTFT, TPOT, -decode batch)
    sure: tuple[float, float, float, float] | None  # the same of a feasible uniform split


def bounds(x: Costed) -> Bounds:
    p, c = x.problem, x.cand
    S = p.stages
    opts = list(p.vision) or [None]
    lbs, lats = [], []
    for o in opts:
        total = sum(l.thr for l in p.layers) + p.first.thr + p.last.thr
        if o is not None:
            total += o.stage0_thr + S * o.every_thr
        lb = max(total / S, o.separate_thr if o is not None else 0.0)
        lbs.append(lb)
        lats.append(latency(p, S, o))
    best = (min(lbs) / c.dp, min(t for t, _ in lats), min(t for _, t in lats), -x.decode_batch)
    sure = None
    split = p.pinned or uniform_split(len(p.layers), S)
    for o in opts:
        ev = evaluate(p, split, o.placement if o else None)
        if ev.feasible:
            v = (ev.bottleneck_ms / c.dp, ev.ttft_ms, ev.tpot_ms, -x.decode_batch)
            sure = v if sure is None or v < sure else sure
    return Bounds(c.gpus, best, sure)


def prune_dominated(costed: list[Costed]) -> tuple[list[Costed], int]:
    """Drop X when some Y with no more GPUs surely does at least as well on every metric as X
    can at best (strictly better on one): X cannot win any objective."""
    bs = [bounds(x) for x in costed]
    keep = []
    for i, (x, bx) in enumerate(zip(costed, bs)):
        dominated = False
        for j, by in enumerate(bs):
            if i == j or by.sure is None or by.gpus > bx.gpus:
                continue
            if all(a <= b for a, b in zip(by.sure, bx.best)) and (by.sure != bx.best or j < i):
                dominated = True
                break
        if not dominated:
            keep.append(x)
    return keep, len(costed) - len(keep)


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
    "max_throughput": "meets the SLOs, then goodput (in 5% steps of the arrival rate), then goodput at 2x "
                      "the arrival rate, then capacity",
    "min_latency": "meets the SLOs, then goodput, then TTFT + output tokens x TPOT",
    "balanced": "meets the SLOs, then goodput, then end-to-end latency (s) + utilisation (rate / capacity)",
    "min_gpus": "meets the SLOs, then fewest GPUs, then capacity",
}


def _key(spec: Spec, meets: bool, cap: float, ttft: float, tpot: float, mix: TokenMix, gpus: int,
         goodput: float) -> tuple:
    lat = ttft + mix.output_mean * tpot
    # goodput in 5% bins of the arrival rate: differences below that are simulation noise
    good = math.floor(goodput / mix.rate * GOODPUT_BINS + 1e-9) / GOODPUT_BINS
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
    from costmodels.workload import from_spec

    return from_spec(spec, model.graph.info).with_requests(min(spec.workload.requests, SIM_REQUESTS))


def simulate_score(sc: Scored, plan: Any, model: Model, spec: Spec, mix: TokenMix, wl: Any, coster: Any) -> Scored:
    """Re-score a shortlisted candidate with the serving simulator on the spec's workload ``wl``
    (same seed): TTFT/TPOT percentiles, goodput, SLOs."""
    from costmodels.simulator import simulate

    r = simulate(plan, model.cost, wl, slo=spec.slo, seed=spec.workload.seed, coster=coster)
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

    hi = simulate(plan, model.cost, wl.with_rate(wl.rate * HEADROOM), slo=spec.slo, seed=spec.workload.seed,
                  coster=coster)
    good_hi = math.floor(hi.goodput_rps / (wl.rate * HEADROOM) * GOODPUT_BINS + 1e-9) / GOODPUT_BINS
    return replace(sc, key=sc.key[:2] + (-good_hi,) + sc.key[2:], headroom_goodput_rps=hi.goodput_rps)


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


# ------------------------------------------------------------------ stage 8: the plan


def stage_thresholds(model: Model, s: Solved, mix: TokenMix) -> list[Crossover | None]:
    """Per-stage crossover over the stage's own blocks (embedding / lm_head included)."""
    c, e = s.cand, s.solution.best
    if c.sp < 2 or e is None:
        return [None] * c.pp
    out = []
    for i, (a, b) in enumerate(e.stages):
        def t(tokens: int, mode: str, a: int = a, b: int = b, i: int = i) -> float:
            def f(sh: StepShape) -> float:
                ms = model.cost.layers_time(a, b, sh, tp=c.tp, sp=c.sp, mode=mode).total_ms
                if i == 0:
                    ms += _blocks_ms(model, c, ("embedding",), sh, mode)
                if i == c.pp - 1:
                    ms += _blocks_ms(model, c, ("final_norm", "lm_head"), sh, mode)
                return ms
            return mixed_ms(f, *mix.step_of(tokens, mix.max_seqs))
        out.append(crossover(lambda n: t(n, "sp_tp"), lambda n: t(n, "tp"), mix.max_batch_tokens))
    return out


def build_plan(sc: Scored, spec: Spec, model: Model, mix: TokenMix, runners: list[Scored] | None = None,
               notes: list[str] | None = None) -> Any:
    from planner import __version__
    from plans.schema import (CurvePoint, Hardware, MemoryPerGPU, Mesh, ModelRef, Plan, Provenance, RunnerUp,
                              Scheduler, Shift, Stage, Vision)

    s = sc.solved
    c, e = s.cand, s.solution.best
    assert e is not None
    cm, info = model.cost, model.graph.info
    has_vision = model.has_vision
    crosses = stage_thresholds(model, s, mix)
    pf = mix.prefill_step()
    stages = []
    for i, (a, b) in enumerate(e.stages):
        ms = cm.layers_time(a, b, pf, tp=c.tp, sp=c.sp, mode="sp_tp").total_ms
        st = Stage(index=i, first_layer=a, last_layer=b, embedding=i == 0, lm_head=i == c.pp - 1,
                   vision=has_vision and (e.vision in ("stage0_tp", "stage0_dp") and i == 0 or e.vision == "all_dp"),
                   step_ms=ms, shift_threshold_tokens=(spec.search.shift_threshold if spec.search.shift_threshold
                                                       is not None else crosses[i].threshold_tokens)
                   if crosses[i] else None)
        stages.append(st)
    mems = [model.memory(pp=1, tp=c.tp, sp=c.sp, stage_layers=(a, b), with_embedding=i == 0,
                      with_lm_head=i == c.pp - 1, with_vision=False, max_batch_tokens=mix.max_batch_tokens)
            for i, (a, b) in enumerate(e.stages)]
    vis_gb = [_vision_gb(e.vision, i, s.costed) for i in range(c.pp)]
    tokens = []
    for m, vg in zip(mems, vis_gb):
        free = m.kv_gb - vg
        tokens.append(int(max(free, 0.0) * 1e9 // m.kv_bytes_per_token) if m.kv_bytes_per_token else 0)
    worst = min(range(c.pp), key=lambda i: tokens[i])
    mw = mems[worst]
    kv_gb = tokens[worst] * mw.kv_bytes_per_token / 1e9
    memory = MemoryPerGPU(weights=mw.weights_gb + vis_gb[worst], shift_copy=mw.shift_copy_gb, kv=kv_gb,
                          activations=mw.activations_gb,
                          total=mw.weights_gb + vis_gb[worst] + mw.shift_copy_gb + mw.activations_gb + kv_gb,
                          capacity=mw.capacity_gb, kv_tokens=tokens[worst])
    # the plan's threshold: stage 0's own crossover (each stage records its own), unless pinned
    pinned = spec.search.shift_threshold
    thr = None if c.sp < 2 else (pinned if pinned is not None else crosses[0].threshold_tokens)
    curve = crosses[0].curve if crosses[0] else ()
    shift = Shift(enabled=c.sp > 1, threshold_tokens=thr,
                  curves=[CurvePoint(tokens=t, sp_tp_ms=a, tp_ms=b) for t, a, b in curve])
    m = spec.model
    plan = Plan(
        name=spec.name,
        provenance=Provenance(spec_sha256=spec.sha256, model_config_sha256=model.config_sha256,
                              cost_profile=cm.profile_id, shiftplan_version=__version__),
        model=ModelRef(name=model.name, preset=m.preset, config=m.config, architecture=info.architecture,
                       weights_dtype=m.weights_dtype, kv_dtype=m.kv_dtype, num_layers=info.layers,
                       vision_blocks=len([b for b in model.graph.blocks if b.kind == "vision_block"])),
        hardware=Hardware(gpu=cm.gpu.name, gpus_per_node=spec.hardware.gpus_per_node, nodes=spec.hardware.nodes),
        objective=spec.objective,
        mesh=Mesh(dp=c.dp, pp=c.pp, tp=c.tp, sp=c.sp),
        stages=stages,
        vision=Vision(placement=e.vision or "none", dedicated_gpus=c.dedicated_gpus if e.vision == "dedicated" else 0),
        shift=shift,
        memory_gb=memory,
        scheduler=Scheduler(max_batch_tokens=mix.max_batch_tokens, max_seqs=mix.max_seqs, microbatches=c.pp),
        backend=spec.runtime.backend,
        predicted=sc.predicted,
        runners_up=[RunnerUp(mesh=r.solved.cand.label, vision=r.solved.solution.best.vision or "none",
                             score=r.capacity_rps, reason=why_lost(r, sc, spec)) for r in (runners or [])],
        notes=list(notes or []),
    )
    return plan.check()


def _vision_gb(placement: str | None, stage: int, x: Costed) -> float:
    """Encoder weights per GPU on ``stage`` under ``placement`` (0 for dedicated GPUs)."""
    opt = next((v for v in x.problem.vision if v.placement == placement), None)
    if opt is None:
        return 0.0
    return opt.every_mem + (opt.stage0_mem if stage == 0 else 0.0)


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


# ------------------------------------------------------------------ the whole pipeline


@dataclass
class CompileResult:
    plan: Any  # plans.schema.Plan
    candidates: int
    rejected: int
    solved: int
    infeasible: int
    simulated: int
    notes: list[str] = field(default_factory=list)
    pruned: int = 0  # dominated candidates dropped before the ILP
    problem: StageProblem | None = None  # the chosen mesh's ILP input (``planner.ilp.lp_text`` shows it)


def compile_spec(spec: Spec, progress: Progress | None = None) -> CompileResult:
    """Every stage above in order; raises UserError (with the binding arithmetic) when no
    candidate is feasible."""
    from planner.infeasible import explain

    say = progress or (lambda _msg: None)
    say("tracing the model (cached)")
    model = build_model(spec)
    say("reading the workload")
    mix = token_mix(spec, model)
    say("enumerating candidate meshes")
    cset, facts, space = candidate_set(spec, model, mix)
    if not cset.candidates:
        raise explain(spec, facts, space, cset, [])
    say(f"costing {len(cset.candidates)} candidates")
    costed = [cost_candidate(c, model, mix, spec, facts, space) for c in cset.candidates]
    costed, pruned = prune_dominated(costed)
    say(f"solving {len(costed)} ILPs ({pruned} dominated candidates dropped)")
    solved = [solve_candidate(x) for x in costed]
    ok = [s for s in solved if s.ok]
    if not ok:
        raise explain(spec, facts, space, cset, solved)
    scored = sorted((static_score(s, spec, mix) for s in ok), key=lambda x: (x.key, x.label))
    notes = []
    if model.cost.roofline:
        notes.append(f"no calibration profile for {model.cost.gpu.name}: costs are datasheet rooflines")
    simulated = 0
    if simulator_available():
        short = shortlist(scored, mix)
        say(f"simulating the shortlist ({len(short)} plans)")
        short_plans = [build_plan(x, spec, model, mix) for x in short]
        wl = shortlist_workload(spec, model)
        costers = [plan_coster(p, model) for p in short_plans]
        resim = [simulate_score(x, p, model, spec, mix, wl, c) for x, p, c in zip(short, short_plans, costers)]
        if spec.objective == "max_throughput":
            resim = with_headroom(resim, short_plans, model, spec, wl, costers)
        simulated = len(resim)
        scored = sorted(resim, key=lambda x: (x.key, x.label)) + [x for x in scored if x not in short]
    else:
        notes.append("predicted metrics are static estimates (unloaded TTFT, TPOT at the operating batch)")
    best, runners = scored[0], scored[1:1 + 4]
    notes.append(f"chosen for {spec.objective} among {len(ok)} feasible meshes ({simulated} simulated on "
                 f"{min(spec.workload.requests, SIM_REQUESTS)} requests of the workload): {RANKING[spec.objective]}")
    say("writing the plan")
    plan = build_plan(best, spec, model, mix, runners, notes)
    return CompileResult(plan, len(cset.candidates), len(cset.rejected), len(ok), len(solved) - len(ok), simulated,
                         notes, pruned, best.solved.costed.problem)
