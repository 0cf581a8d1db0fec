"""The driver: spawn one worker per rank, schedule requests, collect tokens.

``load(plan)`` returns an ``Engine`` (a context manager). The driver runs one ``Scheduler`` per
DP replica, or per lane of a pipelined replica (``lanes``); each step it packs the scheduled chunks
into micro-batches, picks the mode of each (shift: ``tp`` when its tokens <= the plan's threshold, else
``sp_tp``), sends the step to the replica's ranks and waits for the sampled tokens (both through
shared-memory channels, ``executors.channel``; errors and deaths are watched while waiting). A
single-rank plan runs in this process. With ``lookahead`` on and single-stage replicas (pp = 1; any
tp, sp, shift, dp), while a replica's step computes its next one (decodes, prompt chunks, or both) is
already scheduled, packed and sent, its pending input tokens taken on the device from the last step's
samples (``Engine._look_ahead``;
every rank of the replica samples, and a spawned rank launches a step already sent before it reads
the last one's tokens: ``worker.serve_steps``). A worker that fails or dies stops the whole engine:
every rank is terminated and ``WorkerError`` names the rank and its error.

With ``vision.placement: dedicated`` the world has ``dedicated_gpus`` encoder ranks after the
mesh: the driver hands each image request to the least-loaded one when it arrives, and admits
the request to its replica's scheduler once that encoder reports it encoded (the embeddings
travel encoder -> stage 0 point-to-point; ``executors.encoders``).
"""

from __future__ import annotations

import os
import queue
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from executors.backends import check_backend
from executors.batch import ImageJob, Step, StepOut, grid_patches
from executors.channel import CHECK_S, DEFAULT_CAPACITY, Backoff, Channel, Polling
from executors.config import (ModelArgs, check_checkpoint_config, limit_context, model_args, plan_config,
                              run_dtypes)
from executors.fits import check_fits
from executors.parallel import Par, reporting_rank
from executors.requests import Request, Result, Sampling, make_seq
from executors.scheduler import Chunk, Scheduler, Seq, build_microbatch
from executors.trace import step_record
from executors.weights import WeightSource
from executors.worker import Launched, RankLink, RankRunner, WorkerSpec, from_bytes, run_rank, to_bytes, to_frame
from plans.engine_shapes import LOOKAHEAD_MAX_TOKENS
from plans.errors import UserError, first_line
from plans.schema import Plan

DEAD_RANK_GRACE_S = 2.0
STEP_TIMEOUT_S = 600.0  # ranks that answer no step for this long are stuck (SHIFTPLAN_STEP_TIMEOUT_S)


def step_timeout_s() -> float:
    """How long a step may go unanswered before the ranks count as stuck: ``SHIFTPLAN_STEP_TIMEOUT_S``,
    else ``STEP_TIMEOUT_S`` (spawned ranks: ``Engine._receive``; torchrun: ``Liveness.awaiting``)."""
    return float(os.environ.get("SHIFTPLAN_STEP_TIMEOUT_S", STEP_TIMEOUT_S))


class WorkerError(UserError):
    """A rank failed or died; the engine has stopped every rank. ``details``: the rank's traceback."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def free_port() -> int:
    """A free TCP port on the loopback address (a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_state(pid: int | None) -> str:
    """A process's state letter from ``/proc`` (``T``: stopped), or "" where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def check_mesh(plan: Plan, a: ModelArgs) -> None:
    """Fail before any process starts when the mesh cannot split this model, or the plan and the
    config disagree on the vision tower (UserError with figures)."""
    plan.dims().check_model(a.heads, a.kv_heads, a.intermediate)
    depth = a.vision.depth if a.vision is not None else 0
    if (depth > 0) != (plan.model.vision_blocks > 0):  # Stage.vision follows from vision_blocks
        raise UserError(f"plan {plan.name}: model.vision_blocks = {plan.model.vision_blocks} but the model config's "
                        f"vision tower has {depth} blocks")


def dedicated_encoders(plan: Plan, a: ModelArgs) -> int:
    """Encoder ranks beside the LLM mesh: the plan's ``dedicated_gpus`` when it places a VL
    model's encoder on GPUs of its own, else 0 (``ParallelDims.encoder_gpus``)."""
    return plan.dims().encoder_gpus if a.vision is not None else 0


def default_blocks(plan: Plan, a: ModelArgs) -> int:
    """KV blocks per replica: the plan's KV capacity, capped at max_seqs full-context sequences."""
    sch = plan.scheduler
    cap = -(-sch.max_seqs * a.max_positions // sch.block_size)
    want = -(-plan.memory_gb.kv_tokens // sch.block_size) if plan.memory_gb.kv_tokens > 0 else cap
    return max(1, min(want, cap, 1 << 16))


@dataclass
class StreamRun:
    """One ``Engine.stream`` call's bookkeeping, read and written by the engine's round handlers."""

    scheds: list[Scheduler]  # lane l of replica r is scheds[r * lanes + l]
    results: list[Result]  # by request index
    base: int  # engine-wide id of request 0 (worker state never mixes calls)
    sampling: Sampling
    seqs: dict[int, Seq] = field(default_factory=dict)  # by engine-wide request id
    logits: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # kept per request (keep_logits)
    pending: list[tuple[float, int, Seq]] = field(default_factory=list)  # (arrival, lane, sequence), the next arrival last
    held: dict[int, tuple[int, Seq]] = field(default_factory=dict)  # dedicated encoding under way: request -> (lane, seq)
    in_flight: dict[int, tuple[int, list[Chunk], Step]] = field(default_factory=dict)  # step id -> (lane, its chunks, the step)
    ahead: set[int] = field(default_factory=set)  # steps in flight whose successor is queued: their tokens are placeholders
    ended: set[int] = field(default_factory=set)  # requests finished while a look-ahead step still computes them


class Engine:
    local_ranks = True  # every rank runs on this machine (torchrun's engine: False)

    def __init__(self, plan: Plan, config: dict, weights: str | Path | WeightSource | None = None,
                 device: str = "cpu", backend: str | None = None, kv_blocks: int | None = None,
                 keep_logits: bool = False, seed: int = 0, tokenizer: Any = None, cuda_graphs: bool = True,
                 lookahead: bool = True, all_reduce: str = "auto", trace: bool = False,
                 max_context: int | None = None):
        self.plan = plan.check()
        self.dims = plan.dims()
        self.args = limit_context(model_args(config), max_context)
        if self.args.layers != plan.model.num_layers:
            raise UserError(f"plan {plan.name} has {plan.model.num_layers} layers but the model config has {self.args.layers}")
        check_mesh(plan, self.args)
        self.pixel_dtype = run_dtypes(plan)[0]  # images travel to the ranks in the tower's dtype
        self.keep_logits, self.tokenizer = keep_logits, tokenizer
        self.num_blocks = kv_blocks or default_blocks(plan, self.args)
        self.block = plan.scheduler.block_size
        self.backend = check_backend(backend or plan.backend)
        self.encoders = dedicated_encoders(plan, self.args)
        self.world = plan.mesh.size + self.encoders  # encoder ranks come after the LLM mesh
        if device.startswith("cuda"):
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            need = max(1, min(self.world, plan.hardware.gpus_per_node))  # ranks on this node
            if n < need:
                raise UserError(f"plan {plan.name} needs {need} GPU(s) on this node; {n} visible "
                                "(use --device cpu for a CPU run)")
        elif device != "cpu":
            raise UserError(f"device '{device}': use cpu or cuda")
        check_fits(plan, self.args, self.num_blocks, device, local_ranks=self.local_ranks)
        if isinstance(weights, (str, Path)):
            check_checkpoint_config(self.args, weights, plan)
        src = weights if (weights is not None and not isinstance(weights, (str, Path))) else None
        self.spec = WorkerSpec(plan.model_dump_json(), self.args.portable(), str(weights) if isinstance(weights, (str, Path)) else None,
                               seed, device, self.num_blocks, self.backend, cuda_graphs, all_reduce)
        self.procs: list[Any] = []
        # Pipeline micro-batches in flight per replica, each with its own scheduler (a lane) and one
        # micro-batch per step: a lane's step overlaps the other lanes' on the other stages. Spawned
        # ranks only: torchrun's ranks run rounds in lock step (``lock_step``), and embeddings from
        # dedicated encoders reach stage 0 in the order requests are admitted, which lanes would break.
        self.lanes = max(plan.mesh.pp, plan.scheduler.microbatches) if plan.mesh.pp > 1 and not self.encoders else 1
        self.lock_step = False  # send a round only once every step in flight has answered
        self.peak_in_flight = 0  # most steps in flight at once (lanes and replicas overlapping)
        self.unanswered = [0] * plan.mesh.dp  # steps sent to each spawned replica, not yet answered
        # the last answer, or the send that found none in flight: ``_receive`` stops every rank when no
        # step has been answered for ``step_timeout_s`` (a rank alive but stuck: a kernel spinning on a
        # peer's flag, a stopped process), which no check on the processes' exits would see
        self.progress_t = time.perf_counter()
        self.step_timeout_s = step_timeout_s()
        self.launched: list[Launched] = []  # steps the single-rank engine has queued, tokens not read yet
        # single-stage replicas: queue the next decode step before reading this one's tokens (its input
        # tokens are taken from the device), so the host's work for a step overlaps the GPU's for the last
        self.lookahead = lookahead
        self.lookahead_steps = 0  # steps queued before the previous step's tokens were read
        self.early: list[tuple] = []  # queue messages read while checking on the ranks
        self.local: RankRunner | None = None
        self.step_id = 0
        self.closed = False
        self.mode_counts: dict[str, int] = {"tp": 0, "sp_tp": 0}  # micro-batches run in each mode
        self.rank_graphs: dict[int, dict[str, float] | None] = {}  # per replica: its reporting rank's graph captures
        # executors.trace: a record a step when tracing (None: off); the steps sent, by id, until answered
        self.step_trace: list[dict[str, Any]] | None = [] if trace else None
        self._traced: dict[int, dict[str, Any]] = {}
        self.clock0 = time.perf_counter()  # the current stream's clock (arrivals, the trace): ``stream``
        self.next_req = 0
        self.pending_free: list[list[int]] = [[] for _ in range(plan.mesh.dp)]
        self.encoded: list[int] = []  # requests a dedicated encoder has finished, not yet admitted
        self.encoder_jobs = [0] * self.encoders  # requests each encoder has encoded
        self.encoding: dict[int, tuple[int, int]] = {}  # request -> (encoder index, patches), under way
        if self.world == 1:
            dev = torch.device(device)
            self.local = RankRunner(self.spec, Par(device=dev), src)
            self.lanes = 1
        else:
            if src is not None:
                raise UserError("an in-memory weight source works with single-rank plans only; give a safetensors directory")
            self._spawn()

    # ------------------------------------------------------------------ processes
    def _spawn(self) -> None:
        import torch.multiprocessing as mp

        try:  # a fork server imports torch once per driver process; workers fork from it
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["executors.worker"])
        except ValueError:
            ctx = mp.get_context("spawn")
        self.res_q = ctx.Queue()
        self.cmd_q = [ctx.Queue() for _ in range(self.world)]
        self.polling = Polling.for_device(self.spec.device.startswith("cuda"))
        links: dict[int, RankLink] = {}
        self.step_ch, self.out_ch = [], []  # per replica: driver -> its ranks, reporting rank -> driver
        for rep in range(self.plan.mesh.dp):
            ranks = self.dims.replica_ranks(rep)
            steps, outs = Channel.create(readers=len(ranks), capacity=self._step_capacity()), Channel.create(readers=1)
            self.step_ch.append(Channel(steps, polling=self.polling))
            self.out_ch.append(Channel(outs, reader=0, polling=self.polling))
            for i, r in enumerate(ranks):
                links[r] = RankLink(steps, i, outs if r == reporting_rank(self.plan.mesh, rep) else None)
        init = f"tcp://127.0.0.1:{free_port()}"
        for r in range(self.world):
            p = ctx.Process(target=run_rank, args=(r, self.world, init, self.spec, self.cmd_q[r], self.res_q, links.get(r)),
                            daemon=True)
            p.start()
            self.procs.append(p)
        ready = 0
        while ready < self.world:
            kind, rank, payload = self._get()
            if kind == "ready":
                ready += 1
        for ch in self.step_ch + self.out_ch:  # every rank has mapped its channels: nothing left to leak
            Channel.unlink(ch.spec)

    def _step_capacity(self) -> int:
        """Bytes a step channel's slot holds: the default, and for a plan with images room for the
        pixels of a step full of image tokens (``max_batch_tokens`` of them, ``merge^2`` patches
        each; Qwen2-VL at 8,192 tokens: 77 MB of bf16), so that such steps are written in place
        (``executors.channel``)."""
        v = self.args.vision
        if v is None:
            return DEFAULT_CAPACITY
        pixels = self.plan.scheduler.max_batch_tokens * v.merge**2 * v.patch_dim * self.pixel_dtype.itemsize
        return DEFAULT_CAPACITY + pixels

    def _get(self) -> tuple[str, int, Any]:
        """Next worker message; on an error or a dead rank, stop everything and raise."""
        while True:
            try:
                msg = self.res_q.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    self._fail(None, dead)
                continue
            if msg[0] == "error":
                self._fail(msg, [])
            return msg

    def _check(self) -> None:
        """Raise (after stopping every rank) if a rank reported an error or died."""
        try:
            while True:
                msg = self.res_q.get_nowait()
                if msg[0] == "error":
                    self._fail(msg, [])
                self.early.append(msg)  # an output or encoder report: the caller takes it
        except queue.Empty:
            pass
        dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
        if dead:
            self._fail(None, dead)

    def _fail(self, first_error: tuple | None, dead: list[tuple[int, int]]) -> None:
        """Gather what the ranks say for a moment, stop them all, raise naming the culprit."""
        errors = [first_error] if first_error else []
        end = time.monotonic() + DEAD_RANK_GRACE_S
        while time.monotonic() < end:
            try:
                m = self.res_q.get(timeout=0.1)
                if m[0] == "error":
                    errors.append(m)
            except queue.Empty:
                pass
        reported = {e[1] for e in errors}
        dead = [(r, p.exitcode) for r, p in enumerate(self.procs) if p.exitcode not in (None, 0, 1) or
                (not p.is_alive() and r not in reported)]
        self.shutdown(force=True)
        if dead and dead[0][0] not in reported:
            r, code = dead[0]
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise WorkerError(f"{self._role(r)} rank {r} died ({how}); all {self.world} ranks were stopped")
        r, text = errors[0][1], errors[0][2]
        raise WorkerError(f"{self._role(r)} rank {r} failed: {first_line(text, 'an error')}; all {self.world} ranks were "
                          "stopped", details=text)

    def _stuck(self, silent_s: float) -> None:
        """No step answered for ``silent_s``, every rank alive: stop them all, raise naming the replicas
        waited for and any rank the kernel reports stopped."""
        waiting = [rep for rep, n in enumerate(self.unanswered) if n]
        ranks = [r for rep in waiting for r in self.dims.replica_ranks(rep)]
        stopped = [r for r in ranks if _process_state(self.procs[r].pid) in ("T", "t")]
        who = f"{self._role(stopped[0])} rank {stopped[0]} is stopped" if stopped else \
            "a rank is stuck (a kernel or collective waiting on a peer?)"
        self.shutdown(force=True)
        raise WorkerError(f"no step answered for {silent_s:.0f} s by replica {', '.join(map(str, waiting))} "
                          f"(ranks {', '.join(map(str, ranks))}), though every rank is alive: {who}; all {self.world} "
                          f"ranks were stopped (SHIFTPLAN_STEP_TIMEOUT_S sets the limit, now {self.step_timeout_s:g} s)")

    def _role(self, rank: int) -> str:
        return "encoder" if rank >= self.plan.mesh.size else "worker"

    def shutdown(self, force: bool = False) -> None:
        """Stop every worker: ask politely (unless ``force``), then terminate, then kill. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for ch in getattr(self, "step_ch", []):
            try:
                ch.send(None, timeout=0.0 if force else 1.0)
            except Exception:
                pass
        for q in getattr(self, "cmd_q", []):
            try:
                q.put(None)
                q.cancel_join_thread()  # a dead rank's full pipe must not block this process's exit
            except Exception:
                pass
        end = time.monotonic() + (0.0 if force else 5.0)
        for p in self.procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=3.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=3.0)
        for ch in getattr(self, "step_ch", []) + getattr(self, "out_ch", []):
            ch.close()
            Channel.unlink(ch.spec)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # ------------------------------------------------------------------ stepping
    def _mode(self, tokens: int, stage: int = 0) -> str:
        """SP x TP or TP for a micro-batch of ``tokens`` on a stage (``ParallelDims.mode_for``)."""
        return self.dims.mode_for(tokens, stage)

    def _micro(self, chunks: list[Chunk]) -> list:
        m = 1 if self.lanes > 1 else max(1, min(self.plan.scheduler.microbatches, len(chunks)))
        groups = [chunks[i::m] for i in range(m)] if m > 1 else [chunks]
        out = []
        for g in groups:
            n = sum(c.n for c in g)
            mb = build_microbatch(g, self._mode(n), self.block, self.args.image_token_id)
            mb.modes = [self._mode(n, s) for s in range(len(self.plan.stages))]
            out.append(mb)
        return out

    def _dispatch(self, steps: dict[int, Step]) -> dict[int, StepOut]:
        """Run one step on each DP replica named in ``steps``; return each replica's output."""
        self._send(steps)
        outs = [self._receive() for _ in steps]
        return {o.replica: o for o in outs}

    def _send(self, steps: dict[int, Step]) -> None:
        """Start one step on each replica named in ``steps`` (answers come from ``_receive``)."""
        tracing = self.step_trace is not None
        for rep, st in steps.items():
            st.trace = tracing
            t = time.perf_counter()
            if self.local is not None:
                self.launched.append(self.local.launch(st))
                nbytes, queued, sent = 0, False, t
            else:
                frame = to_frame(st)
                queued = not self.step_ch[rep].send(frame, check=self._check)
                if queued:  # too large for a slot and no shared memory for a side file: by queue
                    blob = b"".join(frame)
                    for r in self.dims.replica_ranks(rep):
                        self.cmd_q[r].put(blob)
                if not any(self.unanswered):
                    self.progress_t = time.perf_counter()
                self.unanswered[rep] += 1
                nbytes, sent = sum(memoryview(p).nbytes for p in frame), time.perf_counter()
            if tracing:
                self._traced[st.step_id] = step_record(st, rep, (t - self.clock0) * 1e3, (sent - t) * 1e3, nbytes, queued)

    def _traced_answer(self, o: StepOut) -> None:
        """A step's answer: its trace record, if it has one, completed (``executors.trace``)."""
        rec = self._traced.pop(o.step_id, None)
        if rec is not None:
            rec["answered_ms"] = round((time.perf_counter() - self.clock0) * 1e3, 3)
            rec["rank"] = o.timing
            self.step_trace.append(rec)

    def _receive(self) -> StepOut:
        """The next answer of any replica with a step in flight (each replica answers in order)."""
        if self.local is not None:
            return self.launched.pop(0).out()
        backoff, last = Backoff(self.polling), time.perf_counter()
        while True:
            while self.early:  # queue messages met while checking on the ranks
                kind, _rank, payload = self.early.pop(0)
                if kind == "out":
                    o = from_bytes(payload)
                    self.unanswered[o.replica] -= 1
                    self.progress_t = time.perf_counter()
                    return o
                if kind == "encoded":
                    self._encoded(payload)
            for rep, n in enumerate(self.unanswered):
                if n:
                    ok, blob = self.out_ch[rep].poll(overflow=lambda: None)  # too large: comes by res_q
                    if ok and blob is not None:
                        self.unanswered[rep] -= 1
                        self.progress_t = time.perf_counter()
                        return from_bytes(blob)
            backoff.pause()
            if time.perf_counter() - last > min(CHECK_S, 1e-3 + backoff.sleep):
                self._check()
                last = time.perf_counter()
                if last - self.progress_t > self.step_timeout_s:
                    self._stuck(last - self.progress_t)

    # ------------------------------------------------------------------ dedicated encoders
    def _submit_encode(self, replica: int, s: Seq) -> None:
        """Hand a request's images to the least-loaded dedicated encoder, which sends the
        embeddings to the replica's stage-0 ranks (they receive when the request is scheduled)."""
        load = [0] * self.encoders
        for i, patches in self.encoding.values():
            load[i] += patches
        e = min(range(self.encoders), key=lambda i: load[i])
        self.encoding[s.req] = (e, grid_patches(s.image_grid))
        s.encoder = self.plan.mesh.size + e
        dst = list(self.dims.stage_ranks(replica, 0))
        self._send_encode(s.encoder, (s.req, s.image_pixels, s.image_grid, dst))

    def _send_encode(self, rank: int, job: tuple) -> None:
        self.cmd_q[rank].put(to_bytes(job))  # the rank reports "encoded" when done

    def _encoded(self, req: int) -> None:
        e, _patches = self.encoding.pop(req, (None, 0))
        if e is not None:
            self.encoder_jobs[e] += 1
        self.encoded.append(req)

    def _take_encoded(self, wait: bool) -> list[int]:
        """Requests whose images are encoded (``wait``: block for at least one)."""
        while wait and not self.encoded:
            kind, _rank, payload = self._get()
            if kind == "encoded":
                self._encoded(payload)
        out, self.encoded = self.encoded, []
        return out

    def _drain(self, replica: int, seqs: list[Seq]) -> None:
        """Receive and drop embeddings sent for requests that will not run (a stream abandoned
        early), so each encoder -> stage-0 link stays in step."""
        if seqs and not self.closed:
            self.step_id += 1
            jobs = [ImageJob(s.req, None, s.image_grid, s.encoder) for s in seqs]
            self._dispatch({replica: Step(self.step_id, [], free=[s.req for s in seqs], images=jobs)})

    def _look_ahead(self, run: StreamRun, sid: int) -> tuple[int, list[Chunk], Step] | None:
        """A replica's next step, queued before its step ``sid`` (its only one in flight) has given
        its tokens, so the ranks never wait for the driver between steps. Every chunk of step ``sid``
        is taken as computed; a sequence that samples there (a decode, or a prompt's last chunk) is
        advanced by a placeholder token, which the next step takes on the device from the samples of
        step ``sid`` (``Step.tokens_from``: every rank of a single-stage replica keeps its samples).
        The scheduler then forms the step as it would once the tokens were back: decodes, the next
        chunks of prompts, and requests admitted from the queue (those that arrived by now; a later
        one joins the step after). A sequence that the pending token ends by length is left out
        (``Scheduler.schedule``'s ``skip``); one that ends on it by an end-of-sequence token wastes
        one decode, whose output is dropped. Returns the new in-flight entry, or None when the step
        does not qualify (more than ``engine_shapes.LOOKAHEAD_MAX_TOKENS`` tokens: a long step, beside
        which the host time is small and a request arriving during it would wait a step more) or
        nothing is left to schedule."""
        lane, chunks, step = run.in_flight[sid]
        if sid in run.ahead or len(step.micro) != 1 or step.micro[0].num_tokens > LOOKAHEAD_MAX_TOKENS:
            return None
        rows = {r: j for j, r in enumerate(step.micro[0].sample_req)}  # each sampling sequence's row of the pending tokens
        ending = set()
        for c in chunks:
            c.seq.computed += c.n
            if c.seq.req in rows:
                c.seq.tokens.append(-1)  # the pending token
                if c.seq.generated >= c.seq.max_new:
                    ending.add(c.seq.req)
        run.ahead.add(sid)
        nxt, _preempted = run.scheds[lane].schedule(skip=frozenset(ending))
        if not nxt:
            return None
        new = self._new_step(run, lane, nxt)
        tokens_from = [rows.get(r, -1) for r in new.micro[0].sample_req]
        new.tokens_from = tokens_from if max(tokens_from, default=-1) >= 0 else None  # None: no input token is pending
        if int((new.micro[0].tokens < 0).sum()) != len(rows.keys() & set(new.micro[0].sample_req)):
            raise RuntimeError(f"look-ahead step {self.step_id}: a pending token is not a sampled row of the next step")
        self._send({lane // self.lanes: new})
        self.lookahead_steps += 1
        return lane, nxt, new

    def _new_step(self, run: StreamRun, lane: int, chunks: list[Chunk]) -> Step:
        """The step of ``chunks`` for the lane's replica, carrying the requests it finished since its last step."""
        self.step_id += 1
        rep = lane // self.lanes
        s = run.sampling
        step = Step(self.step_id, self._micro(chunks), free=self.pending_free[rep], want_logits=self.keep_logits,
                    temperature=s.temperature, top_k=s.top_k, seed=s.seed, req_base=run.base)
        self.pending_free[rep] = []
        return step

    def _admit(self, run: StreamRun, wait: bool = False) -> None:
        """Requests that have arrived by now join their lane's queue (image requests, with
        dedicated encoders: go to one first), and those whose images are encoded join theirs, in
        the order they finished (``wait``: block for at least one)."""
        now = time.perf_counter() - self.clock0
        while run.pending and run.pending[-1][0] <= now:
            _t, lane, s = run.pending.pop()
            if self.encoders and s.image_grid:
                self._submit_encode(lane // self.lanes, s)
                run.held[s.req] = (lane, s)
            else:
                run.scheds[lane].add(s)
        if run.held:
            for rid in self._take_encoded(wait=wait):
                if rid in run.held:
                    lane, s = run.held.pop(rid)
                    run.scheds[lane].add(s)

    def _form_steps(self, run: StreamRun) -> dict[int, Step]:
        """A step for each replica with a free lane that has work (one step per replica per send;
        under ``lock_step`` none while any step is in flight), entered in flight."""
        busy = {lane for lane, *_ in run.in_flight.values()}
        steps: dict[int, Step] = {}
        for lane, sc in enumerate(run.scheds):
            if lane in busy or lane // self.lanes in steps or (self.lock_step and run.in_flight):
                continue
            chunks, _preempted = sc.schedule()  # their KV is freed; embeddings stay on stage 0
            if chunks:
                step = steps[lane // self.lanes] = self._new_step(run, lane, chunks)
                run.in_flight[step.step_id] = (lane, chunks, step)
        return steps

    def _look_ahead_all(self, run: StreamRun) -> None:
        """What arrived (or was encoded) while the last steps were formed is admitted, then each
        replica with one step in flight gets its next one (``_look_ahead``)."""
        self._admit(run)
        reps = Counter(lane // self.lanes for lane, *_ in run.in_flight.values())
        for sid, (lane, *_) in list(run.in_flight.items()):
            if reps[lane // self.lanes] > 1:  # the replica's next step is in flight already
                continue
            nxt = self._look_ahead(run, sid)
            if nxt is not None:
                run.in_flight[nxt[2].step_id] = nxt

    def _take_answer(self, run: StreamRun, o: StepOut) -> Iterator[tuple[int, int, Result]]:
        """A step's sampled tokens into its sequences and results (a look-ahead step's predecessor
        fills its placeholders); finished requests leave their scheduler. Yields ``stream``'s tuples."""
        self._traced_answer(o)
        lane, chunks, _step = run.in_flight.pop(o.step_id)
        early = o.step_id in run.ahead  # its sequences already advanced, their tokens placeholders
        run.ahead.discard(o.step_id)
        for md in o.mode:
            self.mode_counts[md] += 1
        self.rank_graphs[o.replica] = o.graphs
        if not early:
            for c in chunks:
                c.seq.computed += c.n
        for j, (rid, tok) in enumerate(zip(o.req, o.tokens)):
            if rid in run.ended:  # finished by the step before this look-ahead one
                continue
            s, res = run.seqs[rid], run.results[rid - run.base]
            if early:
                s.tokens[-1] = tok
            else:
                s.tokens.append(tok)
            res.tokens.append(tok)
            if o.logits is not None:
                run.logits[rid].append(o.logits[j])
            if s.generated >= s.max_new or (run.sampling.stop_on_eos and tok in self.args.eos_token_ids):
                run.scheds[lane].finish(s)
                self.pending_free[lane // self.lanes].append(rid)
                if run.in_flight:
                    run.ended.add(rid)
                if self.keep_logits:
                    res.logits = torch.stack(run.logits[rid])
                if self.tokenizer is not None:
                    res.text = self.tokenizer.decode(res.tokens)
            yield rid - run.base, tok, res

    def _end_stream(self, run: StreamRun) -> None:
        """After the loop, or when the caller left early: the answers of steps still running taken,
        embeddings sent for requests that will not run drained, finished requests forgotten locally."""
        if not self.closed:
            for _ in run.in_flight:
                self._traced_answer(self._receive())
        if self.encoders:
            L = self.lanes
            for rep in range(self.plan.mesh.dp):
                lanes = run.scheds[rep * L:(rep + 1) * L]
                self._drain(rep, [s for lane, s in run.held.values() if lane // L == rep] +
                            [s for sc in lanes for s in list(sc.waiting) + sc.running
                             if s.encoder is not None and not s.encoded])

    def stream(self, requests: list[Request], max_new_tokens: int = 16, sampling: Sampling | None = None,
               arrivals: list[float] | None = None) -> Iterator[tuple[int, int | None, Result]]:
        """Yield ``(request index, token, result so far)`` as tokens arrive; a request that fails
        validation yields once with ``token=None`` and ``result.error`` set. ``arrivals``: seconds
        at which each request arrives (default: all at once); a request is admitted to its
        replica's scheduler only then, and an idle engine sleeps until the next arrival. Arrivals
        count from ``clock0``, set once every request is validated and built (its images' pixels
        joined, its M-RoPE positions made), as a server's front end prepares each request before
        its scheduler sees it; counted from the call, a replay of 101 image requests at 12 req/s
        admitted the arrivals of its first 1.5 s at once (``bench/results/fidelity_2gpu.vl_single``).

        Each round: admit what has arrived; form a step for every replica with a free lane and
        send them; with the look-ahead, form and send each replica's next step too; then take one
        answer (``_take_answer``)."""
        if self.closed:
            raise UserError("engine is shut down")
        if arrivals is not None and len(arrivals) != len(requests):
            raise UserError(f"{len(arrivals)} arrival times for {len(requests)} requests")
        sch = self.plan.scheduler
        scheds = [sc for _ in range(self.plan.mesh.dp)  # lane l of replica r is scheds[r * L + l]
                  for sc in Scheduler.lanes(self.lanes, self.num_blocks, self.block, sch.max_batch_tokens, sch.max_seqs)]
        self.schedulers = scheds
        run = StreamRun(scheds, [Result() for _ in requests], self.next_req, sampling or Sampling())
        self.next_req += len(requests)
        for i, req in enumerate(requests):
            try:
                s = make_seq(run.base + i, req, self.args, req.max_new_tokens or max_new_tokens, self.tokenizer,
                             self.num_blocks * self.block, self.pixel_dtype)
            except UserError as e:
                run.results[i].error = str(e)
                yield i, None, run.results[i]
                continue
            run.results[i].prompt_tokens = list(s.tokens)
            run.seqs[s.req] = s
            run.logits[s.req] = []
            run.pending.append((arrivals[i] if arrivals else 0.0, len(run.pending) % len(scheds), s))
        run.pending.sort(key=lambda x: x[0])
        run.pending.reverse()  # the next arrival last: pop() takes it
        self.clock0 = time.perf_counter()  # the arrivals' clock
        # look-ahead: single-stage replicas (every rank samples), one micro-batch per step, not torchrun
        look = self.lookahead and self.plan.mesh.pp == 1 and sch.microbatches <= 1 and not self.lock_step
        queued = lambda: any(sc.has_work() for sc in scheds)  # noqa: E731
        idle = False  # the last round scheduled nothing: wait for an encoder
        try:
            while run.pending or run.held or run.in_flight or queued():
                self._admit(run)
                if run.pending and not run.held and not run.in_flight and not queued():
                    time.sleep(max(0.0, run.pending[-1][0] - (time.perf_counter() - self.clock0)))  # idle until the next arrival
                    continue
                if run.held:  # with nothing to run, wait for an encoder
                    self._admit(run, wait=not run.in_flight and (idle or not queued()))
                steps = self._form_steps(run)
                idle = not steps
                if not run.in_flight:
                    if run.held:
                        continue
                    raise UserError("scheduler stalled: no request fits the KV cache")
                if steps:
                    self._send(steps)
                    self.peak_in_flight = max(self.peak_in_flight, len(run.in_flight))
                    busy = {lane for lane, *_ in run.in_flight.values()}
                    if self.lanes > 1 and any(sc.has_work() for lane, sc in enumerate(scheds) if lane not in busy):
                        continue  # another lane can start before an answer comes
                if look:
                    self._look_ahead_all(run)
                yield from self._take_answer(run, self._receive())
        finally:
            self._end_stream(run)
        if self.local is not None:
            for f in self.pending_free:
                self.local.model.forget(f)
                f.clear()

    def graph_captures(self) -> dict[str, Any] | None:
        """CUDA graphs captured so far and the wall time their captures took (serving pays it in the
        steps that meet a new bucket), summed over the replicas' reporting ranks as their last steps
        told (``RankRunner.captures``); None without graphs."""
        if self.local is not None:
            return self.local.captures()
        told = [g for g in self.rank_graphs.values() if g is not None]
        if not told:
            return None
        return {k: round(sum(g[k] for g in told), 3) for k in ("decode", "mixed", "tower", "capture_s")}

    def warm_up(self, prompt_tokens: int = 8) -> None:
        """Run every step shape serving will meet first before any request does: for each decode
        batch bucket up to ``max_seqs`` (``engine_shapes.BATCH_BUCKETS``), that many prompts of
        ``prompt_tokens`` tokens per replica and lane, two new tokens each. The layers compile
        (dynamic shapes; the GEMV's tiles are tuned for its one row, the FP8 kernel's per row
        bucket) and a decode graph is captured per batch bucket at the shortest key bucket, as is a
        prefill graph for each first step of ``b`` prompts (``b * prompt_tokens`` tokens, up to the
        largest token bucket). Last, every rank builds cuDNN's plans for whole prompts, captures
        every other decode and mixed graph bucket up to the longest context it can hold, and settles
        its heap (``RankRunner.finish_warm_up``), and the driver settles its own (``worker.settle_heap``: what
        loading and warming up made is never scanned by the garbage collector again). The engine's
        counters are reset after; its KV cache is free again."""
        from plans.engine_shapes import BATCH_BUCKETS
        from executors.worker import settle_heap

        top = self.plan.scheduler.max_seqs
        per = self.plan.mesh.dp * self.lanes  # requests are dealt round-robin over every replica's lanes
        limit, self.step_timeout_s = self.step_timeout_s, float("inf")  # compiling and capturing: minutes a step
        try:
            for b in [b for b in BATCH_BUCKETS if b < top] + [top]:
                self.generate([Request(tokens=[min(1, self.args.vocab - 1)] * prompt_tokens) for _ in range(b * per)],
                              max_new_tokens=2,
                              sampling=Sampling(temperature=0.0, stop_on_eos=False))
            if self.local is None:  # spawned ranks: an empty step on which they finish warming up
                self.step_id += 1
                self._dispatch({rep: Step(self.step_id, [], end_warm_up=True) for rep in range(self.plan.mesh.dp)})
            else:
                self.local.finish_warm_up()
        finally:
            self.step_timeout_s = limit
        settle_heap()  # the driver's
        self.mode_counts = dict.fromkeys(self.mode_counts, 0)
        self.lookahead_steps = self.peak_in_flight = 0
        if self.step_trace is not None:
            self.step_trace.clear()

    def generate(self, requests: list[Request], max_new_tokens: int = 16, sampling: Sampling | None = None) -> list[Result]:
        """Run requests to completion; per-request errors are in ``Result.error``."""
        results: dict[int, Result] = {}
        for i, _tok, res in self.stream(requests, max_new_tokens, sampling):
            results[i] = res
        return [results.get(i, Result(error="not run")) for i in range(len(requests))]


def load(plan: Plan | str | Path, weights: str | Path | WeightSource | None = None, device: str = "cpu",
         backend: str | None = None, kv_blocks: int | None = None, keep_logits: bool = False, seed: int = 0,
         tokenizer: str | Path | Any = None, config: dict | None = None, cuda_graphs: bool = True,
         lookahead: bool = True, warm_up: bool | None = None, all_reduce: str = "auto", trace: bool = False,
         max_context: int | None = None) -> Engine:
    """Materialise a plan: ``weights`` a local HF safetensors directory (each rank reads only its
    slices), an in-memory source (single rank), or None for seeded random weights. ``tokenizer``:
    a local tokenizer directory (defaults to ``weights`` when it holds one). ``cuda_graphs``:
    replay decode steps as CUDA graphs on CUDA ranks (``executors.graphs``). ``lookahead``: each
    replica of a single-stage plan (pp = 1: one rank, tp, sp, shift, dp) queues each decode step
    before reading the last one's tokens (on one H200 it took a batch-1 decode step of Llama-3.1-8B
    from 5.2 to 4.8 ms: ``bench/engine_speed.py``'s look-ahead variant); pipelined plans and
    torchrun ignore it. ``all_reduce``: ``auto`` sums small all-reduces with symmetric memory's
    one-shot kernel where it works (``parallel.OneShotAllReduce``), ``nccl`` always with NCCL. ``warm_up`` (default: on CUDA devices): ``Engine.warm_up`` before returning,
    so compiling step shapes and capturing decode graphs happen at load, not inside serving. ``trace``:
    ``Engine.step_trace`` records where each step's time goes, on the driver and the reporting rank
    (``executors.trace``; not under torchrun). ``max_context``: the most tokens a sequence may hold
    (prompt + output; default the model's context): longer requests are refused, and warm-up
    captures step graphs only up to it (``config.limit_context``). A single-rank plan on a GPU runs in this process, which
    then uses one CPU thread for torch's CPU ops (``torch.set_num_threads(1)``, ``RankRunner``), as
    spawned ranks do."""
    from plans.schema import load_plan

    base = None
    if not isinstance(plan, Plan):
        base = Path(plan).parent
        plan = load_plan(plan)
    cfg = config if config is not None else plan_config(plan, base)
    tok = _tokenizer(tokenizer if tokenizer is not None else weights)
    from executors import torchrun

    if torchrun.under_torchrun():
        if int(os.environ["RANK"]) == 0:
            return torchrun.TorchrunEngine(plan, cfg, weights, device, backend, kv_blocks, keep_logits, seed, tok,
                                           cuda_graphs, max_context=max_context)
        if isinstance(weights, (str, Path)):  # rank 0's engine checks its own node's checkpoint
            check_checkpoint_config(model_args(cfg), weights, plan)
        torchrun.follow(_spec_only(plan, cfg, weights, device, backend, kv_blocks, seed, cuda_graphs, max_context))
        raise SystemExit(0)
    eng = Engine(plan, cfg, weights, device, backend, kv_blocks, keep_logits, seed, tok, cuda_graphs, lookahead,
                 all_reduce, trace, max_context)
    if warm_up if warm_up is not None else device.startswith("cuda"):
        try:
            eng.warm_up()
        except BaseException:
            eng.shutdown(force=True)
            raise
    return eng


def _spec_only(plan: Plan, cfg: dict, weights: Any, device: str, backend: str | None,
               kv_blocks: int | None, seed: int, cuda_graphs: bool = True, max_context: int | None = None) -> WorkerSpec:
    """What a torchrun rank other than 0 needs (rank 0's Engine builds the same)."""
    a = limit_context(model_args(cfg), max_context)
    blocks = kv_blocks or default_blocks(plan, a)
    return WorkerSpec(plan.model_dump_json(), a.portable(), str(weights) if weights else None, seed, device, blocks,
                      backend or plan.backend, cuda_graphs)


def _tokenizer(where: Any) -> Any:
    if where is None or (not isinstance(where, (str, Path))):
        return where if hasattr(where, "encode") else None
    p = Path(where)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer in {p}: {e}") from None
