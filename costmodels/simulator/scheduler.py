"""Continuous batching for one lane: pick a step's work, and apply a finished step.

A step (vLLM-style, decode first):

1. every decoding request of the lane gets one token; each needs one more KV slot. If the
   replica's KV pool cannot hold them, the newest running request of the lane is preempted
   (recompute: its KV is freed; it re-enters the front of its lane's waiting queue and later re-prefills
   prompt + generated tokens) until they fit;
2. partially prefilled requests continue with chunks (chunked prefill) within the token budget
   ``max_batch_tokens - decodes``;
3. the lane's waiting requests are admitted FIFO while the budget, KV and ``max_seqs`` allow
   (``max_seqs`` running requests per replica, over all its lanes, as in vLLM's V1 scheduler; the
   token budget is per micro-batch). Admission reserves
   KV for the whole prompt (so a chunked prefill never stalls for memory) and keeps ``watermark``
   of the pool free (a request that fits only in an empty pool is admitted when the pool is empty).
   Images not yet encoded are encoded in this step (in-step placements), at most
   ``max_batch_tokens`` image tokens per step beyond the first request.
   With ``reserve_output`` (TensorRT-LLM's default GUARANTEED_NO_EVICT capacity policy) admission
   also counts the output tokens every running request and the candidate will still append, so the
   pool never runs out and nothing is preempted.

KV is counted in blocks of ``block_size`` tokens, as the executor's paged cache counts it: a
sequence of T tokens holds ``ceil(T / block_size)`` blocks of the replica's
``ceil(kv_tokens / block_size)``; a decode step opens a block for each sequence whose last block is
full (``Lane.edges``).

Against the executor's scheduler (``executors.scheduler``): with KV to spare both admit, chunk and
finish the same requests at the same steps, and a decoding sequence holds the same blocks in both
(``tests/test_scheduler_agreement.py``). On purpose they differ under KV pressure -- the executor
grows blocks chunk by chunk (exact memory, so it may preempt mid-prefill), this one reserves the
blocks of the whole prompt at admission and keeps ``watermark`` free (vLLM's admission rule, cheap
to simulate). Both run ``max(pp, microbatches)`` lanes per replica under PP (one scheduler per
pipeline micro-batch in flight, sharing the replica's KV pool and ``max_seqs``), except the
executor under torchrun or with dedicated encoders, where one scheduler splits each step into
micro-batches. At pp = 1 both run one scheduler per replica and split each of its steps into
``min(microbatches, chunks)`` micro-batches run one after another (``micro_batches``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from costmodels.simulator.config import SimConfig
from costmodels.simulator.state import DECODE, DONE, PREFILL, WAITING, Lane, Replica, Req
from graph.opgraph import StepShape


@dataclass
class Batch:
    """One micro-batch: ``n_dec`` decodes plus prefill ``chunks`` [(req, new tokens)]."""

    n_dec: int
    chunks: list[tuple[Req, int]]
    shape: StepShape
    patches: tuple[int, ...]  # ViT patches of the images encoded in this step (in-step placements)
    image_tokens: int
    tokens: int  # scheduled tokens: decodes + prefill chunk tokens
    decode: StepShape | None = None  # the decode part of a step that also holds prefill chunks


def preempt(rep: Replica, lane: Lane, req: Req) -> None:
    """Free ``req``'s KV and send it back to the front of the waiting queue (recompute later)."""
    kv = req.kv(lane.steps)
    rep.kv_used -= rep.blocks(kv)
    if req.state == DECODE:
        del lane.decoding[req.id]
        _leave_edges(lane, req, rep.block)
        lane.ctx -= kv
        req.prompt = req.prompt0 + req.produced  # recompute prompt + generated tokens
    else:
        lane.prefilling.remove(req)
    req.done = 0
    req.state = WAITING
    req.preempts += 1
    rep.running -= 1
    lane.waiting.appendleft(req)


def form_batch(lane: Lane, cfg: SimConfig) -> tuple[Batch | None, int]:
    """The lane's next micro-batch (None when it has nothing to do) and the number of preemptions."""
    rep = lane.replica
    cap, edge = rep.kv_cap, lane.steps % rep.block
    n_dec = len(lane.decoding)
    if n_dec and not lane.prefilling and not lane.waiting and rep.kv_used + lane.edges.get(edge, 0) <= cap:
        rep.kv_used += lane.edges.get(edge, 0)  # fast path: decodes only, nothing to admit
        if rep.kv_used > rep.kv_peak:
            rep.kv_peak = rep.kv_used
        c = float(lane.ctx + n_dec)
        return Batch(n_dec, [], StepShape(n_dec, c, c, n_dec, decode_max_kv=longest_decode(lane)), (), 0, n_dec), 0
    preempted = 0
    while lane.decoding and rep.kv_used + lane.edges.get(edge, 0) > cap:
        victim = lane.prefilling[-1] if lane.prefilling else next(reversed(lane.decoding.values()))
        preempt(rep, lane, victim)
        preempted += 1
    n_dec = len(lane.decoding)
    rep.kv_used += lane.edges.get(edge, 0)
    budget = cfg.max_batch_tokens - n_dec
    chunks: list[tuple[Req, int]] = []
    for r in lane.prefilling:
        if budget <= 0:
            break
        n = min(r.prompt - r.done, budget)
        chunks.append((r, n))
        budget -= n
    limit = cap - int(cfg.watermark * cap)
    promised = _promised(rep) if cfg.reserve_output else 0
    patches: list[int] = []
    img_tokens = 0
    in_step = cfg.placement != "dedicated"
    waiting = lane.waiting
    while budget > 0 and rep.running < cfg.max_seqs and waiting and not preempted:
        r = waiting[0]
        need = rep.blocks(r.prompt)
        # no-evict: the blocks its whole output will need are counted now (promised, not yet held)
        grow = rep.blocks(r.prompt + r.out - r.produced) - need if cfg.reserve_output else 0
        if rep.kv_used + promised + need + grow > limit and not (rep.kv_used == 0 and need + grow <= cap):
            break
        promised += grow
        if in_step and not r.encoded:
            if img_tokens and img_tokens + r.img_tokens > cfg.max_batch_tokens:
                break
            patches.extend(r.patches)
            img_tokens += r.img_tokens
            r.encoded = True
        waiting.popleft()
        r.state, r.done = PREFILL, 0
        rep.kv_used += need
        lane.prefilling.append(r)
        n = min(r.prompt, budget)
        chunks.append((r, n))
        budget -= n
        rep.running += 1
    if rep.kv_used > rep.kv_peak:
        rep.kv_peak = rep.kv_used
    if not chunks and not n_dec:
        return None, preempted
    shape, dec = step_shapes(n_dec, lane.ctx + n_dec, longest_decode(lane) if n_dec else 0.0, chunks)
    return Batch(n_dec, chunks, shape, tuple(patches), img_tokens, shape.tokens, dec), preempted


def step_shapes(n_dec: int, dec_keys: float, longest: float,
                chunks: list[tuple[Req, int]]) -> tuple[StepShape, StepShape | None]:
    """One forward pass of ``n_dec`` decodes reading ``dec_keys`` keys in all (the longest
    ``longest``) and prefill ``chunks`` (``(request, tokens)``, each after the request's ``done``
    tokens: ``n c + n (n + 1) / 2`` attention pairs): its shape, and its decode part when it has both."""
    tokens, pairs, kv, seqs = n_dec, float(dec_keys), float(dec_keys), n_dec
    for r, n in chunks:
        c = r.done
        tokens += n
        pairs += n * c + n * (n + 1) / 2
        kv += n + c
        seqs += 1
    dec = StepShape(n_dec, float(dec_keys), float(dec_keys), n_dec, decode_max_kv=longest) if n_dec and chunks else None
    return StepShape(tokens, pairs, kv, seqs, decode_max_kv=longest), dec


def micro_batches(lane: Lane, batch: Batch, m: int) -> list[tuple[StepShape, StepShape | None]]:
    """The forward passes the engine runs one after another for ``batch`` when it splits each step
    of a single-stage replica into ``m`` micro-batches (``executors.engine.Engine._micro``): the
    step's chunks -- its decodes (the lane's decoding requests, oldest first), then its prefill
    chunks in order -- dealt round-robin into ``min(m, chunks)`` micro-batches (chunk ``i`` to
    micro-batch ``i mod m``). Each is ``(shape, decode part of a mixed one or None)``, as
    ``step_shapes`` builds a whole step's; call it before ``complete_batch`` applies the step."""
    decs = list(lane.decoding.values())
    g = min(m, len(decs) + len(batch.chunks))
    if g <= 1:
        return [(batch.shape, batch.decode)]
    assert len(decs) == batch.n_dec, (len(decs), batch.n_dec)
    keys = [[r.kv(lane.steps) + 1 for r in decs[k::g]] for k in range(g)]  # each decode's keys: KV + the new token
    chunks = [[c for j, c in enumerate(batch.chunks) if (len(decs) + j) % g == k] for k in range(g)]
    return [step_shapes(len(ks), sum(ks), max(ks, default=0), cs) for ks, cs in zip(keys, chunks)]


def longest_decode(lane: Lane) -> float:
    """Keys the lane's longest decoding sequence reads in its next step (its KV plus the new token;
    ``Lane.longest``), 0 with none decoding."""
    h = lane.longest
    while h:
        _, _, d0, r = h[0]
        if r.state == DECODE and r.lane is lane and r.d0 == d0:
            return float(r.prompt + lane.steps - d0 + 1)
        heapq.heappop(h)  # finished or preempted since it was pushed
    return 0.0


def _promised(rep: Replica) -> int:
    """KV blocks the replica's running requests will still open (their remaining output)."""
    n, blocks = 0, rep.blocks
    for lane in rep.lanes:
        for r in lane.decoding.values():
            n += max(0, blocks(r.prompt + r.out - r.produced) - blocks(r.kv(lane.steps)))
        for r in lane.prefilling:
            n += blocks(r.prompt + r.out - r.produced) - blocks(r.prompt)
    return n


def complete_batch(lane: Lane, batch: Batch, t: float) -> list[Req]:
    """Apply a finished step at time ``t``; returns the requests that finished."""
    rep = lane.replica
    lane.steps += 1
    lane.ctx += batch.n_dec
    done: list[Req] = []
    heap = lane.heap
    while heap and heap[0][0] <= lane.steps:
        _, _, d0, r = heapq.heappop(heap)
        if r.state != DECODE or r.lane is not lane or r.d0 != d0:
            continue  # stale entry of a preempted request
        kv = r.kv(lane.steps)
        rep.kv_used -= rep.blocks(kv)
        lane.ctx -= kv
        del lane.decoding[r.id]
        _leave_edges(lane, r, rep.block)
        r.produced = r.out
        _finish(r, t, done)
    for r, n in batch.chunks:
        r.done += n
        if r.done < r.prompt:
            continue
        lane.prefilling.remove(r)
        r.produced += 1
        if r.first is None:
            r.first = t
        if r.produced >= r.out:
            rep.kv_used -= rep.blocks(r.prompt)
            _finish(r, t, done)
            continue
        r.state, r.d0 = DECODE, lane.steps
        lane.decoding[r.id] = r
        k = r.edge(rep.block)
        lane.edges[k] = lane.edges.get(k, 0) + 1
        lane.ctx += r.prompt
        heapq.heappush(heap, (lane.steps + r.out - r.produced, r.id, r.d0, r))
        heapq.heappush(lane.longest, (r.d0 - r.prompt, r.id, r.d0, r))
    rep.outstanding -= len(done)
    rep.running -= len(done)
    lane.outstanding -= len(done)
    return done


def _leave_edges(lane: Lane, r: Req, block: int) -> None:
    k = r.edge(block)
    lane.edges[k] -= 1


def _finish(r: Req, t: float, done: list[Req]) -> None:
    r.state = DONE
    r.finish = t
    done.append(r)
