"""The cost model: time of blocks, pipeline stages and whole forward steps under a mesh,
the memory per GPU, and the SP x TP vs shifted-TP crossover.

Modes of a (tp, sp) group of P = tp*sp GPUs:

* ``sp_tp``: tokens split over sp, weights over tp. Per decoder layer: TP all-reduces of the
  row-parallel outputs (T/sp tokens x hidden) within the tp group, and two Ulysses
  all-to-alls in the sp group (QKV before attention: T/sp x (h + 2g)/tp x d per GPU; the
  attention output after: T/sp x h/tp x d).
* ``tp``: plain TP of degree P over the same GPUs (shift parallelism's small-step mode).

``fused_elementwise``: the serving engine fuses memory-bound ops (a plan or spec whose runtime
backend is not eager), so they cost one pass over their bytes (``opcost.Rates.fused``).
``fp8_kernels`` (``fp8_kernels_for(backend)``): whose FP8 GEMMs FP8-weight linears run, this repo's
engine's (``engine``: the profile's ``gemm_fp8``) or per-tensor-scaled cuBLASLt ones as TensorRT-LLM
serves FP8 checkpoints (``tensor``: ``gemm_fp8_tensor``, where measured).

Op times come from ``costmodels.opcost``; a block's time is the sum over its ops plus its
collectives (no overlap of communication and compute is assumed). Collectives and stage sends
read the profile's measured tables where it has them (graph-timed for the steps the engine replays
as CUDA graphs, ``graphed``: decode steps, T = B, and with ``launch`` every step of at most 2,048
tokens; eager otherwise) and the alpha-beta formulas elsewhere
(``costmodels.collectives``). ``launch`` (``costmodels.steps.Launch``, the engine's measured
step terms; None: none apply): SP x TP layers pay the Ulysses exchange's in-step cost per byte on
top of the all-to-alls (the engine's LL all-to-all in steps it graphs: ``all_to_all_ms``), and
``step_wall_ms`` / ``stage_wall_ms`` price the host side of a step,
``max(layers x host time per layer, GPU time)`` for steps the engine launches eagerly, and
``step_wall_ms`` / ``hop_ms`` the engine's handoff at each PP stage boundary; the engine's decode
GEMV prices products of a few rows (``opcost.Rates.gemv_bw``), and its paged decode kernel decode
attention (the profile's ``attn_decode_engine``, where measured; without ``launch``, another engine,
the SDPA table, which stands for vLLM's, SGLang's or TensorRT-LLM's kernel). Block,
layer and step times (``block_time`` .. ``step_time``) are GPU times. Decoder layers with
the same op signature are timed once and multiplied; results are memoised per
(block signature, StepShape, t, s) so the simulator's repeated calls are dictionary hits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

from costmodels import collectives as C
from costmodels.gpu import GPU
from costmodels.hardware import dtype_bytes, get_gpu, matmul_tflops
from costmodels.memory import MemoryBreakdown, memory_per_gpu
from costmodels.opcost import OpRec, Rates, decode_tail_ms, op_rec, op_time, split_gating
from costmodels.profile import Profile
from costmodels.steps import FUSED_MAX_ROWS, GEMV_MAX_ROWS, Launch, fused_add_norm_ops, graph_decode_programs
from graph.opgraph import Block, OpGraph, StepShape
from plans.engine_shapes import BATCH_BUCKETS, keys_bucket
from plans.errors import UserError
from plans.mesh import ParallelDims, bucket, even_layers

MODES = ("sp_tp", "tp")


@dataclass(frozen=True)
class Breakdown:
    compute_ms: float = 0.0
    memory_ms: float = 0.0
    comm_ms: float = 0.0
    overhead_ms: float = 0.0
    total_ms: float = 0.0

    def __add__(self, o: "Breakdown") -> "Breakdown":
        return Breakdown(self.compute_ms + o.compute_ms, self.memory_ms + o.memory_ms, self.comm_ms + o.comm_ms,
                         self.overhead_ms + o.overhead_ms, self.total_ms + o.total_ms)

    def scale(self, f: float) -> "Breakdown":
        return Breakdown(self.compute_ms * f, self.memory_ms * f, self.comm_ms * f, self.overhead_ms * f,
                         self.total_ms * f)

    @staticmethod
    def of(compute: float = 0.0, memory: float = 0.0, comm: float = 0.0, overhead: float = 0.0) -> "Breakdown":
        return Breakdown(compute, memory, comm, overhead, compute + memory + comm + overhead)


@dataclass(frozen=True)
class StepCost:
    """One forward step through all pipeline stages.

    ``total_ms``: latency of the step (all stages in sequence plus the sends between them);
    ``bottleneck_ms``: the slowest stage including its outgoing send, which bounds the
    step rate of a full pipeline."""

    stages: list[Breakdown]
    p2p_ms: list[float]
    total_ms: float
    bottleneck_ms: float



def fp8_kernels_for(backend: str | None) -> str:
    """Whose FP8 GEMMs a runtime backend runs (``CostModel``'s ``fp8_kernels``): ``tensorrt`` ->
    ``tensor`` (one scale per tensor), any other -> ``engine`` (this repo's kernels)."""
    return "tensor" if backend == "tensorrt" else "engine"


class CostModel:
    """Costs of one model (an OpGraph) on one GPU type, with or without a calibration profile."""

    def __init__(self, graph: OpGraph, gpu: GPU | str, *, weights_dtype: str = "bf16", kv_dtype: str = "bf16",
                 act_dtype: str = "bf16", gpus_per_node: int = 8, profile: Profile | None = None,
                 fused_elementwise: bool = False, launch: Launch | None = None, fp8_kernels: str = "engine"):
        self.graph = graph
        self.launch = launch
        self.gpu = get_gpu(gpu)
        self.weights_dtype, self.kv_dtype, self.act_dtype = weights_dtype, kv_dtype, act_dtype
        self.gpus_per_node = gpus_per_node
        self.profile = profile
        self.roofline = profile is None
        self.profile_id = profile.id if profile else f"roofline:{self.gpu.name}"
        attn_peak = (self.gpu.bf16_tflops if act_dtype != "fp32" else (self.gpu.fp32_tflops or self.gpu.bf16_tflops))
        self.rates = Rates(peak_flops=matmul_tflops(self.gpu, weights_dtype) * 1e12, attn_flops=attn_peak * 1e12,
                           bw=self.gpu.hbm_tbps * 1e12, w_bytes=dtype_bytes(weights_dtype),
                           a_bytes=dtype_bytes(act_dtype), kv_bytes=dtype_bytes(kv_dtype), fused=fused_elementwise,
                           fp8_gemm=weights_dtype == "fp8" and bool(self.gpu.fp8_tflops),
                           fp8_tensor=fp8_kernels == "tensor", engine_decode=launch is not None,
                           decode_us_per_key=launch.decode_us_per_key if launch is not None else 0.0,
                           **_gemv_rates(launch, weights_dtype, act_dtype))
        # where FP8 GEMM efficiencies come from: a measured table, or the bf16 one at the FP8 peak
        tensor = self.rates.fp8_tensor and profile is not None and profile.gemm_fp8_tensor is not None
        self.fp8_gemm_source = (None if not self.rates.fp8_gemm else "roofline" if profile is None else
                                "measured, per-tensor scales" if tensor else
                                "measured" if profile.gemm_fp8 is not None else "bf16 table at the fp8 peak")
        self.links = C.default_links(self.gpu, gpus_per_node, profile.collectives if profile else None)
        self.info = graph.info
        self.decoders = graph.blocks_of("decoder")
        self._recs: dict[str, tuple[OpRec, ...]] = {}
        self._sig: dict[str, int] = {}
        sigs: dict[tuple, int] = {}
        for b in graph.blocks:
            recs = split_gating(tuple(op_rec(graph.op(n), b.tower) for n in b.ops))
            self._recs[b.name] = recs
            self._sig[b.name] = sigs.setdefault((b.kind, recs), len(sigs))
        # decoder layers: the row linears whose sum the engine can fuse with an add and a norm, and those ops
        self._fuse = {b.name: fused_add_norm_ops(self._recs[b.name]) for b in self.decoders if b.tower == "text"}
        self._cache: dict[tuple, Any] = {}  # memo of block and step costs (bounded)
        # vision blocks with windowed attention (Qwen2.5-VL): block name -> patches per window
        self._window = {b.name: int(graph.op(n).shape.get("window_patches") or 64)
                        for b in graph.blocks if b.tower == "vision" for n in b.ops
                        if graph.op(n).kind == "attention" and (graph.op(n).shape or {}).get("window")}

    # ------------------------------------------------------------------ blocks

    def _check(self, tp: int, sp: int, mode: str) -> tuple[int, int]:
        if mode not in MODES:
            raise UserError(f"unknown step mode '{mode}'; modes: {', '.join(MODES)}")
        if tp < 1 or sp < 1:
            raise UserError(f"tp and sp must be >= 1 (got tp={tp}, sp={sp})")
        return (tp * sp, 1) if mode == "tp" else (tp, sp)

    def block_time(self, block: Block, shape: StepShape, *, tp: int = 1, sp: int = 1, mode: str = "sp_tp") -> Breakdown:
        """Time of one block on one GPU of its (tp, sp) group, collectives included."""
        t, s = self._check(tp, sp, mode)
        key = (self._sig[block.name], shape, t, s)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        comp = mem = ovh = comm = 0.0
        links, ab = self.links, self.rates.a_bytes
        graph = self.graphed(shape, s)  # collectives captured in a CUDA graph
        # attention reads the step as it is: the paged prefill kernel serves prefill chunks of graphed steps and of
        # eager ones with two or more (executors.paged_prefill); decodes run the decode kernel either way
        attn = shape
        paged = self.launch is not None and (graph or shape.seqs - shape.decode_seqs >= 2)
        shape = self.graph_rows(shape) if graph else shape  # every other op: the step graph's rows, padding included
        sums, absorbed = self._fusion(block, shape, t, s, graph)
        for i, r in enumerate(self._recs[block.name]):
            if i in absorbed:  # the residual add and RMSNorm inside a fused all-reduce kernel
                continue
            c, m, o = op_time(r, attn if r.kind == "attention" else shape, t, s, self.rates, self.profile, paged)
            if c >= m:
                comp += c
            else:
                mem += m
            ovh += o
            if t > 1 and (r.shard == "row" or (r.kind == "embedding" and r.shard == "vocab")):
                comm += self.all_reduce_ms(r.act_written(shape) / s * ab, t, stride=s, graph=graph,
                                           rows=shape.tokens / s, fused=i in sums)
            elif t > 1 and r.kind == "lm_head" and r.shard == "vocab":
                comm += links.ms("all_gather", r.act_written(shape) / s * ab, t, stride=s, graph=graph)
            if s > 1 and r.kind == "attention":
                # Ulysses: QKV in (this GPU's T/s tokens of its h/t heads), attention output back
                comm += self.all_to_all_ms(r.act_read(shape) / (s * t) * ab, s, shape, graph=graph)
                comm += self.all_to_all_ms(r.act_written(shape) / (s * t) * ab, s, shape, graph=graph)
                if self.launch is not None:  # the exchange as the engine runs it (copies around it)
                    comm += (r.act_read(shape) + r.act_written(shape)) / (s * t) * ab \
                        * self.launch.ulysses_ns_per_byte * 1e-6
        out = Breakdown.of(comp, mem, comm, ovh)
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[key] = out
        return out

    def all_reduce_ms(self, nbytes: float, n: int, *, stride: int = 1, graph: bool = False, rows: float = 0.0,
                      fused: bool = False) -> float:
        """A TP all-reduce of ``nbytes`` (``rows`` rows per GPU) over ``n`` ranks ``stride`` apart: in
        a CUDA graph on one host, the engine's symmetric-memory kernel where the profile measured it
        (``costmodels.steps.SymmAllReduce``; ``fused``: the kernel that also adds the residual and
        applies the next RMSNorm, which then cost nothing more), else the collective tables."""
        symm = self.launch.all_reduce if self.launch is not None else None
        if symm is not None and graph and n > 1 and nbytes > 0 and self.links.for_group(n, stride) is self.links.intra:
            t = symm.ms(nbytes, n, rows, fused)
            if t is not None:
                return t
        return self.links.ms("all_reduce", nbytes, n, stride=stride, graph=graph)

    def graphed(self, shape: StepShape, sp: int) -> bool:
        """Whether the engine replays a step of ``shape`` on an sp group of ``sp`` as a CUDA graph:
        decode steps always (T = B), other steps as ``launch`` says (``Launch.graphed``: at most
        ``graph_max_tokens`` tokens; SP x TP only over the LL all-to-all on one host). Without
        ``launch`` (another engine, or none measured) only decode steps."""
        if shape.tokens <= shape.seqs:
            return True
        if self.launch is None:
            return False
        return self.launch.graphed(shape.tokens, sp, "sp_tp" if sp > 1 else "tp", self.sp_one_host(sp))

    def graph_rows(self, shape: StepShape) -> StepShape:
        """``shape`` as the engine's step graph computes it: a prefill or mixed step's tokens padded
        to the next token bucket (``plans.mesh.bucket``: 1,153 tokens run as 1,280), the padding rows
        through every op but attention (their programs exit at once), so op times take this shape
        and attention the real one. Decode steps, and engines without ``launch``, as they are (their
        graphs pad the batch to a bucket too; that padding is not priced)."""
        if self.launch is None or shape.tokens <= shape.seqs:
            return shape
        rows = bucket(shape.tokens)
        return shape if rows is None else replace(shape, tokens=float(rows))

    def mixed_extra_ms(self, shape: StepShape, *, sp: int, mode: str) -> float:
        """A graphed mixed step's time beyond the op model on each stage when it was not sent ahead
        (``costmodels.steps``, ``Launch.mixed_step_ms``: the rank's host work before the replay, while
        the GPU waits; the simulator charges it, ``Coster.wait_ms``); 0 for other steps and engines."""
        if self.launch is None or not self.launch.mixed_step_ms:
            return 0.0
        return self.launch.mixed_step_ms if self.graphed(shape, sp if mode == "sp_tp" else 1) else 0.0

    def step_graph(self, shape: StepShape, decode: StepShape | None, *, sp: int, mode: str,
                   max_seqs: int) -> tuple[int, int] | None:
        """``(slots, keys)`` of the step graph a prefill or mixed step ``shape`` (``decode``: its decode
        part, or None) replays in: ``S + 1`` sequence slots (``S``: ``max_seqs``' batch bucket, at most
        the step's token bucket, as ``executors.graphs.MixedGraphs`` sizes it) and the key bucket of its
        longest context (its prefill chunks' taken at their mean); None for decode steps, eager steps
        and engines without ``launch``."""
        _, s = self._check(1, sp, mode)
        if self.launch is None or shape.tokens <= shape.seqs or not self.graphed(shape, s):
            return None
        dec = decode if decode is not None and 0 < decode.tokens < shape.tokens else StepShape(0.0, seqs=0.0)
        seqs = min(bucket(max_seqs, BATCH_BUCKETS) or max_seqs, bucket(shape.tokens) or shape.tokens)
        chunks = shape.seqs - dec.seqs
        longest = max(shape.decode_max_kv, dec.decode_max_kv, (shape.kv - dec.kv) / chunks if chunks > 0 else 0.0)
        return int(seqs) + 1, keys_bucket(int(longest + 0.5))

    def graph_slots_ms(self, graph: tuple[int, int] | None, decode: StepShape | None, layers: int, *, tp: int,
                       sp: int, mode: str) -> float:
        """A captured prefill or mixed step runs the paged decode kernel on every sequence slot of its
        step graph ``graph`` (``step_graph``'s ``(slots, keys)``; None: no graph, 0): the programs on the
        slots that hold no decode (``decode``: the step's decode part, or None), ``steps.graph_decode_programs``
        over ``slots - decodes`` slots, each ``Launch.graph_slot_ns``, on a stage of ``layers`` decoder
        layers. The decodes' own programs are priced with their attention."""
        if graph is None or not self.launch.graph_slot_ns:
            return 0.0
        t, s = self._check(tp, sp, mode)
        decodes = decode.seqs if decode is not None else 0.0
        attn = self._decode_attention
        kv, heads = (max(1, round(h / (t * s))) for h in (attn.kv_heads, attn.heads))
        programs = graph_decode_programs(int(graph[0] - decodes), kv, heads, graph[1])
        return programs * self.launch.graph_slot_ns * 1e-6 * layers

    def driver_ms(self, seqs: float, prefill: bool, patches: float = 0.0) -> float:
        """The engine driver's host time before a step it could not form ahead, encoding images of
        ``patches`` patches (``Launch.driver_ms``); 0 without the engine's terms."""
        return self.launch.driver_ms(seqs, prefill, patches) if self.launch is not None else 0.0

    def all_to_all_ms(self, nbytes: float, n: int, shape: StepShape, *, graph: bool = False) -> float:
        """A Ulysses all-to-all of ``nbytes`` a GPU over the ``n`` GPUs of an sp group (adjacent
        ranks) in a step of ``shape``: the engine's LL kernel where it graphs the step on one host and
        the profile measured it (``costmodels.steps.SymmAllToAll``), else the collective tables."""
        a2a = self.launch.all_to_all if self.launch is not None else None
        if a2a is not None and self.sp_one_host(n) and self.graphed(shape, n):
            t = a2a.ms(nbytes, n)
            if t is not None:
                return t
        return self.links.ms("all_to_all", nbytes, n, graph=graph)

    def sp_one_host(self, sp: int) -> bool:
        """An sp group (adjacent ranks) lies on one host."""
        return self.links.for_group(sp) is self.links.intra

    def _fusion(self, block: Block, shape: StepShape, t: int, s: int,
                graph: bool) -> tuple[frozenset[int], frozenset[int]]:
        """``(sums, absorbed)`` of ``costmodels.steps.fused_add_norm_ops`` where the engine fuses this
        block's all-reduces (a text decoder layer of a decode step, at most ``FUSED_MAX_ROWS`` rows
        per GPU, on a measured one-host group: ``SymmAllReduce.ms``); else nothing."""
        none = (frozenset(), frozenset())
        symm = self.launch.all_reduce if self.launch is not None else None
        if symm is None or not graph or t < 2 or block.name not in self._fuse:
            return none
        sums, absorbed = self._fuse[block.name]
        nbytes = shape.tokens / s * self.info.hidden * self.rates.a_bytes
        if (not sums or shape.tokens / s > FUSED_MAX_ROWS or self.links.for_group(t, s) is not self.links.intra
                or symm.ms(nbytes, t, shape.tokens / s, True) is None):
            return none
        return sums, absorbed

    def ulysses_bytes(self, block: Block, shape: StepShape, *, tp: int, sp: int) -> float:
        """Bytes one GPU sends through a block's Ulysses all-to-alls under SP x TP (QKV in,
        attention output back: ``(T/sp) x ((h + 2g) + h)/tp x d x act bytes``)."""
        if sp < 2:
            return 0.0
        return sum((r.act_read(shape) + r.act_written(shape)) / (sp * tp) * self.rates.a_bytes
                   for r in self._recs[block.name] if r.kind == "attention")

    def blocks_time(self, blocks: list[Block], shape: StepShape, *, tp: int = 1, sp: int = 1,
                    mode: str = "sp_tp") -> Breakdown:
        out = Breakdown()
        for b in blocks:
            out = out + self.block_time(b, shape, tp=tp, sp=sp, mode=mode)
        return out

    def layers_time(self, first: int, last: int, shape: StepShape, *, tp: int = 1, sp: int = 1,
                    mode: str = "sp_tp") -> Breakdown:
        """Decoder layers ``first..last`` (inclusive, 0-based); identical layers are timed once."""
        if not (0 <= first <= last < len(self.decoders)):
            raise UserError(f"layer range {first}..{last} outside 0..{len(self.decoders) - 1}")
        out = Breakdown()
        i = first
        while i <= last:
            j = i
            sig = self._sig[self.decoders[i].name]
            while j + 1 <= last and self._sig[self.decoders[j + 1].name] == sig:
                j += 1
            out = out + self.block_time(self.decoders[i], shape, tp=tp, sp=sp, mode=mode).scale(j - i + 1)
            i = j + 1
        return out

    def _text_blocks(self, kind: str) -> list[Block]:
        return [b for b in self.graph.blocks if b.kind == kind and b.tower == "text"]

    # ------------------------------------------------------------------ steps

    def decode_tail_ms(self, shape: StepShape, *, tp: int = 1, sp: int = 1, mode: str = "sp_tp",
                       graph: tuple[int, int] | None = None) -> float:
        """One decoder layer's share of ``step_time`` that the step's longest decode adds
        (``opcost.decode_tail_ms``; the layers are alike; ``graph``: the decodes of a captured mixed
        step, ``step_graph``). The simulator's coster memoises step times on a grid without the
        longest decode and adds this exactly: it jumps where the longest crosses a key bucket, which
        a grid would blur."""
        if shape.decode_max_kv <= 0 and graph is None:
            return 0.0
        t, s = self._check(tp, sp, mode)
        return decode_tail_ms(self._decode_attention, shape, t, s, self.rates, self.profile, graph)

    @functools.cached_property
    def _decode_attention(self) -> OpRec:
        return next(r for r in self._recs[self.decoders[0].name] if r.kind == "attention")

    def step_time(self, shape: StepShape, *, pp: int = 1, tp: int = 1, sp: int = 1, mode: str = "sp_tp",
                  stages: list[tuple[int, int]] | None = None) -> StepCost:
        """One forward step of the text model through ``pp`` stages (embedding on the first,
        final norm and lm_head on the last), with the activations sent between stages."""
        key = ("step", shape, pp, tp, sp, mode, tuple(stages) if stages else None)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        stages = stages or even_layers(len(self.decoders), pp)
        t, s = self._check(tp, sp, mode)
        head = self._text_blocks("embedding")
        tail = self._text_blocks("final_norm") + self._text_blocks("lm_head")
        per_stage, sends = [], []
        act = shape.tokens / s * self.info.hidden * self.rates.a_bytes
        dims = ParallelDims(pp=len(stages), tp=tp, sp=sp, gpus_per_node=self.gpus_per_node)
        for i, (a, b) in enumerate(stages):
            bd = self.layers_time(a, b, shape, tp=tp, sp=sp, mode=mode)
            if i == 0:
                bd = self.blocks_time(head, shape, tp=tp, sp=sp, mode=mode) + bd
            if i == len(stages) - 1:
                bd = bd + self.blocks_time(tail, shape, tp=tp, sp=sp, mode=mode)
            per_stage.append(bd)
            if i < len(stages) - 1:
                sends.append(self.p2p_ms(act, inter_node=dims.crosses_nodes(i)))
        total = sum(b.total_ms for b in per_stage) + sum(sends)
        bottleneck = max(b.total_ms + (sends[i] if i < len(sends) else 0.0) for i, b in enumerate(per_stage))
        out = StepCost(stages=per_stage, p2p_ms=sends, total_ms=total, bottleneck_ms=bottleneck)
        self._cache[key] = out
        return out

    def without_launch(self) -> "CostModel":
        """The same model without the engine's step terms (``launch``): an engine that replays every
        step as a CUDA graph and runs the Ulysses exchange at its collectives' cost."""
        import copy

        c = copy.copy(self)
        c.launch, c._cache = None, {}
        return c

    def stage_wall_ms(self, gpu_ms: float, layers: int, tokens: float, *, sp: int, mode: str) -> float:
        """A stage's step with its host side: ``max(layers x host ms per layer, gpu_ms)`` when the
        engine launches the step eagerly, else ``gpu_ms`` (``costmodels.steps``)."""
        if self.launch is None:
            return gpu_ms
        return self.launch.wall_ms(gpu_ms, layers, tokens, sp, mode, self.sp_one_host(sp))

    def step_wall_ms(self, shape: StepShape, *, pp: int = 1, tp: int = 1, sp: int = 1, mode: str = "sp_tp",
                     stages: list[tuple[int, int]] | None = None) -> float:
        """``step_time``'s latency with each stage's host side (``stage_wall_ms``) and the
        engine's handoff at each of the ``S - 1`` stage boundaries:
        ``sum_s stage_wall_s + sum_b (send_b + handoff)``."""
        stages = stages or even_layers(len(self.decoders), pp)
        sc = self.step_time(shape, pp=pp, tp=tp, sp=sp, mode=mode, stages=stages)
        return sum(self.stage_wall_ms(b.total_ms, hi - lo + 1, shape.tokens, sp=sp, mode=mode)
                   for b, (lo, hi) in zip(sc.stages, stages)) + sum(sc.p2p_ms) + self.handoff_ms() * len(sc.p2p_ms)

    def p2p_ms(self, nbytes: float, *, inter_node: bool) -> float:
        """A stage-to-stage send: the measured p2p table within a node where the profile has one."""
        return C.p2p_ms(nbytes, self.links.inter) if inter_node else self.links.ms("p2p", nbytes, 2)

    def handoff_ms(self) -> float:
        """The engine's dispatch latency of a PP step per stage boundary beyond the send
        (``costmodels.steps``: no look-ahead under PP); 0 without the engine's terms."""
        return self.launch.pp_handoff_ms if self.launch is not None else 0.0

    def hop_ms(self, nbytes: float, *, inter_node: bool) -> float:
        """A step's hop from one stage to the next as the engine runs it: ``p2p_ms + handoff_ms``."""
        return self.p2p_ms(nbytes, inter_node=inter_node) + self.handoff_ms()

    # ------------------------------------------------------------------ vision

    def vision_time(self, patches_per_image: list[int], *, tp: int = 1, dp: int = 1) -> Breakdown:
        """Whole vision tower (patch embed, blocks, merger) for a batch of images.

        With dp > 1 the images are spread over dp encoder replicas by patch count (longest
        first, onto the least-loaded replica, load ~ p + p^2/4096); the slowest replica's
        time is returned. Each replica runs TP of degree tp. Blocks with windowed attention
        (Qwen2.5-VL) attend within windows of ``window_patches`` patches, not whole images."""
        vis = [b for b in self.graph.blocks if b.tower == "vision"]
        if not vis:
            raise UserError(f"{self.info.architecture} has no vision tower")
        if not patches_per_image:
            return Breakdown()
        groups: list[list[int]] = [[] for _ in range(max(dp, 1))]
        loads = [0.0] * len(groups)
        for p in sorted(patches_per_image, reverse=True):
            g = loads.index(min(loads))
            groups[g].append(p)
            loads[g] += p + p * p / 4096
        worst = Breakdown()
        for imgs in groups:
            if not imgs:
                continue
            full = StepShape.vision(imgs)
            bd = Breakdown()
            for b in vis:
                wp = self._window.get(b.name)
                bd = bd + self.block_time(b, full if wp is None else _windowed(imgs, wp), tp=tp, sp=1, mode="sp_tp")
            if bd.total_ms > worst.total_ms:
                worst = bd
        return worst

    # ------------------------------------------------------------------ memory

    def memory(self, *, pp: int, tp: int, sp: int, dp: int = 1, stage_layers: tuple[int, int] | None = None,
               with_embedding: bool = True, with_lm_head: bool = True, with_vision: bool = False,
               max_batch_tokens: int = 8192) -> MemoryBreakdown:
        """Memory per GPU of one pipeline stage. ``stage_layers=None`` evaluates the even
        split of ``pp`` stages (embedding on the first, lm_head on the last) and returns the
        stage with the least KV capacity."""
        if stage_layers is not None:
            return memory_per_gpu(self, layers=stage_layers, tp=tp, sp=sp, embedding=with_embedding,
                                  lm_head=with_lm_head, vision=with_vision, max_batch_tokens=max_batch_tokens)
        stages = even_layers(len(self.decoders), pp)
        worst: MemoryBreakdown | None = None
        for i, rng in enumerate(stages):
            m = memory_per_gpu(self, layers=rng, tp=tp, sp=sp, embedding=with_embedding and i == 0,
                               lm_head=with_lm_head and i == len(stages) - 1, vision=with_vision and i == 0,
                               max_batch_tokens=max_batch_tokens)
            if worst is None or m.kv_tokens < worst.kv_tokens:
                worst = m
        assert worst is not None
        return worst

    # ------------------------------------------------------------------ shift crossover

    def shift_crossover(self, *, tp: int, sp: int, pp: int = 1, context: int = 1024,
                        tokens: list[int] | None = None) -> tuple[int | None, list[tuple[int, float, float]]]:
        """Smallest step token count T at which SP x TP beats plain TP of degree tp*sp.

        A step of T tokens is modelled as prefill chunks of up to ``context`` tokens each
        (the last partial), timed with its host side (``step_wall_ms``). Curve points (T, sp_tp_ms, tp_ms) are returned on a log grid
        from 8 to 65536; the crossover is refined to the integer between the last grid point
        where TP wins and the first where SP x TP wins for good. None if SP x TP never wins."""
        if sp <= 1:
            return None, []
        grid = tokens or sorted({int(round(2 ** (e / 4))) for e in range(12, 65)})

        def costs(n: int) -> tuple[float, float]:
            sh = _chunks(n, context)
            a = self.step_wall_ms(sh, pp=pp, tp=tp, sp=sp, mode="sp_tp")
            b = self.step_wall_ms(sh, pp=pp, tp=tp, sp=sp, mode="tp")
            return a, b

        curve = [(n, *costs(n)) for n in grid]
        first_win = None
        for i in range(len(curve) - 1, -1, -1):
            if curve[i][1] < curve[i][2]:
                first_win = i
            else:
                break
        if first_win is None:
            return None, curve
        if first_win == 0:
            return curve[0][0], curve
        lo, hi = curve[first_win - 1][0], curve[first_win][0]  # TP wins at lo, SP x TP at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            a, b = costs(mid)
            lo, hi = (lo, mid) if a < b else (mid, hi)
        return hi, curve


def _gemv_rates(launch: Launch | None, weights_dtype: str, act_dtype: str) -> dict[str, float]:
    """The engine's decode GEMV (``costmodels.steps``) where it runs: measured, and weights of the
    activations' 16-bit dtype (the kernel takes bf16/fp16 weights; FP8 keeps its GEMM table)."""
    if launch is None or launch.gemv_GBps <= 0 or weights_dtype != act_dtype or weights_dtype not in ("bf16", "fp16"):
        return {}
    return {"gemv_bw": launch.gemv_GBps * 1e9, "gemv_call_s": launch.gemv_call_us * 1e-6, "gemv_max_rows": GEMV_MAX_ROWS}


def _windowed(patches_per_image: list[int], window: int) -> StepShape:
    """A vision step whose attention stays within windows of ``window`` patches: pairs =
    sum of p * min(p, window) (``graph.vision_windows.approx_window_pairs``), one attention
    sequence per window."""
    from graph.vision_windows import approx_window_pairs

    return StepShape(tokens=float(sum(patches_per_image)), pairs=approx_window_pairs(patches_per_image, window),
                     kv=float(sum(patches_per_image)),
                     seqs=float(sum(max(1, -(-p // window)) for p in patches_per_image)))


def _chunks(n: int, context: int) -> StepShape:
    """A step of n prefill tokens: chunks of ``context`` tokens (fresh sequences), the last partial."""
    full, rest = divmod(n, context)
    lengths = [context] * full + ([rest] if rest else [])
    return StepShape.prefill(lengths)
