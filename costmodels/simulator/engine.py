"""The discrete-event loop: requests in, per-request timestamps and step statistics out.

Events (a heap of (time s, sequence number, kind, payload); ties run in push order):

* ARRIVAL   a request arrives; it is routed to the least-loaded replica, and within it to the
            least-loaded lane (fewest unfinished requests; ties to the lowest index, as vLLM
            assigns requests to its PP virtual engines), and goes to the dedicated encoder queue
            or straight to the lane's waiting queue; an idle lane is kicked.
* ENC_DONE  a dedicated-encoder batch finished; each request becomes READY after its
            embedding transfer; the encoder takes its next batch.
* READY     a request's image embeddings arrived at its replica: it joins its lane's waiting queue.
* SCHEDULE  a scheduling step on an idle lane: form a micro-batch (``scheduler.form_batch``),
            pick the mode (shift: step tokens <= threshold -> "tp"; per stage when the plan gives
            stages their own thresholds), cost it per stage, and send it down the pipeline.
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
from dataclasses import dataclass, field

from costmodels.simulator.coster import Coster
from costmodels.simulator.config import SimConfig
from costmodels.simulator.scheduler import complete_batch, form_batch
from costmodels.simulator.state import REJECTED, Lane, Replica, Req
from costmodels.simulator.vision import DedicatedEncoder, in_step_ms
from costmodels.workload import Request

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
    reps = [Replica(i, cfg.kv_tokens, cfg.pp) for i in range(cfg.dp)]
    for rep in reps:
        rep.lanes = [Lane(j, rep) for j in range(cfg.lanes)]
    encoder = DedicatedEncoder(cfg.dedicated_gpus, cfg.max_batch_tokens) if cfg.placement == "dedicated" else None
    reqs = [Req(q.id, q.arrival_s, q.prompt_tokens, q.output_tokens, tuple(q.image_patches), sum(q.image_tokens))
            for q in requests]
    log = RunLog(reqs, notes=list(cfg.notes))
    if cfg.placement == "none" and any(r.patches for r in reqs):
        log.notes.append("the plan places no vision encoder; images encoded on stage 0 (stage0_tp)")
    events: list = []
    seq = 0
    per_stage = cfg.shift and len(set(cfg.stage_thresholds)) > 1
    one, pp = cfg.dp == 1, cfg.pp

    def push(t: float, kind: int, payload: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    def kick(rep: Replica, t: float, first: Lane, others: bool = False) -> None:
        """Queue a scheduling step for ``first`` (and, with ``others``, every idle lane with work)."""
        if not first.busy and not first.kicked:
            first.kicked = True
            push(t, SCHEDULE, first)
        if others:
            for lane in rep.lanes:
                if not lane.busy and not lane.kicked and lane.waiting:
                    lane.kicked = True
                    push(t, SCHEDULE, lane)

    def start_encoder(t: float) -> None:
        batch = encoder.take()
        if batch:
            dt = encoder.batch_ms(coster, batch) / 1e3
            encoder.busy, encoder.busy_s = True, encoder.busy_s + dt
            push(t + dt, ENC_DONE, batch)

    def launch(lane: Lane, t: float) -> None:
        lane.replica.kv_clock(t)
        batch, pre = form_batch(lane, cfg)
        log.preemptions += pre
        if batch is None:
            return
        log.steps += 1
        log.step_tokens += batch.tokens
        modes = cfg.stage_modes(batch.tokens) if per_stage else None
        if modes is None:
            mode = cfg.mode(batch.tokens)
            log.steps_tp += cfg.shift and mode == "tp"  # sp = 1 runs "tp" too, unshifted
            ms = coster.stage_ms(batch.shape, mode, batch.decode)
        else:  # stages with their own thresholds disagree: each stage runs its own mode
            both = {m: coster.stage_ms(batch.shape, m, batch.decode) for m in set(modes)}
            ms = [both[m][s] for s, m in enumerate(modes)]
            log.steps_tp += modes.count("tp") / cfg.pp
        if batch.patches:
            ms = [a + b for a, b in zip(ms, in_step_ms(cfg, coster, batch.patches))]
        rep = lane.replica
        if pp == 1:  # one stage: no pipeline to walk
            dt = ms[0] / 1e3
            free = rep.stage_free
            start = t if t > free[0] else free[0]
            free[0] = start + dt
            rep.stage_busy[0] += dt
            lane.busy = True
            push(start + dt, STEP_DONE, (lane, batch))
            return
        ready = t
        for s in range(cfg.pp):
            dt = ms[s] / 1e3
            start = ready if ready > rep.stage_free[s] else rep.stage_free[s]
            rep.stage_free[s] = start + dt
            rep.stage_busy[s] += dt
            ready = start + dt
            if s < cfg.pp - 1:
                ready += coster.p2p_ms(batch.tokens, s) / 1e3
        lane.busy = True
        push(ready, STEP_DONE, (lane, batch))

    in_system = 0
    last_t = 0.0
    i, n = 0, len(reqs)
    while i < n or events:
        if i < n and (not events or reqs[i].arrival <= events[0][0]):
            t, kind, payload = reqs[i].arrival, ARRIVAL, reqs[i]
            i += 1
        else:
            t, _, kind, payload = heapq.heappop(events)
        dt = t - last_t
        if dt > 0:
            log.area += in_system * dt
            last_t = t
        if kind == STEP_DONE:
            lane, batch = payload
            lane.busy = False
            lane.replica.kv_clock(t)
            in_system -= len(complete_batch(lane, batch, t))
            if cfg.lanes > 1 or lane.waiting or lane.prefilling or lane.decoding:
                kick(lane.replica, t, lane, others=cfg.lanes > 1)
        elif kind == SCHEDULE:
            payload.kicked = False
            if not payload.busy:
                launch(payload, t)
        elif kind == ARRIVAL:
            r = payload
            if r.prompt0 + r.out > cfg.kv_tokens:  # can never fit this replica's KV cache
                r.state = REJECTED
                log.rejected += 1
                continue
            rep = reps[0] if one else min(reps, key=lambda x: x.outstanding)
            lane = rep.lanes[0] if cfg.lanes == 1 else min(rep.lanes, key=lambda x: x.outstanding)
            rep.outstanding += 1
            lane.outstanding += 1
            r.replica, r.lane = rep.index, lane
            in_system += 1
            if encoder is not None and r.patches:
                encoder.queue.append(r)
                if not encoder.busy:
                    start_encoder(t)
            else:
                lane.waiting.append(r)
                kick(rep, t, first=lane)
        elif kind == ENC_DONE:
            encoder.busy = False
            for r in payload:
                r.encoded = True
                push(t + coster.embed_ms(r.img_tokens) / 1e3, READY, r)
            start_encoder(t)
        elif kind == READY:
            payload.lane.waiting.append(payload)
            kick(reps[payload.replica], t, first=payload.lane)
    log.t_end = last_t
    for rep in reps:
        rep.kv_clock(last_t)
    log.kv_area = sum(r.kv_area for r in reps) / (cfg.kv_tokens * cfg.dp)
    log.kv_peak = max(r.kv_peak for r in reps) / cfg.kv_tokens
    log.stage_busy_s = [sum(r.stage_busy[s] for r in reps) for s in range(cfg.pp)]
    log.encoder_busy_s = encoder.busy_s if encoder else 0.0
    return log
