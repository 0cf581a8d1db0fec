"""The discrete-event loop: requests in, per-request timestamps and step statistics out.

Events (a heap of (time s, sequence number, kind, payload); ties run in push order), each with
its own handler ``Simulation.on_<kind>``; ``Simulation.run`` only pops the next one and dispatches:

* ARRIVAL   a request arrives; it is routed to the least-loaded replica, and within it to the
            least-loaded lane (fewest unfinished requests; ties to the lowest index, as vLLM
            assigns requests to its PP virtual engines), and goes to the dedicated encoder queue
            or straight to the lane's waiting queue; an idle lane is kicked.
* ENC_DONE  a dedicated-encoder batch finished; each request becomes READY after its
            embedding transfer; the encoder takes its next batch.
* READY     a request's image embeddings arrived at its replica: it joins its lane's waiting queue.
* SCHEDULE  a scheduling step on an idle lane: form a micro-batch (``scheduler.form_batch``, as
            the engine's look-ahead lets it: ``Simulation.form``),
            pick the mode (shift: step tokens <= threshold -> "tp"; per stage when the plan gives
            stages their own thresholds), cost it per stage, and send it down the pipeline. A
            single-stage step split into micro-batches (``SimConfig.microbatches``) costs the
            sum of its micro-batches, each in its own mode (``scheduler.micro_batches``).
* STEP_DONE the micro-batch left the last stage: tokens are emitted, finished requests leave
            (``scheduler.complete_batch``) and the replica's idle lanes are kicked.

Pipeline: stage s of a replica is a FIFO server; a micro-batch scheduled at t runs on stage s
from max(ready_s, free_s) for its stage time, then hops to s+1 after the p2p time. Stages keep
FIFO order, so the whole path is computed when the batch is scheduled (a tandem queue): latency
= sum of stage times + p2p (+ queueing), throughput bounded by the slowest stage, with up to
``lanes`` micro-batches in flight.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from costmodels.simulator.coster import Coster
from costmodels.simulator.config import SimConfig
from costmodels.simulator.scheduler import complete_batch, form_batch, micro_batches
from costmodels.simulator.state import REJECTED, Lane, Replica, Req
from costmodels.simulator.vision import DedicatedEncoder, in_step_ms
from costmodels.workload import Request
from graph.opgraph import StepShape
from plans.engine_shapes import LOOKAHEAD_MAX_TOKENS

ARRIVAL, ENC_DONE, READY, SCHEDULE, STEP_DONE = range(5)


@dataclass
class RunLog:
    """Raw outcome of one run (``metrics.summarize`` turns it into a ``SimResult``)."""

    reqs: list[Req]
    t_end: float = 0.0
    steps: int = 0
    steps_tp: float = 0.0  # steps in shifted (TP) mode; a step counts 1/pp per stage when stages differ
    step_tokens: int = 0
    preemptions: int = 0
    rejected: int = 0
    area: float = 0.0  # integral over time of the number of requests in the system (s)
    kv_area: float = 0.0  # integral over time of the KV share in use, averaged over replicas (s)
    kv_peak: float = 0.0  # highest KV share in use of any replica
    stage_busy_s: list[float] = field(default_factory=list)  # summed over replicas
    encoder_busy_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def run(cfg: SimConfig, coster: Coster, requests: list[Request]) -> RunLog:
    """Simulate ``requests`` (sorted by arrival) on the deployment ``cfg`` with step times from ``coster``."""
    if coster.pp != cfg.pp:
        raise ValueError(f"coster has {coster.pp} stages, the config {cfg.pp}")
    return Simulation(cfg, coster, requests).run()


class Simulation:
    """One run: the event heap, the replicas, and one handler per event kind."""

    def __init__(self, cfg: SimConfig, coster: Coster, requests: list[Request]):
        self.cfg, self.coster = cfg, coster
        self.kv_blocks = -(-cfg.kv_tokens // cfg.block_size)  # per replica, as the executor sizes its cache
        self.reps = [Replica(i, self.kv_blocks, cfg.pp, cfg.block_size) for i in range(cfg.dp)]
        for rep in self.reps:
            rep.lanes = [Lane(j, rep) for j in range(cfg.lanes)]
        dedicated = cfg.placement == "dedicated"
        self.encoder = DedicatedEncoder(cfg.dedicated_gpus, cfg.max_batch_tokens) if dedicated else None
        self.reqs = [Req(q.id, q.arrival_s, q.prompt_tokens, q.output_tokens, tuple(q.image_patches),
                         sum(q.image_tokens)) for q in requests]
        self.log = RunLog(self.reqs, notes=list(cfg.notes))
        if cfg.placement == "none" and any(r.patches for r in self.reqs):
            self.log.notes.append("the plan places no vision encoder; images encoded on stage 0 (stage0_tp)")
        self.events: list = []
        self.seq = 0
        self.per_stage = cfg.shift and len(set(cfg.stage_thresholds)) > 1
        self.in_system = 0
        self.last_t = 0.0
        self.handlers = {ARRIVAL: self.on_arrival, ENC_DONE: self.on_enc_done, READY: self.on_ready,
                         SCHEDULE: self.on_schedule, STEP_DONE: self.on_step_done}

    def run(self) -> RunLog:
        """Arrivals come straight from the sorted request list, everything else from the heap."""
        reqs, events, handlers = self.reqs, self.events, self.handlers
        i, n = 0, len(reqs)
        while i < n or events:
            if i < n and (not events or reqs[i].arrival <= events[0][0]):
                t, kind, payload = reqs[i].arrival, ARRIVAL, reqs[i]
                i += 1
            else:
                t, _, kind, payload = heapq.heappop(events)
            if t > self.last_t:
                self.log.area += self.in_system * (t - self.last_t)
                self.last_t = t
            handlers[kind](t, payload)
        return self.finish()

    # ------------------------------------------------------------------ events
    def on_arrival(self, t: float, r: Req) -> None:
        cfg = self.cfg
        if -(-(r.prompt0 + r.out) // cfg.block_size) > self.kv_blocks:  # can never fit a replica's KV cache
            r.state = REJECTED
            self.log.rejected += 1
            return
        rep = self.reps[0] if cfg.dp == 1 else min(self.reps, key=lambda x: x.outstanding)
        lane = rep.lanes[0] if cfg.lanes == 1 else min(rep.lanes, key=lambda x: x.outstanding)
        rep.outstanding += 1
        lane.outstanding += 1
        r.replica, r.lane = rep.index, lane
        self.in_system += 1
        if self.encoder is not None and r.patches:
            self.encoder.queue.append(r)
            if not self.encoder.busy:
                self.start_encoder(t)
        else:
            r.queued = t
            lane.waiting.append(r)
            self.kick(rep, t, first=lane)

    def on_enc_done(self, t: float, batch: list[Req]) -> None:
        self.encoder.busy = False
        for r in batch:
            r.encoded = True
            self.push(t + self.coster.embed_ms(r.img_tokens) / 1e3, READY, r)
        self.start_encoder(t)

    def on_ready(self, t: float, r: Req) -> None:
        r.queued = t
        r.lane.waiting.append(r)
        self.kick(self.reps[r.replica], t, first=r.lane)

    def on_schedule(self, t: float, lane: Lane) -> None:
        lane.kicked = False
        if not lane.busy:
            self.launch(lane, t)

    def on_step_done(self, t: float, done: tuple[Lane, object]) -> None:
        lane, batch = done
        lane.busy = False
        lane.replica.kv_clock(t)
        self.in_system -= len(complete_batch(lane, batch, t))
        if self.cfg.lanes > 1 or lane.waiting or lane.prefilling or lane.decoding:
            self.kick(lane.replica, t, lane, others=self.cfg.lanes > 1)

    # ------------------------------------------------------------------ helpers
    def push(self, t: float, kind: int, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def kick(self, rep: Replica, t: float, first: Lane, others: bool = False) -> None:
        """Queue a scheduling step for ``first`` (and, with ``others``, every idle lane with work)."""
        if not first.busy and not first.kicked:
            first.kicked = True
            self.push(t, SCHEDULE, first)
        if others:
            for lane in rep.lanes:
                if not lane.busy and not lane.kicked and lane.waiting:
                    lane.kicked = True
                    self.push(t, SCHEDULE, lane)

    def start_encoder(self, t: float) -> None:
        enc = self.encoder
        batch = enc.take()
        if batch:
            dt = enc.batch_ms(self.coster, batch) / 1e3
            enc.busy, enc.busy_s = True, enc.busy_s + dt
            self.push(t + dt, ENC_DONE, batch)

    def launch(self, lane: Lane, t: float) -> None:
        """Form a micro-batch on ``lane``, cost it per stage in its mode(s), walk it down the pipeline."""
        cfg, coster, log = self.cfg, self.coster, self.log
        lane.replica.kv_clock(t)
        batch, pre, ahead = self.form(lane, t)  # ahead: formed while the last step ran (the engine's look-ahead)
        log.preemptions += pre
        if batch is None:
            return
        log.steps += 1
        log.step_tokens += batch.tokens
        # the step's forward passes: itself, or the micro-batches a single-stage step is split into, in turn;
        # its images are encoded before the first (``in_step_ms``)
        wait = not (cfg.lookahead and ahead)
        if cfg.microbatches == 1:
            ms, tp = self.forward_ms(batch.shape, batch.decode, batch.patches, wait)
            log.steps_tp += tp
        else:
            parts = micro_batches(lane, batch, cfg.microbatches)
            ms = [0.0] * cfg.pp
            for k, (shape, decode) in enumerate(parts):
                part, tp = self.forward_ms(shape, decode, batch.patches if k == 0 else (), wait)
                ms = [a + b for a, b in zip(ms, part)]
                log.steps_tp += tp / len(parts)
        rep = lane.replica
        ready = t
        if cfg.lookahead and not ahead:  # formed once the last tokens were back: the driver's host time first
            ready += coster.form_ms(batch.shape.seqs, bool(batch.chunks), sum(batch.patches)) / 1e3
        for s in range(cfg.pp):  # stage s is a FIFO server; the batch hops on after its p2p send
            dt = ms[s] / 1e3
            start = ready if ready > rep.stage_free[s] else rep.stage_free[s]
            rep.stage_free[s] = start + dt
            rep.stage_busy[s] += dt
            ready = start + dt
            if s < cfg.pp - 1:
                ready += coster.p2p_ms(batch.tokens, s) / 1e3
        lane.busy = True
        self.push(ready, STEP_DONE, (lane, batch))

    def forward_ms(self, shape: StepShape, decode: StepShape | None, patches: tuple[int, ...],
                   wait: bool) -> tuple[list[float] | tuple[float, ...], float]:
        """Per-stage ms of one forward pass (a step, or one micro-batch of it) in its mode(s), and its
        share of stages in shifted (TP) mode: each stage's time, plus the in-step encoding of
        ``patches``, plus (``wait``: not sent while the last step ran) what each stage's GPU waits
        for its rank."""
        cfg, coster = self.cfg, self.coster
        modes = cfg.stage_modes(shape.tokens) if self.per_stage else None
        if modes is None:
            mode = cfg.mode(shape.tokens)
            tp = cfg.shift and mode == "tp"  # sp = 1 runs "tp" too, unshifted
            ms = coster.stage_ms(shape, mode, decode)
        else:  # stages with their own thresholds disagree: each stage runs its own mode
            both = {m: coster.stage_ms(shape, m, decode) for m in set(modes)}
            ms = [both[m][s] for s, m in enumerate(modes)]
            tp = modes.count("tp") / cfg.pp
        if patches:
            ms = [a + b for a, b in zip(ms, in_step_ms(cfg, coster, patches))]
        if wait:
            w = {m: coster.wait_ms(shape, m, decode) for m in set(modes or [mode])}
            ms = [x + w[modes[s] if modes else mode] for s, x in enumerate(ms)]
        return ms, tp

    def form(self, lane: Lane, t: float) -> tuple:
        """``form_batch`` as the engine's look-ahead sees it: ``(batch, preemptions, ahead)``. A step
        formed ahead (``lane.ahead``: the lane's last step, sent at ``lane.sent``, held at most
        ``engine_shapes.LOOKAHEAD_MAX_TOKENS`` tokens) was formed when that step was sent, so requests
        that joined the queue since (arrived, or their images came from a dedicated encoder) join the
        step after; if without them there is nothing to run (every running request ended in the last
        step) the step is formed now, once the tokens are back (``ahead`` False: it pays the driver's
        time)."""
        hidden: deque = deque()
        ahead = lane.ahead
        if ahead:
            while lane.waiting and lane.waiting[-1].queued > lane.sent:  # newcomers join at the back
                hidden.appendleft(lane.waiting.pop())
        batch, pre = form_batch(lane, self.cfg)
        lane.waiting.extend(hidden)
        if batch is None and hidden:
            ahead = False
            batch, more = form_batch(lane, self.cfg)
            pre += more
        lane.ahead = self.cfg.lookahead and batch is not None and batch.tokens <= LOOKAHEAD_MAX_TOKENS
        lane.sent = t
        return batch, pre, ahead

    def finish(self) -> RunLog:
        cfg, log, reps = self.cfg, self.log, self.reps
        log.t_end = self.last_t
        for rep in reps:
            rep.kv_clock(self.last_t)
        log.kv_area = sum(r.kv_area for r in reps) / (self.kv_blocks * cfg.dp)
        log.kv_peak = max(r.kv_peak for r in reps) / self.kv_blocks
        log.stage_busy_s = [sum(r.stage_busy[s] for r in reps) for s in range(cfg.pp)]
        log.encoder_busy_s = self.encoder.busy_s if self.encoder else 0.0
        return log
