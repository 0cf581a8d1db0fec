"""The executor's scheduler and the simulator's make the same decisions where their rules are the
same: one replica, one lane, a KV cache that never runs short. Fed the same request stream, the
same token budget and max_seqs, they admit the same requests at the same step, give each the same
chunk (decodes 1 token, prefill chunks what the budget leaves, oldest first) and finish the same
requests at the same step.

Both count KV in paged blocks (a sequence of T tokens holds ceil(T / block_size)): a decoding
sequence holds the same blocks in both at every step. Where they differ, on purpose (stated in
both modules):

* KV under pressure: the executor allocates blocks chunk by chunk as a prefill grows (exact
  memory, so a request can be preempted mid-prefill); the simulator reserves the blocks of a
  request's whole prompt at admission and keeps a 1% watermark free (vLLM's admission rule), so
  preemptions differ when KV is short.
* Lanes: under PP both run one scheduler per micro-batch in flight (PP "virtual engines"), except
  the executor under torchrun or with dedicated encoders, which runs one scheduler per replica and
  splits its step into micro-batches; at pp = 1 both split a step into micro-batches
  (``tests/test_simulator_microbatches.py``).
"""

from __future__ import annotations

import pytest

from costmodels.simulator import SimConfig
from costmodels.simulator.scheduler import complete_batch, form_batch
from costmodels.simulator.state import Lane, Replica, Req
from executors.scheduler import Scheduler, Seq

# (arrival step, prompt tokens, output tokens)
STREAMS = {
    "burst": [(0, 50, 5), (0, 300, 3), (0, 20, 8), (0, 700, 2), (0, 10, 6), (0, 120, 4)],
    "trickle": [(0, 90, 12), (1, 400, 4), (3, 30, 1), (3, 260, 6), (6, 5, 9), (9, 1000, 2), (10, 64, 3)],
}


def executor_steps(stream, budget: int, max_seqs: int) -> list[dict]:
    sched = Scheduler(num_blocks=1 << 14, block_size=16, max_batch_tokens=budget, max_seqs=max_seqs)
    seqs = [Seq(req=i, tokens=[1] * p, prompt_len=p, max_new=o) for i, (_, p, o) in enumerate(stream)]
    return _drive(stream, lambda i: sched.add(seqs[i]), lambda: _exec_step(sched), sched.has_work)


def _exec_step(sched: Scheduler) -> dict:
    chunks, preempted = sched.schedule()
    assert not preempted
    step = {"chunks": {c.seq.req: c.n for c in chunks}, "finished": []}
    for c in chunks:
        s = c.seq
        s.computed += c.n
        if s.computed == len(s.tokens):  # the step samples this sequence's next token
            s.tokens.append(1)
            if s.generated >= s.max_new:
                sched.finish(s)
                step["finished"].append(s.req)
    step["decode_blocks"] = {s.req: len(s.blocks) for s in sched.running if s.computed >= s.prompt_len}
    return step


def simulator_steps(stream, budget: int, max_seqs: int) -> list[dict]:
    cfg = SimConfig(max_batch_tokens=budget, max_seqs=max_seqs, kv_tokens=1 << 24, block_size=16)
    rep = Replica(0, cfg.kv_tokens // 16, 1, 16)
    lane = Lane(0, rep)
    rep.lanes = [lane]
    reqs = [Req(i, 0.0, p, o, (), 0) for i, (_, p, o) in enumerate(stream)]

    def add(i: int) -> None:
        reqs[i].lane, reqs[i].replica = lane, 0
        lane.waiting.append(reqs[i])

    def step() -> dict:
        decoding = list(lane.decoding)
        batch, preempted = form_batch(lane, cfg)
        assert batch is not None and not preempted
        done = complete_batch(lane, batch, 0.0)
        return {"chunks": {**{r: 1 for r in decoding}, **{r.id: n for r, n in batch.chunks}},
                "finished": [r.id for r in done],
                "decode_blocks": {r.id: rep.blocks(r.kv(lane.steps)) for r in lane.decoding.values()}}

    return _drive(stream, add, step, lambda: bool(lane.waiting or lane.decoding or lane.prefilling))


def _drive(stream, add, step, busy) -> list[dict]:
    out: list[dict] = []
    k = 0
    while k < len(stream) or busy():
        for i, (t, _, _) in enumerate(stream):
            if t == len(out):
                add(i)
        k = sum(1 for t, _, _ in stream if t <= len(out))
        out.append(step() if busy() else {"chunks": {}, "finished": [], "decode_blocks": {}})
        assert len(out) < 10_000
    return out


@pytest.mark.parametrize("budget, max_seqs", [(256, 4), (1024, 2), (64, 8)])
@pytest.mark.parametrize("name", list(STREAMS))
def test_same_admissions_chunks_and_finishes_step_by_step(name, budget, max_seqs):
    stream = STREAMS[name]
    ex, sim = executor_steps(stream, budget, max_seqs), simulator_steps(stream, budget, max_seqs)
    for i, (a, b) in enumerate(zip(ex, sim)):
        assert a["chunks"] == b["chunks"], f"step {i}: executor {a['chunks']} vs simulator {b['chunks']}"
        assert sorted(a["finished"]) == sorted(b["finished"]), f"step {i}"
        assert a["decode_blocks"] == b["decode_blocks"], f"step {i}: KV blocks of the decoding sequences"
    assert len(ex) == len(sim)
    assert sum(len(s["finished"]) for s in ex) == len(stream)
    assert max(sum(s["chunks"].values()) for s in ex) <= budget


@pytest.mark.parametrize("block", [1, 16])
def test_simulator_kv_blocks_add_up_under_pressure(block):
    """With a KV cache too small for the stream, the simulator preempts; at every step the blocks
    it counts are the blocks its running requests hold (ceil(tokens / block)), never above the
    cache, and none are left when the stream is done; each step's longest decode is the longest
    decoding request's context, through preemptions and finishes."""
    stream = [(0, p, o) for p, o in ((300, 40), (200, 60), (250, 30), (90, 80), (400, 20), (35, 50))]
    cfg = SimConfig(max_batch_tokens=256, max_seqs=8, kv_tokens=800, block_size=block)
    rep = Replica(0, -(-cfg.kv_tokens // block), 1, block)
    lane = Lane(0, rep)
    rep.lanes = [lane]
    reqs = [Req(i, 0.0, p, o, (), 0) for i, (_, p, o) in enumerate(stream)]
    for r in reqs:
        r.lane, r.replica = lane, 0
        lane.waiting.append(r)
    preemptions = finished = 0
    for _ in range(5000):
        if not (lane.waiting or lane.decoding or lane.prefilling):
            break
        batch, pre = form_batch(lane, cfg)
        preemptions += pre
        assert rep.kv_used <= rep.kv_cap
        if batch.n_dec:  # the longest decode (``Lane.longest``, lazily pruned) against every decoding request
            dec = batch.decode or batch.shape
            assert dec.decode_max_kv == max(r.kv(lane.steps) + 1 for r in lane.decoding.values())
        finished += len(complete_batch(lane, batch, 0.0))
        held = [*lane.decoding.values(), *lane.prefilling]
        assert rep.kv_used == sum(rep.blocks(r.kv(lane.steps)) for r in held)
    assert finished == len(stream) and preemptions > 0
    assert rep.kv_used == 0 and not any(lane.edges.values())
