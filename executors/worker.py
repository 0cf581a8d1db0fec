"""One worker per rank: join the process group, build this rank's stage, run steps.

The driver sends each rank of a DP replica the same serialized ``Step`` (through a shared-memory
channel, ``executors.channel``); the ranks of a stage run it together (collectives on their
groups), hand hidden states to the next stage point-to-point, and the last stage's shift-rank-0
GPU samples and reports. In a single-stage replica every rank samples (the same tokens: the
logits are all-gathered, sampling is deterministic) and keeps them on its device, so a look-ahead
step's input tokens are gathered there (``Step.tokens_from``); a rank launches a step the driver
has already sent before it reads the last step's tokens (``serve_steps``). Errors are reported to
the driver with the rank and traceback, then the worker exits. ``RankRunner`` also serves
torchrun's ranks (``executors.torchrun``).
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import pickle
import queue
import struct
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from executors.batch import MicroBatch, Step, StepOut, to_device
from executors.channel import CHECK_S, Backoff, Channel, ChannelSpec, Polling
from executors.config import ModelArgs, run_dtypes
from executors.encoders import EncoderServer, load_tower
from executors.parallel import Par, build_par
from executors.model import checkpoint_shapes
from executors.sampling import row_key, sample
from executors.stage import StageModel
from executors.tower_graphs import TowerGraphs
from executors.trace import RankTimer
from executors.weights import RandomSource, WeightSource, open_weights
from plans.errors import UserError, describe
from plans.schema import Plan


ALL_REDUCE = ("auto", "nccl")
DRIVER_GONE_EXIT = 3  # a spawned rank whose driver ended without stopping it


@dataclass
class WorkerSpec:
    """Everything a rank needs, picklable."""

    plan_json: str
    args: ModelArgs  # portable: no transformers objects, so workers never import transformers
    weights: str | None
    seed: int
    device: str
    num_blocks: int
    backend: str
    cuda_graphs: bool = True  # replay decode and small prefill / mixed steps as CUDA graphs (CUDA ranks only)
    all_reduce: str = "auto"  # small all-reduces: symmetric memory's one-shot kernel where it works, or "nccl"

    def __post_init__(self) -> None:
        if self.all_reduce not in ALL_REDUCE:
            raise UserError(f"all_reduce '{self.all_reduce}': choose one of {', '.join(ALL_REDUCE)}")


@dataclass
class RankLink:
    """A spawned rank's channels (``executors.channel``): it is reader ``reader`` of its replica's
    step channel; the replica's reporting rank also writes the outputs channel."""

    steps: ChannelSpec
    reader: int
    outs: ChannelSpec | None = None


_ALIGN = 64  # out-of-band buffers start at multiples of this in a frame (arrays over them stay aligned)


def to_frame(obj: Any) -> list[Any]:
    """What travels between the driver and the ranks (steps, outputs, encode jobs): pickle 5 with
    the bytes of contiguous arrays (image pixels, index arrays) out of band, as a list of parts to
    be written one after the other::

        [n u32 | pickle length u64 | n buffer lengths u64] [pickle] ([pad] [buffer]) x n

    each buffer padded to start at a multiple of 64 bytes. Written into a channel slot, the pixels
    are copied once (``Channel.send`` writes the parts in place), not once into the pickle and once
    more into the slot."""
    bufs: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    raws = [b.raw() for b in bufs]
    parts: list[Any] = [struct.pack(f"<I{len(raws) + 1}Q", len(raws), len(head), *(r.nbytes for r in raws)), head]
    off = sum(len(p) for p in parts)
    for r in raws:
        pad = -off % _ALIGN
        parts += [bytes(pad), r]
        off += pad + r.nbytes
    return parts


def to_bytes(obj: Any) -> bytes:
    """``to_frame`` joined into one bytes object (queues, torchrun's object collectives)."""
    return b"".join(to_frame(obj))


def from_bytes(b: bytes | bytearray | memoryview) -> Any:
    """The object of a ``to_frame`` message. Arrays unpickled from it are views of ``b`` (copied
    into a bytearray first when ``b`` is read-only, so that tensors made from them are writable)."""
    mv = memoryview(b)
    (n,) = struct.unpack_from("<I", mv, 0)
    lens = struct.unpack_from(f"<{n + 1}Q", mv, 4)
    if n and mv.readonly:
        mv = memoryview(bytearray(mv))
    off = 4 + 8 * (n + 1)
    head = mv[off: off + lens[0]]
    off += lens[0]
    bufs = []
    for length in lens[1:]:
        off += -off % _ALIGN
        bufs.append(mv[off: off + length])
        off += length
    return pickle.loads(head, buffers=bufs)


def make_source(spec: WorkerSpec, args: Any) -> WeightSource:
    if spec.weights:
        return open_weights(spec.weights)
    return RandomSource(checkpoint_shapes(args), seed=spec.seed)


def rank_device(spec: WorkerSpec, rank: int) -> torch.device:
    if spec.device.startswith("cuda"):
        n = torch.cuda.device_count()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % max(1, n))
    return torch.device("cpu")


def settle_heap() -> None:
    """Collect garbage once and move every object that survives into the permanent generation
    (``gc.freeze``), so later collections never scan it. A loaded, warmed-up engine holds ~10^6
    container objects (modules, compiled graphs and their guards, captured graphs): on a CPU core
    a full collection of a tiny compiled model's heap took 250 ms, and one triggered inside a step
    stalls the host that launches it. Settled, a traced serving run on one H200 paused at most 5.2 ms
    a step for the collector (``gc_ms`` in bench/results/fidelity_2gpu.vl_single.steps.json.gz).
    Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


class RankRunner:
    """Builds the stage model for one rank and runs steps on it."""

    def __init__(self, spec: WorkerSpec, par: Par, src: WeightSource | None = None):
        plan = Plan.model_validate_json(spec.plan_json)
        args = spec.args
        dtype, kv_dtype, fp8 = run_dtypes(plan)
        if par.device.type == "cuda":
            # a GPU step's host work is many tiny CPU ops, and torch's parallel CPU kernels (fill_ of a
            # graph's 33k-entry block table, repeat_interleave) woke every thread for them: 12-21 ms a
            # mixed step on a 32-core host (bench/results/shift_crossover.profile_mixed.md)
            torch.set_num_threads(1)
        self.par, self.plan = par, plan
        self.model = StageModel(plan, plan.stages[par.pp_i], args, par, src or make_source(spec, args), dtype,
                                kv_dtype, spec.num_blocks * plan.scheduler.block_size, fp8, spec.all_reduce)
        self.hidden, self.dtype = args.hidden, dtype
        from executors.backends import apply_backend

        apply_backend(self.model, spec.backend)
        self.last_sampled: torch.Tensor | None = None  # the last step's sampled tokens, on the device
        self.graphs = self.mixed_graphs = None
        if spec.cuda_graphs and par.device.type == "cuda" and self.model.caches:
            from executors.graphs import DecodeGraphs, MixedGraphs

            sch = plan.scheduler
            max_keys = min(args.max_positions, spec.num_blocks * sch.block_size)  # the longest context it can hold
            self.graphs = DecodeGraphs(self.model, sch.max_seqs, max_keys)
            self.mixed_graphs = MixedGraphs(self.model, sch.max_batch_tokens, sch.max_seqs, self.graphs, max_keys)
        # a whole tower on this GPU replays CUDA graphs; a TP-sharded one (its all-reduces in the
        # graph not yet run on two GPUs) stays launched
        if spec.cuda_graphs and par.device.type == "cuda" and self.model.vision is not None and self.model.vision_tp == 1:
            self.model.tower = TowerGraphs(self.model.vision)

    @property
    def reports(self) -> bool:
        """The replica's last stage, shift rank 0: sends the sampled tokens to the driver."""
        return self.par.pp_i == self.par.pp - 1 and self.par.r == 0

    @property
    def samples(self) -> bool:
        """Keeps the step's sampled tokens on the device (``last_sampled``) for a look-ahead step's
        input (``Step.tokens_from``): every rank of a single-stage replica. Each holds the whole
        logits (the lm_head's vocab shards all-gathered, so bit-identical on every rank) and sampling
        is a function of them and of (seed, request, position) alone, so all ranks sample the same
        tokens. Under PP only the reporting rank samples (stage 0 takes no look-ahead steps)."""
        return self.reports or self.par.pp == 1

    def finish_warm_up(self) -> None:
        """The end of ``Engine.warm_up`` on this rank: cuDNN's plans for whole prompts at the stage's
        attention shapes (``StageModel.warm_attention``), every decode and mixed graph bucket not yet
        captured (``capture_all``, for each weight layout the stage holds), then the heap settled
        (``settle_heap``)."""
        self.model.warm_attention()
        if self.graphs is not None:  # a stage with layers (it holds KV caches)
            modes = tuple(self.model.layers[0].layouts)
            with torch.inference_mode():
                self.graphs.capture_all(modes)
                self.mixed_graphs.capture_all(modes)
        settle_heap()

    def run(self, step: Step) -> StepOut | None:
        launched = self.launch(step)
        return launched.out() if launched is not None else None

    @torch.inference_mode()
    def launch(self, step: Step, unpickle_ms: float = 0.0) -> "Launched | None":
        """Queue the step's work (on a GPU nothing waits for it); the reporting rank's sampled tokens
        stay on the device until ``Launched.out()`` reads them. A traced step (``Step.trace``) marks
        the end of each phase (``executors.trace.RankTimer``; ``unpickle_ms``: receiving it)."""
        par = self.par
        if step.end_warm_up:
            self.finish_warm_up()
        timer = RankTimer(par.device, unpickle_ms, allocator=not all(mb.decode for mb in step.micro)) if step.trace else None
        self.model.forget(step.free)
        self.model.receive_images(step.image_jobs)
        if timer:
            timer.mark()
        if step.tokens_from is not None:  # pending input tokens: the previous step's samples, never on the host
            step.micro[0].tokens = self._input_tokens(step.micro[0], step.tokens_from)
        outs, pending = [], []
        for mb in step.micro:
            h_in = None
            if par.prev_rank is not None:
                h_in = torch.empty(mb.num_tokens, self.hidden, dtype=self.dtype, device=par.device)
                dist.recv(h_in, src=par.prev_rank)
            y = self._forward(mb, h_in)
            if par.next_rank is not None:
                y = y.contiguous()
                pending.append((dist.isend(y, dst=par.next_rank), y))
            else:
                outs.append(y)
        for work, _ in pending:
            work.wait()
        if timer:
            timer.mark()
        if not self.samples:
            return None
        logits = torch.cat(outs) if outs else torch.zeros(0, self.model.a.vocab)
        reqs = [r for mb in step.micro for r in mb.sample_req]
        pos = [p + 1 for mb in step.micro for p in mb.tok_idx[mb.sample_idx].tolist()]
        keys = [row_key(step.seed, r - step.req_base, p) for r, p in zip(reqs, pos)] if step.temperature > 0 else []
        self.last_sampled = sample(logits, step.temperature, step.top_k, keys)
        if not self.reports:
            return None
        if timer:
            timer.mark()
        return Launched.start(StepOut(step.step_id, par.dp_i, reqs, [], logits.cpu() if step.want_logits else None,
                                      [m for mb in step.micro for m in (mb.modes or [mb.mode])], self.captures()),
                              self.last_sampled, timer)

    def _input_tokens(self, mb: MicroBatch, rows: list[int]) -> torch.Tensor:
        """``[T]`` the look-ahead micro-batch's input tokens on the device, queued behind the last
        step: sampled row ``j``'s token (at ``mb.sample_idx[j]``) is ``last_sampled[rows[j]]`` where
        ``rows[j] >= 0`` (a token pending when the step was sent), else the host's (a prompt's last
        chunk). A decode step whose every row is pending is a gather of the samples."""
        prev = self.last_sampled
        if mb.decode and min(rows, default=0) >= 0:
            same = rows == list(range(len(rows)))
            return prev[:len(rows)] if same else prev[to_device(rows, prev.device)]
        at = [i for i, r in zip(mb.sample_idx.tolist(), rows) if r >= 0]
        src = [r for r in rows if r >= 0]
        T, k = mb.num_tokens, len(at)
        dev = to_device(torch.cat([mb.tokens, torch.tensor(at + src, dtype=torch.long)]), prev.device)
        tokens = dev[:T]
        tokens[dev[T:T + k]] = prev[dev[T + k:]].to(tokens.dtype)
        return tokens

    def captures(self) -> dict[str, float] | None:
        """CUDA graphs captured so far on this rank and the wall time their captures took (None
        without graphs)."""
        if self.graphs is None:
            return None
        tower = self.model.tower if isinstance(self.model.tower, TowerGraphs) else None
        return {"decode": len(self.graphs.graphs), "mixed": len(self.mixed_graphs.graphs),
                "tower": len(tower.graphs) if tower else 0,
                "capture_s": round(self.graphs.capture_s + self.mixed_graphs.capture_s + (tower.capture_s if tower else 0), 3)}

    def _graphs_of(self, mb: MicroBatch) -> tuple[Any, str]:
        """The step graphs that replay ``mb`` (None: it runs eagerly) and its mode on this stage."""
        mode = mb.mode_of(self.model.stage.index) if self.par.sp > 1 else "tp"
        for graphs in (self.graphs, self.mixed_graphs):
            if graphs is not None and graphs.accepts(mb, mode):
                return graphs, mode
        return None, mode

    def _forward(self, mb: MicroBatch, h_in: torch.Tensor | None) -> torch.Tensor:
        """A decode micro-batch, or a small prefill or mixed one, replays its CUDA graph (plain TP, or
        SP x TP over the LL all-to-all); any other runs eagerly."""
        graphs, mode = self._graphs_of(mb)
        return graphs.run(mb, h_in, mode) if graphs is not None else self.model.forward(mb, h_in)


@dataclass
class Launched:
    """A step whose sampled tokens may still be computing (``out`` waits for them).

    On a GPU the tokens' copy to pinned host memory is queued right behind the sampling, with an
    event after it: ``out`` waits for that event only, so reading this step's tokens never waits
    for a step queued after it (a plain ``.tolist()`` would: it is ordered behind all queued work)."""

    head: StepOut  # every field but the tokens
    sampled: torch.Tensor  # [S] on the logits' device
    host: torch.Tensor | None = None  # [S] pinned copy being filled (GPU)
    copied: Any = None  # torch.cuda.Event recorded after the copy (GPU)
    timer: RankTimer | None = None  # a traced step's phase marks

    @staticmethod
    def start(head: StepOut, sampled: torch.Tensor, timer: RankTimer | None = None) -> "Launched":
        if not sampled.is_cuda:
            return Launched(head, sampled, timer=timer)
        host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
        host.copy_(sampled, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return Launched(head, sampled, host, copied, timer)

    def done(self) -> bool:
        """The tokens have reached the host: ``out`` would not wait."""
        return self.copied is None or self.copied.query()

    def out(self) -> StepOut:
        t = time.perf_counter()
        if self.copied is not None:
            self.copied.synchronize()
            self.head.tokens = self.host.tolist()
        else:
            self.head.tokens = self.sampled.tolist()
        if self.timer is not None:
            self.head.timing = self.timer.timing((time.perf_counter() - t) * 1e3)
        return self.head


def encoder_server(spec: WorkerSpec, device: torch.device) -> EncoderServer:
    """A dedicated encoder rank's tower: whole on its GPU, in the plan's weight dtype, its blocks
    compiled and replayed as CUDA graphs as the LLM ranks' towers are (``executors.backends.compile_tower``,
    ``executors.tower_graphs``)."""
    from executors.backends import compile_tower

    plan = Plan.model_validate_json(spec.plan_json)
    tower = load_tower(spec.args.vision, make_source(spec, spec.args), run_dtypes(plan)[0], device)
    compile_tower(tower, spec.backend)
    if spec.cuda_graphs and device.type == "cuda":
        return EncoderServer(torch.inference_mode()(TowerGraphs(tower)))
    return EncoderServer(torch.inference_mode()(tower.__call__))


def serve_steps(runner: RankRunner, steps: Channel, report: Callable[[Launched], None],
                overflow: Callable[[], bytes], check: Callable[[], None] | None = None) -> None:
    """Run steps from ``steps`` in order until the end marker, reporting each launched step's
    tokens (the reporting rank; other ranks' launches return None). Before reading a step's
    tokens (a wait for the device), a next step already sent is launched first: the driver sends
    one only as a look-ahead step, whose input tokens come from this step's samples on the device,
    so the device queues it behind this one. The next step is waited for until this step's tokens
    have reached the host (``Launched.done``; on CPU: one look, they are there at launch); then
    this step is reported and the next one read as usual. A launch does not wait for the device (its
    host tensors go up page-locked, ``batch.to_device``; ``bench/host_waits.py`` finds no such wait
    on one GPU), so launching first leaves the GPU no gap
    between the two steps, and delays this step's report by the launch's host time at most. Reports
    leave in step order; a step still held at the end marker is dropped (the driver is shutting down).
    ``check`` is called every ``channel.CHECK_S`` while a step is waited for (``exit_if_driver_gone``)."""
    held: Launched | None = None  # launched, tokens not reported yet
    while True:
        if held is None:
            msg = steps.recv(check=check, overflow=overflow)
        else:
            got, msg = _next_while_busy(steps, held, overflow)
            if not got:
                report(held)
                held = None
                continue
        if msg is None:
            return
        t = time.perf_counter()
        step = from_bytes(msg)
        unpickle_ms = (time.perf_counter() - t) * 1e3
        launched = runner.launch(step, unpickle_ms=unpickle_ms)
        if held is not None:
            report(held)
        held = launched


def _next_while_busy(steps: Channel, held: Launched, overflow: Callable[[], bytes]) -> tuple[bool, bytes | None]:
    """``(True, message)`` if the next step arrives before ``held``'s tokens reach the host, else
    ``(False, None)``."""
    backoff = Backoff(steps.polling)
    while True:
        got, msg = steps.poll(overflow=overflow)
        if got or held.done():
            return got, msg
        backoff.pause()


def _get(q: Any) -> Any:
    """The next message of queue ``q``, checking on the driver while none comes."""
    while True:
        try:
            return q.get(timeout=CHECK_S)
        except queue.Empty:
            exit_if_driver_gone()


def exit_if_driver_gone() -> None:
    """A spawned rank whose driver has ended without stopping it (killed by a signal, the OOM killer)
    exits, rather than idling on as an orphan that holds its GPU's memory. The driver's end shows on
    ``multiprocessing.parent_process()``'s sentinel: a pipe whose write end only the process that
    started this one holds (forkserver and spawn children alike)."""
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        os._exit(DRIVER_GONE_EXIT)


def run_rank(rank: int, world: int, init_method: str, spec: WorkerSpec, cmd_q: Any, res_q: Any,
             link: RankLink | None = None) -> None:
    """Process entry point of a spawned rank. Steps arrive on ``link.steps`` (one too large for
    a slot comes on ``cmd_q``), outputs leave on ``link.outs`` (or ``res_q`` when too large);
    readiness, errors and encoder messages use the queues."""
    torch.set_num_threads(1)
    try:
        dev = rank_device(spec, rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        plan = Plan.model_validate_json(spec.plan_json)
        par = build_par(plan.mesh, rank, dev)
        if par is None:  # a dedicated encoder rank
            server = encoder_server(spec, dev)
            res_q.put(("ready", rank, None))
            while (msg := _get(cmd_q)) is not None:
                req, pixels, grid, dst = from_bytes(msg)
                server.serve(req, pixels, grid, dst)
                res_q.put(("encoded", rank, req))
        else:
            runner = RankRunner(spec, par)
            polling = Polling.for_device(dev.type == "cuda")
            steps = Channel(link.steps, link.reader, polling)
            outs = Channel(link.outs, polling=polling) if link.outs is not None else None
            res_q.put(("ready", rank, None))

            def report(launched: Launched) -> None:
                blob = to_bytes(launched.out())
                if outs is None or not outs.send(blob):
                    res_q.put(("out", rank, blob))

            serve_steps(runner, steps, report, cmd_q.get, check=exit_if_driver_gone)
            where = os.environ.get("SHIFTPLAN_GRAPH_PROFILE")  # a diagnosis: DIR gets rank<r>.json at shutdown
            if where and runner.graphs is not None:
                from executors.graphs import profile

                Path(where).mkdir(parents=True, exist_ok=True)
                (Path(where) / f"rank{rank}.json").write_text(json.dumps(profile(runner.graphs), indent=1) + "\n")
    except BaseException as e:  # report, then exit non-zero: the driver stops every rank
        res_q.put(("error", rank, f"{describe(e)}\n{traceback.format_exc()}"))
        res_q.close()
        res_q.join_thread()
        os._exit(1)
    try:
        dist.destroy_process_group()
    except Exception:
        pass
