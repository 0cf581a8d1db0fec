"""``scheduler.microbatches`` as the engine runs it, in the simulator.

Under PP (pp > 1) the engine runs ``max(pp, microbatches)`` lanes per replica, one step per lane in
flight. At pp = 1 it runs one scheduler (one ``max_batch_tokens`` budget a step) and splits each
step's chunks -- decodes first, oldest first, then prefill chunks -- round-robin into
``min(microbatches, chunks)`` micro-batches that run one after another on the one stage
(``executors.engine.Engine._micro``); every request of the step gets its token when the last one
ends. The simulator mirrors that (``SimConfig.from_plan``, ``scheduler.micro_batches``): these
tests derive the expected step times from that rule with ``SyntheticCoster``, and check the split
against the engine's own ``_micro`` step by step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from costmodels.simulator import SimConfig, SyntheticCoster
from costmodels.simulator.engine import run
from costmodels.simulator.scheduler import complete_batch, form_batch, micro_batches
from costmodels.simulator.state import Lane, Replica, Req
from costmodels.workload import Request
from graph.opgraph import StepShape
from plans.errors import UserError
from tests.tiny.helpers import make_plan


@pytest.mark.parametrize("pp, microbatches, lanes, split", [
    (1, 1, 1, 1), (1, 3, 1, 3),  # one stage: one lane, its steps split into micro-batches
    (2, 2, 2, 1), (2, 3, 3, 1), (2, 1, 2, 1),  # PP: max(pp, microbatches) lanes, one micro-batch a step
])
def test_lanes_and_micro_batches_from_a_plan(pp, microbatches, lanes, split):
    c = SimConfig.from_plan(make_plan("llama", pp=pp, microbatches=microbatches))
    assert (c.pp, c.lanes, c.microbatches) == (pp, lanes, split)
    assert c.lookahead is False or microbatches == 1  # the engine looks ahead only with one micro-batch a step


def test_split_steps_are_single_stage_only():
    with pytest.raises(UserError, match="single-stage"):
        SimConfig(pp=2, lanes=2, microbatches=2)
    with pytest.raises(UserError, match="microbatches"):
        SimConfig(microbatches=0)


@pytest.mark.parametrize("shift", [False, True])
def test_single_stage_step_costs_its_micro_batches_in_turn(shift):
    """Six requests at t = 0, all admitted in the first step (one budget): 4 steps (a prefill, 3
    decodes), each the sum of its 3 micro-batches' times (each in its own mode), and every request's
    token at the end of each step."""
    m, out = 3, 4
    prompts = [100, 140, 60, 200, 80, 120]
    kw = dict(shift=True, sp=2, threshold=256) if shift else {}
    c = SimConfig(kv_tokens=400_000, max_batch_tokens=4096, max_seqs=128, microbatches=m, **kw)
    coster = SyntheticCoster()
    log = run(c, coster, [Request(i, 0.0, p, out, (), ()) for i, p in enumerate(prompts)])

    groups = [list(range(len(prompts)))[g::m] for g in range(m)]  # the engine's round-robin deal
    steps, tp_share = [], 0.0
    for k in range(out):  # step 0 prefills every prompt; step k decodes, each request holding p + k - 1 keys
        shapes = [StepShape.prefill([prompts[i] for i in g]) if k == 0 else StepShape.decode([prompts[i] + k for i in g])
                  for g in groups]
        modes = [c.mode(int(s.tokens)) for s in shapes]
        steps.append(sum(coster.stage_ms(s, md)[0] for s, md in zip(shapes, modes)))
        tp_share += sum(shift and md == "tp" for md in modes) / m
    assert log.steps == out
    assert math.isclose(log.steps_tp, tp_share, rel_tol=1e-12)
    if shift:
        assert 0 < tp_share < out  # the prefill's micro-batches straddle the threshold
    for r in log.reqs:
        assert math.isclose(r.first * 1e3, steps[0], rel_tol=1e-9)
        assert math.isclose(r.finish * 1e3, sum(steps), rel_tol=1e-9)
    assert math.isclose(log.stage_busy_s[0] * 1e3, sum(steps), rel_tol=1e-9)


def test_one_micro_batch_a_step_is_unchanged():
    """``microbatches = 1`` on one stage and the PP lanes give the same run as before the split was
    modelled: one forward pass a step, its stage time the coster's."""
    prompts = [100, 140, 60, 200, 80, 120]
    reqs = [Request(i, 0.0, p, 4, (), ()) for i, p in enumerate(prompts)]
    coster = SyntheticCoster()
    log = run(SimConfig(kv_tokens=400_000, max_batch_tokens=4096, max_seqs=128), coster, reqs)
    first = coster.stage_ms(StepShape.prefill(prompts), "tp")[0]
    assert log.steps == 4 and all(math.isclose(r.first * 1e3, first, rel_tol=1e-9) for r in log.reqs)
    pp2 = run(SimConfig(pp=2, lanes=2, kv_tokens=400_000, max_batch_tokens=4096, max_seqs=128),
              SyntheticCoster(pp=2), reqs)
    assert pp2.steps == 8  # two lanes of three requests each, 4 steps each


# ------------------------------------------------------------------ the split against the engine's

# (arrival step, prompt tokens, output tokens)
STREAMS = {
    "burst": [(0, 50, 5), (0, 300, 3), (0, 20, 8), (0, 700, 2), (0, 10, 6), (0, 120, 4)],
    "trickle": [(0, 90, 12), (1, 400, 4), (3, 30, 1), (3, 260, 6), (6, 5, 9), (9, 1000, 2), (10, 64, 3)],
}


def _engine_micro(m: int, chunks: list) -> list[tuple]:
    """(tokens, sequences, attention pairs, keys) of each micro-batch ``Engine._micro`` packs."""
    from executors.engine import Engine

    eng = SimpleNamespace(lanes=1, block=16, args=SimpleNamespace(image_token_id=None),
                          plan=SimpleNamespace(scheduler=SimpleNamespace(microbatches=m), stages=[None]),
                          _mode=lambda tokens, stage=0: "tp")
    return [(mb.num_tokens, len(mb.ctx), float((mb.tok_idx + 1).sum()), float(sum(mb.ctx)))
            for mb in Engine._micro(eng, chunks)]


def _engine_steps(stream, m: int, budget: int, max_seqs: int) -> list[list[tuple]]:
    from executors.scheduler import Scheduler, Seq

    sched = Scheduler(num_blocks=1 << 14, block_size=16, max_batch_tokens=budget, max_seqs=max_seqs)
    seqs = [Seq(req=i, tokens=[1] * p, prompt_len=p, max_new=o) for i, (_, p, o) in enumerate(stream)]
    out: list[list[tuple]] = []
    while len(out) <= max(t for t, _, _ in stream) or sched.has_work():
        for i, (t, _, _) in enumerate(stream):
            if t == len(out):
                sched.add(seqs[i])
        chunks, preempted = sched.schedule()
        assert not preempted
        out.append(_engine_micro(m, chunks) if chunks else [])
        for c in chunks:
            s = c.seq
            s.computed += c.n
            if s.computed == len(s.tokens):
                s.tokens.append(1)
                if s.generated >= s.max_new:
                    sched.finish(s)
        assert len(out) < 10_000
    return out


def _simulator_steps(stream, m: int, budget: int, max_seqs: int) -> list[list[tuple]]:
    cfg = SimConfig(max_batch_tokens=budget, max_seqs=max_seqs, kv_tokens=1 << 24, block_size=16, microbatches=m)
    rep = Replica(0, cfg.kv_tokens // 16, 1, 16)
    lane = Lane(0, rep)
    rep.lanes = [lane]
    reqs = [Req(i, 0.0, p, o, (), 0) for i, (_, p, o) in enumerate(stream)]
    out: list[list[tuple]] = []
    while len(out) <= max(t for t, _, _ in stream) or lane.waiting or lane.decoding or lane.prefilling:
        for i, (t, _, _) in enumerate(stream):
            if t == len(out):
                reqs[i].lane, reqs[i].replica = lane, 0
                lane.waiting.append(reqs[i])
        batch, preempted = form_batch(lane, cfg)
        assert not preempted
        if batch is None:
            out.append([])
            continue
        out.append([(int(s.tokens), int(s.seqs), float(s.pairs), float(s.kv)) for s, _ in micro_batches(lane, batch, m)])
        complete_batch(lane, batch, 0.0)
        assert len(out) < 10_000
    return out


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("budget, max_seqs", [(256, 4), (64, 8)])
@pytest.mark.parametrize("name", list(STREAMS))
def test_micro_batches_are_the_engines_step_by_step(name, budget, max_seqs, m):
    """Fed the same stream, each step's micro-batches hold the same tokens, sequences, attention
    pairs and keys in the engine (``Engine._micro`` over its scheduler's chunks) and in the simulator."""
    stream = STREAMS[name]
    ex, sim = _engine_steps(stream, m, budget, max_seqs), _simulator_steps(stream, m, budget, max_seqs)
    assert len(ex) == len(sim)
    for i, (a, b) in enumerate(zip(ex, sim)):
        assert a == b, f"step {i}: engine {a} vs simulator {b}"
    assert any(len(s) == m for s in ex) and any(0 < len(s) < m for s in ex)  # full splits, and steps of fewer chunks
