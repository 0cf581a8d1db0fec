"""Stages 4-5b of the compile pipeline: candidate meshes, their costs, dominance pruning.

Stage 4 reads the model's sizes from the cost model's memory arithmetic (``ModelFacts``) and the
spec's search limits (``SearchSpace``) and enumerates the candidate meshes
(``planner.candidates``: rules plus a memory bound).

Stage 5 costs every block of a candidate as an ``ilp.StageProblem``. Costs per request (the
ILP's throughput term) come from the workload's mix: a request of mean prompt length P and mean
output O costs ``P / T_pf`` prefill steps of ``T_pf = max_batch_tokens`` tokens and ``O / b``
decode steps of a batch of ``b`` sequences (``b`` limited by ``max_seqs`` and by the KV
capacity), each step in the mode the shift threshold picks for its token count.

SLOs enter the ILP as hard bounds on what no load can improve: the unloaded TTFT (a request's
prefill through every stage, plus its images' encoder time) and the TPOT of a decode step at the
operating batch (Little's law at the spec's rate); a spec that misses them on every mesh is
infeasible and ``planner.infeasible`` says which bound binds.

Stage 5b drops a candidate when another with no more GPUs surely does at least as well (its
uniform split, when feasible) on every metric as the first can at best (any split, any
placement): such a candidate cannot win any objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from graph.opgraph import StepShape
from planner.candidates import (Candidate, CandidateSet, ModelFacts, SearchSpace, enumerate_candidates,
                                vision_gb_per_gpu)
from planner.ilp import ItemCost, StageProblem, VisionOption, evaluate, latency, objective_weights
from planner.inputs import Model, TokenMix, mixed_ms
from planner.spec import Spec
from planner.threshold import Crossover, crossover
from plans.errors import UserError
from plans.mesh import ENCODER_PLACEMENTS, ParallelDims, even_layers

VISION_BATCH = 8  # images per encoder batch when amortising encoder time per request
UTIL_TARGET = 0.8  # min_gpus: the bottleneck may be busy at most this share of the time at the arrival rate


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
        placements=tuple(s.vision_placement) if s.vision_placement else ENCODER_PLACEMENTS,
        dedicated_gpus=tup(s.dedicated_vision_gpus),
    )


def engine_limits(space: SearchSpace, spec: Spec, model: Model, mix: TokenMix) -> SearchSpace:
    """``space`` keeping only the meshes and encoder placements ``spec.engine`` runs (all for shiftplan);
    the rules are ``planner.export.engines``', the ones ``plan export`` applies."""
    if spec.engine == "shiftplan":
        return space
    from planner.export.engines import PLACEMENTS, mesh_limit, placement_limit

    arch = model.graph.info.architecture
    if space.sp is not None and 1 not in space.sp:  # a pinned SP degree the engine cannot run: say so up front
        why = [w for sp in space.sp if (w := mesh_limit(spec.engine, 1, 1, sp, arch, mix.max_seqs))]
        if len(why) == len(space.sp):
            raise UserError(f"{spec.name}: search.sp = {list(space.sp)} but engine: {spec.engine}: {why[0]}")
    placements = tuple(p for p in space.placements if p in PLACEMENTS[spec.engine])
    if model.has_vision and not placements:
        raise UserError(f"{spec.name}: search.vision_placement = {list(space.placements)} but engine: {spec.engine}: "
                        f"{placement_limit(spec.engine, space.placements[0])}")
    return replace(space, placements=placements,
                   engine_check=lambda dp, pp, tp, sp: mesh_limit(spec.engine, pp, tp, sp, arch, mix.max_seqs))


def candidate_set(spec: Spec, model: Model, mix: TokenMix) -> tuple[CandidateSet, ModelFacts, SearchSpace]:
    facts = model_facts(spec, model)
    space = engine_limits(search_space(spec, model, mix), spec, model, mix)
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
    """GPU time of one decoder layer."""
    return model.cost.layers_time(layer, layer, shape, tp=c.tp, sp=c.sp, mode=mode).total_ms


def _wall(model: Model, c: Candidate, gpu_ms: float, layers: int, tokens: float, mode: str) -> float:
    """``gpu_ms`` of ``layers`` decoder layers with the host side of a step the engine launches
    eagerly (``CostModel.stage_wall_ms``); per layer, max(h, g) sums to a stage's max(n h, n g)."""
    return model.cost.stage_wall_ms(gpu_ms, layers, tokens, sp=c.sp, mode=mode)


def _layer_wall_ms(model: Model, c: Candidate, shape: StepShape, mode: str, layer: int = 0) -> float:
    return _wall(model, c, _layer_ms(model, c, shape, mode, layer), 1, shape.tokens, mode)


def blocks_ms(model: Model, c: Candidate, kinds: tuple[str, ...], shape: StepShape, mode: str) -> float:
    blocks = [b for b in model.graph.blocks if b.tower == "text" and b.kind in kinds]
    return model.cost.blocks_time(blocks, shape, tp=c.tp, sp=c.sp, mode=mode).total_ms


def layer_crossover(model: Model, c: Candidate, mix: TokenMix, batch: int) -> Crossover | None:
    """Crossover of one decoder layer's step time, SP x TP vs TP(tp*sp), on the mix's steps: a step
    of T tokens holds min(T, batch) decodes at the mean context and the rest as one prefill chunk
    (batch = the scheduler's max_seqs, so candidates of equal tp, sp share the cost model's memo)."""
    if c.sp < 2:
        return None
    def ms(tokens: int, mode: str) -> float:
        gpu = mixed_ms(lambda sh: _layer_ms(model, c, sh, mode), *mix.step_of(tokens, batch))
        return _wall(model, c, gpu, 1, tokens, mode)

    return crossover(lambda t: ms(t, "sp_tp"), lambda t: ms(t, "tp"), mix.max_batch_tokens)


def cost_candidate(c: Candidate, model: Model, mix: TokenMix, spec: Spec, facts: ModelFacts,
                   space: SearchSpace) -> Costed:
    """Cost vectors of every block of a candidate (see the module doc) as a StageProblem."""
    cm, info = model.cost, model.graph.info
    L = info.layers
    uni = even_layers(L, c.pp)
    kv_tok = min(model.memory(pp=1, tp=c.tp, sp=c.sp, stage_layers=st, with_embedding=i == 0,
                           with_lm_head=i == c.pp - 1, max_batch_tokens=mix.max_batch_tokens).kv_tokens
                 for i, st in enumerate(uni))
    b_max = max(1, min(mix.max_seqs, int(kv_tok // max(1.0, mix.context_mean))))
    cross = layer_crossover(model, c, mix, mix.max_seqs)
    pinned = spec.search.shift_threshold
    thr = None if c.sp < 2 else (pinned if pinned is not None else cross.threshold_tokens)
    mode = ParallelDims(tp=c.tp, sp=c.sp, shift=thr is not None, threshold=thr).mode_for

    pf, ttft_shape = mix.prefill_step(), mix.ttft_step()
    n_pf = mix.prompt_mean / pf.tokens
    dec = mix.decode_step(b_max)
    n_dec = mix.output_mean / b_max
    b_op = _operating_batch(model, c, mix, b_max, mode)
    dec_op = mix.decode_step(b_op)
    m_pf, m_dec, m_tt, m_op = mode(int(pf.tokens)), mode(b_max), mode(int(ttft_shape.tokens)), mode(b_op)

    def item(kinds: tuple[str, ...] | None, layer: int = 0) -> ItemCost:
        f = (lambda s, m: _layer_wall_ms(model, c, s, m, layer)) if kinds is None else \
            (lambda s, m: blocks_ms(model, c, kinds, s, m))
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
    pf_ms = n_pf * _layer_wall_ms(model, c, pf, m_pf)
    dec_ms = n_dec * _layer_wall_ms(model, c, dec, m_dec)
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
        L = model.graph.info.layers
        tpot = _wall(model, c, model.cost.layers_time(0, L - 1, mix.decode_step(b), tp=c.tp, sp=c.sp,
                                                      mode=mode(b)).total_ms, L, b, mode(b))
        b = max(1, min(b_max, int(math.ceil(mix.rate / c.dp * mix.output_mean * tpot / 1000.0))))
    return b


def _p2p_total(model: Model, c: Candidate, tokens: float) -> float:
    """Hops between consecutive stages of replica 0: activation sends (T/sp x hidden x act bytes)
    plus the engine's handoff per boundary (``CostModel.hop_ms``)."""
    cm = model.cost
    nbytes = tokens / c.sp * model.graph.info.hidden * cm.rates.a_bytes
    dims = ParallelDims(pp=c.pp, tp=c.tp, sp=c.sp, gpus_per_node=cm.gpus_per_node)
    return sum(cm.hop_ms(nbytes, inter_node=dims.crosses_nodes(i)) for i in range(c.pp - 1))


def _vision_option(placement: str, model: Model, c: Candidate, mix: TokenMix, facts: ModelFacts) -> VisionOption | None:
    """What one encoder placement adds per request (images_mean images of patches_mean patches)."""
    cm = model.cost
    p = max(1, int(round(mix.patches_mean))) if mix.patches_mean else 0
    m = mix.images_mean
    own = [p] * max(1, int(round(m))) if p else []

    def per_image(tp: int, dp: int) -> float:
        return cm.vision_time([p] * VISION_BATCH, tp=tp, dp=dp).total_ms / VISION_BATCH if p else 0.0

    def request(tp: int, dp: int) -> float:
        return cm.vision_time(own, tp=tp, dp=dp).total_ms if own else 0.0

    enc = ParallelDims(pp=c.pp, tp=c.tp, sp=c.sp, placement=placement, dedicated_gpus=c.dedicated_gpus,
                       vision=True).encoder()  # where the tower runs, as dp replicas of tp GPUs
    thr, mem = m * per_image(enc.tp, enc.dp), vision_gb_per_gpu(facts, c, placement)
    if placement == "dedicated":
        send = cm.p2p_ms(m * mix.image_tokens_mean * model.graph.info.hidden * cm.rates.a_bytes, inter_node=False)
        return VisionOption(placement, separate_thr=thr, ttft=request(enc.tp, enc.dp) + send)
    if placement == "all_dp":  # every stage encodes its share
        return VisionOption(placement, every_thr=thr, every_mem=mem, ttft=request(enc.tp, enc.dp))
    return VisionOption(placement, stage0_thr=thr, stage0_mem=mem, ttft=request(enc.tp, enc.dp))


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
    split = p.pinned or even_layers(len(p.layers), S)
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
