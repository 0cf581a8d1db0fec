"""Stages 1-3 of the compile pipeline: the spec, the model on the spec's hardware, the workload's mix.

``build_model`` turns the spec's HF config into a traced (cached) ``OpGraph`` and a cost model;
``token_mix`` reduces the workload to its means, measured on a seeded sample of ``MIX_REQUESTS``
requests (synthetic or trace): mean prompt P (text + image tokens), mean output O, images and
patches per request, and the scheduler's limits ``max_batch_tokens`` and ``max_seqs``. From these
``TokenMix`` builds the reference steps the later stages cost: a full prefill step (prompts of
length P packed into ``max_batch_tokens``), an unloaded request's prefill, and a decode step of a
batch of sequences at the mean context ``P + O / 2``.

A step that holds decodes and a prefill chunk is costed with ``mixed_ms``: everything but
attention on the whole step, attention per part::

    t = f(d + p) - attn(d + p) + attn(d) + attn(p),   attn(x) = f(x) - f(x without pairs/KV)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from graph.opgraph import ModelInfo, OpGraph, StepShape
from planner.spec import Spec, load_spec
from plans.errors import UserError

if TYPE_CHECKING:
    from costmodels.model import CostModel
    from costmodels.workload import Workload

MIX_REQUESTS = 500  # requests sampled to measure the workload's means


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


def workload_of(spec: Spec, info: ModelInfo) -> Workload:
    """The workload of a spec (``costmodels.workload`` types); ``info`` is the model's ``ModelInfo``.

    A spec with ``workload.trace`` loads that trace (relative to the spec's folder), taking image
    resolutions from ``workload.images.resolution`` when given.
    """
    from costmodels.workload import Lengths, Workload, check_context, from_trace, image_caps, image_rule

    w = spec.workload
    rule = image_rule(info)
    if w.trace is not None:
        res = tuple(tuple(r) for r in w.images.resolution) if w.images else None
        wl = from_trace(spec.resolve(w.trace), info=info, resolutions=res, seed=w.seed)
        return replace(wl, name=spec.name, requests=min(len(wl.trace), w.requests))
    counts, weights, resolutions = (0,), (1.0,), ()
    if w.images is not None and any(c > 0 for c in w.images.per_request):
        if rule is None:
            raise UserError(f"spec {spec.name}: workload.images asks for images but model "
                            f"{getattr(info, 'architecture', '?')} has no vision tower")
        counts = tuple(w.images.per_request)
        weights = tuple(w.images.weights) if w.images.weights else tuple(1.0 for _ in counts)
        resolutions = tuple(tuple(r) for r in w.images.resolution)
    notes = tuple(image_caps(rule, resolutions)) if resolutions else ()
    check_context(spec.name, info, w.input_tokens, w.output_tokens, counts, weights,
                  [rule.tokens(x, y)[0] for x, y in resolutions] if resolutions else [])
    return Workload(
        name=spec.name, rate=float(w.arrival_rate), requests=w.requests, burstiness=w.burstiness,
        input_tokens=Lengths(w.input_tokens.mean, w.input_tokens.cv, w.input_tokens.min, w.input_tokens.max),
        output_tokens=Lengths(w.output_tokens.mean, w.output_tokens.cv, w.output_tokens.min, w.output_tokens.max),
        image_counts=counts, image_weights=weights, resolutions=resolutions,
        rule=rule if resolutions else None, seed=w.seed, notes=notes,
    )


def cost_model_of(spec: Spec, *, use_profile: bool = True, graph: OpGraph | None = None) -> tuple[CostModel, OpGraph]:
    """(CostModel, OpGraph) of the spec's model on its hardware (``costmodels.build.cost_model_for``)."""
    from costmodels.build import cost_model_for
    from graph.hf_config import load_config

    m, hw = spec.model, spec.hardware
    cfg = load_config(m.preset, spec.resolve(m.config) if m.config else None)
    return cost_model_for(cfg, hw.gpu, weights_dtype=m.weights_dtype, kv_dtype=m.kv_dtype,
                          gpus_per_node=hw.gpus_per_node, use_profile=use_profile, graph=graph,
                          fused_elementwise=spec.runtime.backend != "eager", engine=spec.engine,
                          backend=spec.runtime.backend)


def build_model(spec: Spec, progress: Callable[[str], None] | None = None) -> Model:
    """HF config -> cached op graph -> cost model (``costmodels.build``: the committed calibration
    profile of the spec's GPU, the datasheet roofline for an inline GPU or one without a profile).
    ``progress`` hears whether the graph comes from the cache or is traced (seconds, imports torch)."""
    from costmodels.build import graph_for_config
    from graph.hf_config import config_sha256, load_config

    m = spec.model
    cfg = load_config(m.preset, spec.resolve(m.config) if m.config else None)
    if progress is not None:
        try:
            from graph.cache import cache_path

            cached = cache_path(cfg).is_file()
        except ImportError:
            cached = True
        progress("reading the cached op graph" if cached else
                 "tracing the model with torch.export (first time for this config; a few seconds)")
    graph = graph_for_config(cfg)
    cost, _ = cost_model_of(spec, graph=graph)
    name = m.preset or Path(m.config or "model").stem
    return Model(cfg, config_sha256(cfg), graph, cost, name)


def check_pins(spec: Spec, model: Model) -> None:
    """Search pins that cannot apply to this model are refused, not ignored (the spec alone
    checks the pins that contradict each other: ``planner.spec.SearchSection``)."""
    from plans.errors import UserError

    se = spec.search
    if not model.has_vision:
        what = [f"vision_placement {se.vision_placement}" if se.vision_placement else "",
                f"dedicated_vision_gpus {se.dedicated_vision_gpus}" if se.dedicated_vision_gpus else ""]
        what = [w for w in what if w]
        if what:
            raise UserError(f"spec {spec.name}: search pins {' and '.join(what)}, but {model.name} "
                            f"({model.graph.info.architecture}) has no vision encoder; drop the pin")
    layers = model.graph.info.layers
    if se.pp is not None and min(se.pp) > layers:
        raise UserError(f"spec {spec.name}: search.pp {se.pp} asks for more pipeline stages than the model's "
                        f"{layers} decoder layers")


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
    wl = workload_of(spec, model.graph.info).with_requests(min(spec.workload.requests, MIX_REQUESTS))
    reqs = wl.sample(spec.workload.seed)
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
