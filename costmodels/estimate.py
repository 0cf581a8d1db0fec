"""What-if estimate of one fixed mesh serving a static batch (``plan estimate``).

Per data-parallel replica the batch is b = ceil(B / dp) requests of ``isl`` prompt and
``osl`` output tokens. With pp > 1 the batch runs as m = min(pp, b) micro-batches of
b_m = ceil(b / m) requests so every stage has work:

* TTFT = latency(prefill of b_m prompts) + (m - 1) * bottleneck stage(prefill of b_m)
* TPOT = max(latency(decode step of b_m), m * bottleneck stage(decode of b_m)), the decode
  step at the mean context isl + osl/2
* output tok/s = dp * b * osl / (TTFT + (osl - 1) * TPOT); combined counts isl + osl.

With sp > 1 each step runs in the faster of SP x TP and shifted TP (what shift parallelism's
threshold picks); the crossover token count is reported. Memory is the tightest stage's;
the largest batch = dp * floor(KV tokens per replica / (isl + osl)).

Impossible meshes raise ``UserError`` with the arithmetic (heads not divisible by sp*tp,
KV heads that neither divide nor are divided by sp*tp, more stages than layers, more GPUs
than the hardware has, weights that do not fit).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from costmodels.memory import USABLE_FRACTION
from costmodels.model import CostModel, StepCost
from graph.opgraph import StepShape
from plans.errors import UserError
from plans.mesh import heads_problem


@dataclass
class Estimate:
    ttft_ms: float
    tpot_ms: float
    output_tok_s: float
    combined_tok_s: float
    memory_gb: dict[str, float]
    max_batch: int
    shift_crossover_tokens: int | None
    profile: str
    roofline: bool
    mesh: dict[str, int]
    batch: int
    isl: int
    osl: int
    modes: dict[str, str] = field(default_factory=dict)  # step -> mode used
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("ttft_ms", "tpot_ms", "output_tok_s", "combined_tok_s"):
            d[k] = round(d[k], 4)
        d["memory_gb"] = {k: round(v, 3) for k, v in d["memory_gb"].items()}
        return d


def check_mesh(cm: CostModel, *, tp: int, pp: int, sp: int, dp: int, world: int | None = None,
               gpus_per_node: int | None = None) -> list[str]:
    """Raise UserError for an impossible mesh; return notes for a legal but unusual one."""
    info = cm.info
    for name, v in (("tp", tp), ("pp", pp), ("sp", sp), ("dp", dp)):
        if v < 1:
            raise UserError(f"--{name} must be >= 1 (got {v})")
    P = tp * sp
    why = heads_problem(info.heads, info.kv_heads, tp, sp)
    if why:
        raise UserError(why)
    if pp > info.layers:
        raise UserError(f"pp={pp} stages but the model has {info.layers} decoder layers")
    notes = []
    n = tp * pp * sp * dp
    if world is not None and n > world:
        raise UserError(f"mesh needs dp*pp*tp*sp = {dp}*{pp}*{tp}*{sp} = {n} GPUs; the hardware has {world}")
    if gpus_per_node is not None and P > gpus_per_node:
        notes.append(f"sp*tp={P} spans nodes ({gpus_per_node} GPUs per node): collectives use the inter-node link")
    if P > info.kv_heads:
        notes.append(f"{info.kv_heads} KV heads < sp*tp={P}: KV heads replicated, {P // info.kv_heads} copies each")
    return notes


def _best(cm: CostModel, shape: StepShape, *, pp: int, tp: int, sp: int, stages) -> tuple[StepCost, str]:
    a = cm.step_time(shape, pp=pp, tp=tp, sp=sp, mode="sp_tp", stages=stages)
    if sp == 1:
        return a, "tp"
    b = cm.step_time(shape, pp=pp, tp=tp, sp=sp, mode="tp", stages=stages)
    return (a, "sp_tp") if a.total_ms <= b.total_ms else (b, "tp")


def estimate(cm: CostModel, *, tp: int, pp: int, sp: int = 1, dp: int = 1, batch: int, isl: int, osl: int,
             max_batch_tokens: int = 8192, world: int | None = None, gpus_per_node: int | None = None,
             images: int = 0, image_tokens: int = 0) -> Estimate:
    """TTFT, TPOT, throughput, memory and the largest batch of a fixed mesh and static batch.

    ``images`` per request of ``image_tokens`` LLM tokens each (part of ``isl``) run through
    the vision tower on the first stage's GPUs (TP over its tp*sp GPUs) before the prefill:
    their encoder time (patches = merge^2 * image_tokens) adds to TTFT."""
    if batch < 1 or isl < 1 or osl < 1:
        raise UserError(f"--batch, --isl and --osl must be >= 1 (got {batch}, {isl}, {osl})")
    if images < 0 or image_tokens < 0 or images * image_tokens > isl:
        raise UserError(f"--images x --image-tokens = {images} x {image_tokens} = {images * image_tokens} "
                        f"must be >= 0 and at most --isl {isl} (image tokens are part of the prompt)")
    ctx = int(cm.info.max_context or 0)
    if ctx and isl + osl > ctx:
        raise UserError(f"--isl {isl} + --osl {osl} = {isl + osl} tokens per request is beyond the model's context "
                        f"of {ctx} tokens")
    if batch > 1_000_000:
        raise UserError(f"--batch {batch:,}: at most 1,000,000 requests in flight")
    if (images > 0) != (image_tokens > 0):
        raise UserError(f"--images {images} and --image-tokens {image_tokens}: give both (images per request and LLM "
                        "tokens per image) or neither")
    vision = images > 0 and image_tokens > 0
    if vision and not cm.info.vision:
        raise UserError(f"{cm.info.architecture} has no vision tower; drop --images")
    notes = check_mesh(cm, tp=tp, pp=pp, sp=sp, dp=dp, world=world, gpus_per_node=gpus_per_node)
    mem = cm.memory(pp=pp, tp=tp, sp=sp, dp=dp, max_batch_tokens=max_batch_tokens, with_vision=vision)
    usable = mem.capacity_gb * USABLE_FRACTION
    fixed = mem.weights_gb + mem.shift_copy_gb
    if fixed + mem.activations_gb > usable:
        shift = f" + {mem.shift_copy_gb:.1f} GB shift copy" if mem.shift_copy_gb else ""
        raise UserError(f"weights need {mem.weights_gb:.1f} GB{shift} per GPU at tp={tp}, pp={pp}"
                        f"{f', sp={sp}' if sp > 1 else ''}, plus {mem.activations_gb:.1f} GB activations; "
                        f"{cm.gpu.name.upper()} has {mem.capacity_gb:.0f} GB ({USABLE_FRACTION:.0%} usable = {usable:.1f} GB)")
    if cm.roofline:
        notes.append(f"no calibration profile for {cm.gpu.name}: datasheet roofline ({cm.profile_id})")
    elif cm.fp8_gemm_source == "bf16 table at the fp8 peak":
        notes.append(f"FP8 GEMM efficiency not measured on the {cm.gpu.name.upper()}: the bf16 table at the FP8 peak")
    b = math.ceil(batch / dp)
    m = min(pp, b)
    bm = math.ceil(b / m)
    stages = None
    pre, pre_mode = _best(cm, StepShape.prefill([isl] * bm), pp=pp, tp=tp, sp=sp, stages=stages)
    ctx = isl + osl // 2
    dec, dec_mode = _best(cm, StepShape.decode([ctx] * bm), pp=pp, tp=tp, sp=sp, stages=stages)
    ttft = pre.total_ms + (m - 1) * pre.bottleneck_ms
    if vision:
        merge = int(cm.info.vision.get("spatial_merge_size", 2)) ** 2
        ttft += cm.vision_time([image_tokens * merge] * (images * bm), tp=tp * sp).total_ms
    tpot = max(dec.total_ms, m * dec.bottleneck_ms)
    total_ms = ttft + (osl - 1) * tpot
    out_tok_s = dp * b * osl / total_ms * 1e3
    comb_tok_s = dp * b * (isl + osl) / total_ms * 1e3
    per_req = isl + osl
    max_batch = dp * (mem.kv_tokens // per_req)
    if b * per_req > mem.kv_tokens:
        notes.append(f"batch {batch} does not fit: {b} requests x {per_req} tokens = {b * per_req} KV tokens per "
                     f"replica > capacity {mem.kv_tokens} (largest batch {max_batch})")
    cross = cm.shift_crossover(tp=tp, sp=sp, pp=pp)[0] if sp > 1 else None
    return Estimate(ttft_ms=ttft, tpot_ms=tpot, output_tok_s=out_tok_s, combined_tok_s=comb_tok_s,
                    memory_gb={"weights": mem.weights_gb, "shift_copy": mem.shift_copy_gb, "kv": mem.kv_gb,
                               "activations": mem.activations_gb, "total": mem.total_gb,
                               "capacity": mem.capacity_gb},
                    max_batch=max_batch, shift_crossover_tokens=cross, profile=cm.profile_id, roofline=cm.roofline,
                    mesh={"dp": dp, "pp": pp, "tp": tp, "sp": sp}, batch=batch, isl=isl, osl=osl,
                    modes={"prefill": pre_mode, "decode": dec_mode}, notes=notes)
