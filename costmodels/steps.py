"""Step-level terms of this repo's engine, measured on the GPU host: the host (CPU) time of an
eagerly launched step and the in-step cost of the Ulysses exchange. They live in the profile
(``Profile.steps``, each value with its source and derivation) and are fitted here from the
committed ``bench/results/shift_crossover.json`` (``fit_steps``), on any machine.

Host side. The engine (``executors``) replays plain-TP steps of at most
``plans.mesh.GRAPH_TOKEN_BUCKETS[-1]`` tokens as CUDA graphs (no host launches); every other step
(SP x TP, or larger) is launched from Python, op by op or region by region, and the
host needs ``h`` ms per decoder layer of the stage (Python, dynamo guards, launches). The host runs
ahead of the GPU asynchronously, so a stage's step of ``n`` layers whose GPU time is ``g`` takes

    wall = max(n * h, g)          (eager)        wall = g          (graphed)

``max``, not ``n h + g``: on 2 x H200 a TP2 step of 3,072 tokens runs eagerly in 46.0 ms with
a host time of ~41.5 ms and a modelled GPU time of 43.6 ms (the sum would be 85 ms).
``h`` per backend = the median SP2 step of 64-2,048 tokens (host-bound: GPU time 7-27 ms) / layers.

Ulysses exchange. An SP x TP layer moves its QKV (``T/sp x (h + 2g)/tp x d``) and attention
output (``T/sp x h/tp x d``) through the all-to-alls with layout copies around them
(``executors.parallelize.UlyssesCore``: pack, transpose, unpack). On 2 x H200 the measured SP2
steps of 3,072-16,384 tokens, both eager and compiled layers, exceed the modelled GPU time (all-to-alls
from the isolated eager table included) by 2.4-3.0 us per token, linear in T, while TP2 steps
are within 3-5% (compiled). The layout copies alone account for ~15% of it (~32 KB per token and
layer at copy bandwidth); the rest is not itemised. It is priced per byte exchanged:

    extra = c * B,   B = sum over layers of (QKV + output bytes per GPU),
    c = sum(extra_i * B_i) / sum(B_i^2)   (least squares through 0 over the GPU-bound steps)

Decode GEMV. The engine sends a product of at most ``GEMV_MAX_ROWS`` rows with bf16/fp16 weights
(and its bias, added in the kernel's epilogue) through its Triton GEMV (``executors/gemv.py``, ``MAX_M``), not cuBLAS; the profile's GEMM
table (cuBLAS, timed alone) prices such products at 1.1-3.6 TB/s (k_proj, gate_proj at M = 1), the
kernel in the engine's decode graph takes a fixed ``gemv_call_us`` per product (its ramp and tail:
the half-size products of a TP shard stream slower) plus the bytes at ``gemv_GBps``:

    t = gemv_call_us + (weight + activation bytes) / gemv_GBps

fitted through two per-kernel breakdowns of batch-1 decode graph replays (``graph_kernels``), the
decoder projections whole on one GPU (``B`` bf16 bytes, ``T_1``) and as TP shards of ``B / tp`` bytes
(``T_tp``): ``gemv_GBps = (B - B / tp) / (T_1 - T_tp)``, ``gemv_call_us = (T_1 - B / gemv_GBps) / n``
(``bench/results/engine_speed.json``, ``mesh_speed.fused_no_pdl.json``; the lm_head stays with cuBLAS
and the GEMM table). ``n`` counts products as the op graph lists them, ``PROJECTIONS_PER_LAYER`` a
layer (HF's q, k, v, o, gate, up, down), which the model prices one by one; the engine launches 4
(q/k/v and gate/up fused), so a modelled product's fixed time is 4/7 of a launch's.

Pipeline handoff. The engine has no look-ahead under PP: each step goes driver -> stage 0 ->
point-to-point -> stage 1 -> ... -> driver, and the next step is launched once the last stage's
tokens are back. Beyond the send itself a PP step pays, per stage boundary,

    handoff = (PP2 step - one GPU's step, same run) - modelled send (p2p table)

from a batch-1 decode of ``bench/results/mesh_speed.pp2.json`` (both meshes do the same GPU work;
the single GPU's look-ahead hides its host side). It is one boundary's measurement: that the cost
grows per boundary beyond PP2, rather than once per step, is assumed, not measured.

Small all-reduces. The engine sums a TP group's row-parallel terms of at most
``ONE_SHOT_MAX_BYTES`` through PyTorch symmetric memory on GPUs of one host
(``executors.parallel.OneShotAllReduce``): the one-shot kernel, or, for up to ``FUSED_MAX_ROWS``
rows of a decoder layer's sum without a bias, one kernel that also adds the residual and applies
the next RMSNorm (``executors/reduce_norm.py``). Inside a CUDA graph (``CostModel.graphed``: decode steps and, for
this engine, every step of at most ``graph_max_tokens`` tokens) it costs

    t = one_shot(S)                               (plain sum, S = rows x hidden x act bytes)
    t = fused(S),  add + RMSNorm: 0               (fused, rows <= FUSED_MAX_ROWS)

``one_shot`` and ``fused`` interpolated log-log in S (clamped below the smallest size) from the
per-call times of 64 calls captured in one CUDA graph (``bench/results/allreduce_latency.json``, a
group of 2 GPUs; other group sizes, eager steps and larger sums keep the NCCL tables). The fused
kernel of a layer's attention output absorbs the residual add and the post-attention norm after it;
that of its MLP output absorbs the add after it and the next layer's input norm, which the cost
model charges to the layer's own input norm (``fused_add_norm_ops``): per step that prices one
fused kernel for the last layer's plain sum + add and leaves the first layer's input norm out, a
few microseconds.

Ulysses all-to-all in a graph. On GPUs of one host the engine runs Ulysses' all-to-alls through
its LL kernel over symmetric memory (``executors/all_to_all.py``), which a CUDA graph can hold, so
SP x TP steps of at most ``graph_max_tokens`` tokens are graphed like plain TP's (``Launch.graphed``).
There an all-to-all of ``S`` bytes a GPU costs

    t = ll(S)       (interpolated log-log, clamped below; linear in S above the largest size)

from the per-call times of 64 calls in one CUDA graph (``bench/results/all_to_all_latency.json``,
groups of 2 GPUs; other group sizes, eager steps and groups across hosts keep the NCCL tables). A
profile without this table describes an engine that ran SP x TP steps eagerly.

Serving steps (``bench/results/fidelity_2gpu.steps.json.gz``: every step of a replayed workload,
traced on the engine). Two terms the op-level model does not see:

* the driver's host time before a step it could not form ahead (the first after an idle replica,
  or one whose requests arrived during a step that ended every running one), from the
  answer of the last step to the send of this one (scheduling, building the micro-batch):

      form = form_ms + form_prefill_ms x [the step holds prefill chunks] + form_ms_per_seq x sequences

  (least squares over the traced steps sent after their predecessor's answer), plus
  ``form_ms_per_kpatch`` per 1,000 patches of the images the step encodes (the median over the traced
  image steps, ``fit_form_ms_per_kpatch``); the simulator
  starts such a step that much after the last one ends (single-stage replicas: under PP the
  handoff term above holds the driver's side);
* a graphed mixed step (prefill chunks and decodes, at most ``graph_max_tokens`` tokens) takes
  ``mixed_step_ms`` more than the model prices it, on each stage, when it was not sent while the
  last step ran: the median of (measured - modelled) over the traced mixed steps sent after their
  predecessor's answer (``fit_mixed_step_ms``, on the trace of the engine before it formed mixed
  steps ahead). Not a layer's work: one such step replayed alone runs at 0.91-1.01 of the model
  without it (``bench/results/mixed_step_profile.md``); its GPU waits through the rank's host work
  before the replay (packing the graph's static inputs, launching the graph: about 0.8 ms a step on
  Llama-3.1-8B), and the residual grows with that host time (0.30 ms at 0.5-0.8 ms of it, 0.76 ms
  at 0.8-2 ms). Mixed steps the engine sends ahead show none of it (median -0.18 ms over 471), so
  the simulator charges it only to steps not sent ahead (``Coster.wait_ms``). Measured on one GPU,
  applied to each stage of any mesh as an assumption.

Engines: only ``shiftplan`` (this repo's executors) with ``eager`` or ``compile`` layers, the
backends the profile measured. ``tensorrt`` (TensorRT-LLM-style engines, the published-results
specs) captures every step, and vLLM / Arctic / SGLang were not measured here: no terms.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from costmodels.interp import LogGrid
from plans.engine_shapes import TARGET_PROGRAMS, graph_splits, keys_bucket, splits
from plans.mesh import GRAPH_TOKEN_BUCKETS

if TYPE_CHECKING:
    from costmodels.model import CostModel
    from costmodels.profile import Profile

GPU_BOUND = 1.15  # a step is GPU-bound when its modelled GPU time exceeds the host time by this factor
GEMV_MAX_ROWS = 1  # products of at most this many rows go to the engine's GEMV (executors.gemv.MAX_M)
PROJECTIONS_PER_LAYER = 7  # decoder products a layer as the op graph lists them: q, k, v, o, gate, up, down
ONE_SHOT_MAX_BYTES = 1 << 20  # all-reduces up to this size go through symmetric memory (executors.parallel)
FUSED_MAX_ROWS = 32  # sums of at most this many rows fuse the add and norm (executors.reduce_norm.MAX_ROWS)


@dataclass(frozen=True)
class SymmAllReduce:
    """The engine's symmetric-memory all-reduce inside a CUDA graph (module doc): ``one_shot`` and
    ``fused`` (all-reduce + residual add + RMSNorm) in us against the bytes summed, measured on
    groups of ``gpus`` GPUs."""

    gpus: int
    one_shot: LogGrid
    fused: LogGrid

    def ms(self, nbytes: float, n: int, rows: float, fused: bool) -> float | None:
        """Time of summing ``nbytes`` (``rows`` rows) over ``n`` GPUs of one host, fused with the add
        and norm when ``fused`` and ``rows <= FUSED_MAX_ROWS``; None where the engine uses NCCL
        (over ``ONE_SHOT_MAX_BYTES``) or nothing was measured (another group size)."""
        if n != self.gpus or nbytes > ONE_SHOT_MAX_BYTES:
            return None
        table = self.fused if fused and rows <= FUSED_MAX_ROWS else self.one_shot
        return table(nbytes) * 1e-3

    @staticmethod
    def of(value: dict[str, Any]) -> "SymmAllReduce":
        """From the profile's ``symm_all_reduce_us`` value (``fit_symm_all_reduce``)."""
        return SymmAllReduce(int(value["gpus"]), LogGrid([value["bytes"]], value["one_shot"], log_values=True),
                             LogGrid([value["bytes"]], value["fused_add_norm"], log_values=True))


@dataclass(frozen=True)
class SymmAllToAll:
    """The engine's LL all-to-all inside a CUDA graph (module doc): ``graph`` in us against the bytes
    a GPU exchanges (its whole ``[sp, ...]`` input), measured on groups of ``gpus`` GPUs."""

    gpus: int
    graph: LogGrid

    def ms(self, nbytes: float, n: int) -> float | None:
        """Time of an all-to-all of ``nbytes`` a GPU over ``n`` GPUs of one host, or None where
        nothing was measured (another group size)."""
        if n != self.gpus or nbytes <= 0:
            return None
        top = self.graph.axes[0][-1]
        return self.graph(min(nbytes, top)) * max(1.0, nbytes / top) * 1e-3

    @staticmethod
    def of(value: dict[str, Any]) -> "SymmAllToAll":
        """From the profile's ``symm_all_to_all_us`` value (``fit_symm_all_to_all``)."""
        return SymmAllToAll(int(value["gpus"]), LogGrid([value["bytes"]], value["graph"], log_values=True))


@dataclass(frozen=True)
class Launch:
    """How the engine launches a step (module doc). ``host_ms_per_layer``: an eager step's host
    time per decoder layer of a stage; ``graph_max_tokens``: plain-TP steps up to this size are
    graphed; ``ulysses_ns_per_byte``: the Ulysses exchange's in-step cost beyond the all-to-alls;
    ``gemv_GBps``, ``gemv_call_us``: the decode GEMV's streaming rate and fixed time a product (0:
    products priced by the GEMM table);
    ``pp_handoff_ms``: a PP step's dispatch latency per stage boundary beyond the send;
    ``form_ms``, ``form_prefill_ms``, ``form_ms_per_seq``, ``form_ms_per_kpatch``: the driver's host time
    before a step it did not form ahead (the last per 1,000 image patches the step encodes); ``mixed_step_ms``: a graphed mixed step's time beyond the model on each stage;
    ``decode_us_per_key``: the paged decode kernel's range program's time a key (the tail a batch of
    unequal contexts waits for, ``opcost.longest_range_tail_ms``); ``graph_slot_ns``: the launch of one
    of that kernel's programs on a slot of a step graph that holds no decode (``graph_decode_programs``);
    ``all_reduce``: the symmetric-memory all-reduce of decode steps (None: NCCL's tables);
    ``all_to_all``: the LL all-to-all of graphed SP x TP steps (None: SP x TP steps run eagerly)."""

    host_ms_per_layer: float
    graph_max_tokens: int = GRAPH_TOKEN_BUCKETS[-1]
    ulysses_ns_per_byte: float = 0.0
    gemv_GBps: float = 0.0
    gemv_call_us: float = 0.0
    pp_handoff_ms: float = 0.0
    form_ms: float = 0.0
    form_prefill_ms: float = 0.0
    form_ms_per_seq: float = 0.0
    form_ms_per_kpatch: float = 0.0
    mixed_step_ms: float = 0.0
    decode_us_per_key: float = 0.0
    graph_slot_ns: float = 0.0
    all_reduce: SymmAllReduce | None = None
    all_to_all: SymmAllToAll | None = None

    def graphed(self, tokens: float, sp: int, mode: str, one_host: bool = True) -> bool:
        """Whether the engine replays the step as a CUDA graph: at most ``graph_max_tokens`` tokens,
        in plain TP (``sp == 1`` runs TP too), or in SP x TP where its all-to-all is the LL kernel
        (the sp group on ``one_host``)."""
        sp_graphed = self.all_to_all is not None and one_host
        return (mode == "tp" or sp == 1 or sp_graphed) and tokens <= self.graph_max_tokens

    def wall_ms(self, gpu_ms: float, layers: int, tokens: float, sp: int, mode: str, one_host: bool = True) -> float:
        """A stage's step: ``max(layers * h, gpu_ms)`` when eager, ``gpu_ms`` when graphed."""
        if self.graphed(tokens, sp, mode, one_host):
            return gpu_ms
        return max(gpu_ms, layers * self.host_ms_per_layer)

    def driver_ms(self, seqs: float, prefill: bool, patches: float = 0.0) -> float:
        """The driver's host time before a step of ``seqs`` sequences, encoding images of ``patches``
        patches in all, that it could not form ahead."""
        return (self.form_ms + (self.form_prefill_ms if prefill else 0.0) + self.form_ms_per_seq * seqs
                + self.form_ms_per_kpatch * patches / 1000.0)


def launch_for(profile: Profile | None, engine: str | None, backend: str | None) -> Launch | None:
    """The profile's measured terms for ``engine`` running ``backend`` layers, or None (module doc)."""
    if profile is None or engine != "shiftplan" or not profile.steps:
        return None
    host = profile.steps.get("host_ms_per_layer", {}).get(backend or "eager")
    if host is None:
        return None
    def value(name: str) -> float:
        return float(profile.steps.get(name, {}).get("value", 0.0))

    symm = profile.steps.get("symm_all_reduce_us")
    a2a = profile.steps.get("symm_all_to_all_us")
    form = profile.steps.get("form_ms", {}).get("value", {})
    return Launch(float(host["value"]), ulysses_ns_per_byte=value("ulysses_ns_per_byte"),
                  gemv_GBps=value("gemv_GBps"), gemv_call_us=value("gemv_call_us"), pp_handoff_ms=value("pp_handoff_ms"),
                  form_ms=float(form.get("base", 0.0)), form_prefill_ms=float(form.get("prefill", 0.0)),
                  form_ms_per_seq=float(form.get("per_seq", 0.0)), form_ms_per_kpatch=value("form_ms_per_kpatch"),
                  mixed_step_ms=value("mixed_step_ms"),
                  decode_us_per_key=value("decode_us_per_key"), graph_slot_ns=value("graph_slot_ns"),
                  all_reduce=SymmAllReduce.of(symm["value"]) if symm else None,
                  all_to_all=SymmAllToAll.of(a2a["value"]) if a2a else None)


def fused_add_norm_ops(recs: tuple[Any, ...]) -> tuple[frozenset[int], frozenset[int]]:
    """``(sums, absorbed)``: indices of a decoder layer's bias-free row linears whose all-reduce the
    engine can fuse, and of the ops their kernels absorb. Each takes the first residual add after
    it and the first RMSNorm after that add, or, past the layer's end (the MLP's sum, whose norm is
    the next layer's input norm), the layer's first RMSNorm not yet taken; a linear without both
    keeps the plain sum."""
    sums, absorbed = set(), set()
    norms = [i for i, r in enumerate(recs) if r.kind == "norm" and r.memop == "rmsnorm"]
    for i, r in enumerate(recs):
        if r.kind != "matmul" or r.shard != "row" or r.bias:
            continue
        add = next((j for j in range(i + 1, len(recs)) if recs[j].kind == "elementwise"
                    and recs[j].shard == "replicated" and recs[j].memop == "add" and j not in absorbed), None)
        if add is None:
            continue
        free = [k for k in norms if k not in absorbed]
        norm = next((k for k in free if k > add), free[0] if free else None)
        if norm is not None:
            sums.add(i)
            absorbed.update((add, norm))
    return frozenset(sums), frozenset(absorbed)


# ------------------------------------------------------------------ fits from a shift_crossover report


def fit_host_ms_per_layer(sp_tp_ms: dict[int, float], layers: int,
                          graph_max_tokens: int = GRAPH_TOKEN_BUCKETS[-1]) -> float:
    """Median SP x TP step time over steps of at most ``graph_max_tokens`` tokens, per layer."""
    small = [ms for t, ms in sp_tp_ms.items() if t <= graph_max_tokens]
    if not small:
        raise ValueError("no SP x TP step at or below the graph limit to fit the host time from")
    return statistics.median(small) / layers


def fit_ulysses_ns_per_byte(extra_ms: list[float], exchange_bytes: list[float]) -> float:
    """Least squares through 0 of ``extra = c * bytes`` (ns per byte)."""
    den = sum(b * b for b in exchange_bytes)
    if den <= 0:
        raise ValueError("no exchanged bytes to fit the Ulysses term from")
    return sum(e * b for e, b in zip(extra_ms, exchange_bytes)) / den * 1e6


def exchange_bytes(cost: CostModel, shape: Any, *, tp: int, sp: int) -> float:
    """Bytes one GPU sends through the Ulysses all-to-alls over a whole step (every layer)."""
    return sum(cost.ulysses_bytes(b, shape, tp=tp, sp=sp) for b in cost.decoders)


def step_shape(kind: str, tokens: int, decodes: int, context: int) -> Any:
    """The StepShape of a ``bench/shift_crossover.py`` step: one prefill of ``tokens``, or a chunk
    of ``tokens - decodes`` plus ``decodes`` decodes at ``context``."""
    from graph.opgraph import StepShape

    if kind == "prefill":
        return StepShape.prefill([tokens])
    return StepShape.prefill([tokens - decodes]) + StepShape.decode([context] * decodes)


def fit_steps(report: dict[str, Any], cost: CostModel) -> dict[str, float]:
    """``host_ms_per_layer`` (the report's backend) and ``ulysses_ns_per_byte`` from a
    ``bench/shift_crossover.py`` report; ``cost``: the model without the Ulysses term (its GPU
    time of SP2 steps). Prefill steps set the host time; GPU-bound SP2 steps of both kinds
    (modelled GPU time over ``GPU_BOUND`` x the host time) the Ulysses term."""
    layers = len(cost.decoders)
    pre = {int(t): r["sp_tp"]["ms"] for t, r in report["steps"]["prefill"].items() if "ms" in r.get("sp_tp", {})}
    host = fit_host_ms_per_layer(pre, layers)
    extra, nbytes = [], []
    for kind, rows in report["steps"].items():
        for t, r in rows.items():
            if "ms" not in r.get("sp_tp", {}):
                continue
            sh = step_shape(kind, int(t), report["decodes"], report["context"])
            gpu = cost.step_time(sh, tp=1, sp=2, mode="sp_tp").total_ms
            if gpu > GPU_BOUND * host * layers:
                extra.append(r["sp_tp"]["ms"] - gpu)
                nbytes.append(exchange_bytes(cost, sh, tp=1, sp=2))
    return {"host_ms_per_layer": host, "ulysses_ns_per_byte": fit_ulysses_ns_per_byte(extra, nbytes),
            "gpu_bound_steps": len(extra)}


# ------------------------------------------------------------------ fits from engine_speed / mesh_speed reports


def gemv_kernel_us(kernels: list[dict[str, Any]]) -> tuple[float, int]:
    """``(us, calls)`` of the ``_gemv`` kernels in a graph's per-kernel breakdown."""
    rows = [k for k in kernels if k["kernel"] == "_gemv"]
    if not rows:
        raise ValueError("no _gemv kernel in the decode graph's breakdown")
    return sum(k["us_per_step"] for k in rows), sum(k["calls_per_step"] for k in rows)


def fit_gemv(speed: dict[str, Any], mesh: dict[str, Any], tp: str = "tp2",
             variant: str = "graphs+compile+lookahead") -> tuple[float, float]:
    """``(gemv_GBps, gemv_call_us)`` (module doc) from the batch-1 decode graph of a
    ``bench/engine_speed.py`` report (one GPU) and rank 0's decode graph profile of mesh ``tp`` in a
    ``bench/mesh_speed.py`` report (``graph_profile``): the same model, every projection sharded
    ``1 / tp``. The activations, a few KB a layer, are left out."""
    t1, n = gemv_kernel_us(speed["variants"][variant]["batch_1"]["graph_kernels"])
    t2, n2 = gemv_kernel_us(mesh["meshes"][tp]["graph_profile"]["graph_kernels"])
    if n != n2:
        raise ValueError(f"{n} GEMVs on one GPU, {n2} on {tp}: not the same model")  # n: the engine's launches
    b1 = 2.0 * speed["model_figures"]["linear_params"]
    b2 = b1 / int(tp.removeprefix("tp"))
    gbps = (b1 - b2) / ((t1 - t2) * 1e-6) / 1e9
    return gbps, (t1 - b1 / (gbps * 1e9) * 1e6) / (PROJECTIONS_PER_LAYER * speed["model_figures"]["layers"])


def fit_pp_handoff_ms(report: dict[str, Any], cost: CostModel) -> float:
    """``(PP2 step - one GPU's step) - send``: the batch-1 decode steps of a ``bench/mesh_speed.py``
    report with meshes ``single`` and ``pp2``, less the modelled send of one token's hidden state
    (``CostModel.p2p_ms``)."""
    m = report["meshes"]
    extra = m["pp2"]["decode_b1"]["decode_step_ms"] - m["single"]["decode_b1"]["decode_step_ms"]
    return extra - cost.p2p_ms(cost.info.hidden * cost.rates.a_bytes, inter_node=False)


# ------------------------------------------------------------------ fit from an allreduce_latency report


def fit_symm_all_reduce(report: dict[str, Any]) -> dict[str, Any]:
    """The profile's ``symm_all_reduce_us`` value from a ``bench/allreduce_latency.py`` report: per
    size (``rows x hidden x 2`` bytes), the one-shot all-reduce's and the fused all-reduce + add +
    RMSNorm's per-call time in a CUDA graph (us), and the group size. The fused kernel's times are
    its LL protocol's (``ll_graph_us``, what the engine runs for bf16) where the report has them."""
    rows = sorted(report["rows"], key=lambda r: r["bytes"])
    fused = "ll_graph_us" if all("ll_graph_us" in r for r in rows) else "fused_graph_us"
    return {"gpus": int(report["gpus"]), "bytes": [float(r["bytes"]) for r in rows],
            "one_shot": [float(r["symm_graph_us"]) for r in rows],
            "fused_add_norm": [float(r[fused]) for r in rows]}


def fit_symm_all_to_all(report: dict[str, Any], programs: int) -> dict[str, Any]:
    """The profile's ``symm_all_to_all_us`` value from a ``bench/all_to_all_latency.py`` report: per
    size (the bytes of a GPU's input), the LL kernel's per-call time in a CUDA graph (us) with
    ``programs`` programs (the engine's ``executors.all_to_all.PROGRAMS``: the report's own count or
    one of its variants), and the group size."""
    key = "ll_graph_us" if programs == report["programs"] else f"ll_graph_us_p{programs}"
    rows = sorted(report["rows"], key=lambda r: r["bytes_per_rank"])
    if not all(key in r for r in rows):
        raise ValueError(f"the report has no in-graph times with {programs} programs")
    return {"gpus": int(report["gpus"]), "programs": programs, "bytes": [float(r["bytes_per_rank"]) for r in rows],
            "graph": [float(r[key]) for r in rows]}


# ------------------------------------------------------------------ fits from traced serving steps


def after_answers(records: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], float | None]]:
    """Step-trace records (``executors.trace``) per replica in answer order, each with its replica's
    previous answer time (ms; None for the first): a step sent after it waited for the driver."""
    prev: dict[int, float] = {}
    for r in sorted(records, key=lambda r: (r["replica"], r["answered_ms"])):
        yield r, prev.get(r["replica"])
        prev[r["replica"]] = r["answered_ms"]


def sent_ahead(record: dict[str, Any], last: float | None) -> bool:
    """A traced step sent before its replica's previous answer (``last``, ms, from ``after_answers``;
    None for the first step): the engine's look-ahead formed it while the last step computed."""
    return last is not None and record["sent_ms"] < last


def fit_form_ms(rates: list[list[dict[str, Any]]]) -> dict[str, float]:
    """``{"base", "prefill", "per_seq"}`` (module doc): least squares of the gap between a step's
    send and its predecessor's answer (same replica) over the steps of ``rates`` (step-trace records
    of one replay each, ``executors.trace``) sent after that answer."""
    import numpy as np

    rows, gaps = [], []
    for records in rates:
        for r, last in after_answers(records):
            if last is not None and r["sent_ms"] >= last:
                rows.append([1.0, float(any(n > 1 for nn in r["new"] for n in nn)), float(r["seqs"])])
                gaps.append(r["sent_ms"] - last)
    if len(rows) < 3:
        raise ValueError("too few steps sent after their predecessor's answer to fit the driver's time")
    (base, prefill, per_seq), *_ = np.linalg.lstsq(np.array(rows), np.array(gaps), rcond=None)
    return {"base": float(base), "prefill": float(prefill), "per_seq": float(per_seq), "steps": len(rows)}


def fit_form_ms_per_kpatch(rates: list[list[dict[str, Any]]], launch: "Launch") -> tuple[float, int]:
    """``(ms, steps)``: the driver's host time per 1,000 image patches of a step (module doc): the
    median over the steps of ``rates`` that encode images and were sent after their predecessor's
    answer of (that gap - ``launch.driver_ms`` without images) / thousands of patches. The median, not
    least squares: a few gaps hold the replay's idle time before a request arrived."""
    per = []
    for records in rates:
        for r, last in after_answers(records):
            patches = sum(r.get("patches") or [])
            if last is None or r["sent_ms"] < last or not patches:
                continue
            prefill = any(n > 1 for nn in r["new"] for n in nn)
            per.append((r["sent_ms"] - last - launch.driver_ms(r["seqs"], prefill)) / (patches / 1000.0))
    if not per:
        raise ValueError("no step with images sent after its predecessor's answer in the trace")
    return statistics.median(per), len(per)


def fit_mixed_step_ms(rates: list[list[dict[str, Any]]], coster: Any, ahead: bool = False) -> tuple[float, int]:
    """``(ms, steps)``: the median over the graphed mixed steps of ``rates`` (step-trace records with
    the rank's GPU times, of a one-stage plan) sent after their predecessor's answer (``ahead``: those
    sent before it instead) of measured GPU time - ``coster``'s stage time; ``coster``: the
    simulator's coster (``costmodels.simulator.coster_for``) of the traced plan (its ``stage_ms``
    holds no such term: ``Coster.wait_ms`` does)."""
    from graph.opgraph import StepShape

    extra = []
    for records in rates:
        for r, last in after_answers(records):
            rank = r.get("rank") or {}
            if len(r["new"]) != 1 or "forward_gpu_ms" not in rank or r.get("images") or r["tokens"] > GRAPH_TOKEN_BUCKETS[-1]:
                continue
            if sent_ahead(r, last) != ahead:
                continue
            shape, dec = StepShape.from_sequences(r["new"][0], r["ctx"][0])
            if dec is None:
                continue
            gpu = rank["forward_gpu_ms"] + rank.get("sample_gpu_ms", 0.0)
            extra.append(gpu - sum(coster.stage_ms(shape, r["mode"][0], dec)))
    if not extra:
        raise ValueError(f"no graphed mixed step with GPU times sent {'ahead' if ahead else 'after an answer'} in the trace")
    return statistics.median(extra), len(extra)


def decode_kernel_programs(slots: int, kv_heads: int, heads: int, nsplit: int) -> int:
    """Programs the paged decode kernel launches over ``slots`` sequences in ``nsplit`` key ranges:
    ``slots x kv_heads x nsplit`` range programs and, with ``nsplit > 1``, ``slots x heads`` combine
    programs (``executors.paged_decode.paged_decode``'s two grids)."""
    return slots * kv_heads * nsplit + (slots * heads if nsplit > 1 else 0)


@functools.lru_cache(maxsize=1 << 14)
def graph_decode_programs(slots: int, kv_heads: int, heads: int, keys: int) -> int:
    """``decode_kernel_programs`` in a captured prefill or mixed step (``executors.graphs.MixedGraphs``:
    the kernel runs over the graph's ``slots = S + 1`` sequence slots, decodes or not), its ranges from
    ``plans.engine_shapes.graph_splits`` at the key bucket ``keys`` (this GPU's KV and query heads).
    Those on slots with no decode exit at once; each still costs its launch."""
    return decode_kernel_programs(slots, kv_heads, heads, graph_splits(slots, kv_heads, keys)[0])


def fit_graph_slot_ns(report: dict[str, Any]) -> tuple[float, int]:
    """``(ns, points)``: the GPU time of one paged decode kernel program on a slot with no decode,
    the least-squares slope through 0 of (a step's attention with the decode kernel - without it)
    against the programs the kernel launched, over the steps with no decodes of a ``bench/graph_decodes.py
    --fill`` report (one point per ranges' cut: the run's own, as for ``report["fill"]`` decodes at every
    key bucket, and each ``--fill`` column's), the programs counted with ``plans.engine_shapes.splits``
    as that run cut them (its key bucket holds the first chunk's keys)."""
    slots, keys = report["slots"] + 1, keys_bucket(report["chunk"])
    xs, ys = [], []
    for r in report["rows"]:
        if r["decodes"]:
            continue
        heads, kv_heads, _ = r["heads"]
        for col, us in r.items():
            if not (col.startswith("decode_kernel") and col.endswith("_us")) or us is None:
                continue
            fill = report["fill"] if col == "decode_kernel_us" else int(col[len("decode_kernel_fill"):-3])
            xs.append(decode_kernel_programs(slots, kv_heads, heads, splits(min(slots, fill), kv_heads, keys)[0]))
            ys.append((us - r["prefill_kernel_us"]) * 1e3)
    if not xs:
        raise ValueError("no step without decodes in the report")
    return sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), len(xs)


def fit_decode_us_per_key(points: list[dict[str, Any]]) -> tuple[float, int]:
    """``(us, points)``: a range program's time a key in the engine's paged decode kernel (module
    doc), the slope of least squares ``time = a + us * range`` over the calibration's
    ``attn_decode_engine`` points whose grid fits in one wave (sequences x KV heads x ranges at most
    ``engine_shapes.TARGET_PROGRAMS``: every program runs at once and the step lasts as long as its
    longest range) and whose ranges hold at least 128 keys (below, the fixed time dominates)."""
    import numpy as np

    rows, us = [], []
    for p in points:
        nsplit, per = splits(p["B"], p["kv_heads"], keys_bucket(p["C"]))
        per = min(per, p["C"])
        if p["B"] * p["kv_heads"] * nsplit <= TARGET_PROGRAMS and per >= 128:
            rows.append([1.0, float(per)])
            us.append(p["ms"] * 1e3)
    if len(rows) < 3:
        raise ValueError("too few one-wave decode points with ranges of 128+ keys to fit the time a key")
    (_a, slope), *_ = np.linalg.lstsq(np.array(rows), np.array(us), rcond=None)
    return float(slope), len(rows)
