"""The engine's look-ahead (the next step queued before the last one's tokens are read, its pending
input tokens taken on the device) gives the tokens of the plain engine, on one rank and on spawned
ranks of single-stage replicas (tp2, shift over sp2 with decodes in both modes, dp2): with requests
ending at different lengths and on an end-of-sequence token, with sampling, with staggered
arrivals, under KV pressure that preempts, and with prompts chunked over steps that also decode
(mixed steps sent ahead, some rows' tokens pending, others the prompt's). A spawned rank launches a
step already sent before it reports the last one. A saturated replica (every seat taken, requests
waiting) looks ahead too."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import executors
from executors import Request, Sampling
from executors.batch import StepOut
from executors.channel import Channel
from executors.worker import Launched, serve_steps, to_bytes
from tests.tiny.helpers import make_plan

REQS = [Request(tokens=list(range(3 + i, 9 + 3 * i)), max_new_tokens=4 + 3 * i) for i in range(5)]


MESHES = {"single": {}, "tp2": {"tp": 2}, "shift": {"sp": 2, "shift": True, "threshold": 4}, "dp2": {"dp": 2}}


def _run(lookahead: bool, sampling: Sampling, kv_blocks: int = 64, eos: tuple[int, ...] = (),
         arrivals: list[float] | None = None, mesh: str = "single", max_seqs: int = 8,
         max_batch_tokens: int = 64) -> tuple[list[list[int]], int, int]:
    """Each request's tokens, the steps sent ahead, and how many of those were not pure decodes
    and took a pending token."""
    plan = make_plan("llama", max_batch_tokens=max_batch_tokens, max_seqs=max_seqs, **MESHES[mesh])
    with executors.load(plan, kv_blocks=kv_blocks, lookahead=lookahead) as eng:
        if eos:
            eng.args = dataclasses.replace(eng.args, eos_token_ids=eos)
        mixed = []
        send = eng._send
        eng._send = lambda steps: (mixed.extend(s for s in steps.values() if s.tokens_from is not None
                                                and not s.micro[0].decode and max(s.tokens_from, default=-1) >= 0), send(steps))
        out = {i: r for i, _tok, r in eng.stream(REQS, max_new_tokens=8, sampling=sampling, arrivals=arrivals)}
        return [out[i].tokens for i in range(len(REQS))], eng.lookahead_steps, len(mixed)


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("case", ["lengths", "eos", "sampled", "arrivals", "kv_pressure", "seats_full", "chunked"])
def test_lookahead_gives_the_plain_engines_tokens(case: str, mesh: str) -> None:
    greedy = Sampling(temperature=0.0, stop_on_eos=False)
    kw: dict = {"sampling": greedy, "mesh": mesh}
    if case == "eos":  # a token the greedy run produces mid-way ends requests early
        plain, *_ = _run(False, greedy, mesh=mesh)
        kw |= {"sampling": Sampling(temperature=0.0, stop_on_eos=True), "eos": (plain[4][2],)}
    elif case == "sampled":
        kw["sampling"] = Sampling(temperature=0.8, top_k=20, seed=3, stop_on_eos=False)
    elif case == "arrivals":
        kw["arrivals"] = [0.0, 0.0, 0.02, 0.05, 0.05]
    elif case == "kv_pressure":
        kw["kv_blocks"] = 12  # 48 slots for five sequences of up to 27 tokens: preemption
    elif case == "seats_full":  # two seats, five requests: the replica looks ahead while three wait
        kw["max_seqs"] = 2
    elif case == "chunked":  # 5-token steps: prompts of 6-18 tokens run in chunks beside decodes
        kw |= {"max_batch_tokens": 5, "arrivals": [0.0, 0.0, 0.01, 0.03, 0.03]}
    want, none, _ = _run(False, **kw)
    got, ahead, mixed = _run(True, **kw)
    assert got == want
    assert none == 0 and ahead > 0  # the look-ahead ran
    if case == "chunked":
        assert mixed > 0  # steps with prompt chunks and pending tokens were sent ahead
    if case == "eos":
        assert any(len(t) < r.max_new_tokens for t, r in zip(got, REQS))


def _served() -> list[str]:
    """The launches and reports of a rank served steps 1 and 2 at once (2 sent ahead), then 3 once
    2 is reported."""
    spec = Channel.create(readers=1, slots=4)
    try:
        driver, rank = Channel(spec), Channel(spec, reader=0)
        events: list[str] = []

        class Runner:
            def launch(self, step: int, unpickle_ms: float = 0.0) -> Launched:
                events.append(f"launch {step}")
                return Launched(StepOut(step, 0, [step], []), torch.tensor([step]))

        def report(launched: Launched) -> None:
            o = launched.out()
            events.append(f"report {o.step_id}")
            assert o.tokens == [o.step_id]
            if o.step_id == 2:  # nothing sent ahead: step 3 comes once step 2 is reported
                driver.send(to_bytes(3))
            elif o.step_id == 3:
                driver.send(None)

        driver.send(to_bytes(1))
        driver.send(to_bytes(2))  # sent ahead
        serve_steps(Runner(), rank, report, overflow=lambda: b"")
        return events
    finally:
        Channel.unlink(spec)


def test_a_rank_launches_a_sent_step_before_reporting_the_last() -> None:
    assert _served() == ["launch 1", "launch 2", "report 1", "report 2", "launch 3", "report 3"]


def test_warm_up_leaves_the_engine_as_loaded() -> None:
    """``Engine.warm_up`` (run by ``load`` on CUDA devices) runs a batch of short prompts per decode
    bucket, then the engine serves the tokens a fresh one serves, with its counters reset."""
    plan = make_plan("llama", max_batch_tokens=64, max_seqs=8)
    greedy = Sampling(temperature=0.0, stop_on_eos=False)
    with executors.load(plan, kv_blocks=64) as eng:
        want = [r.tokens for r in eng.generate(REQS, max_new_tokens=8, sampling=greedy)]
    with executors.load(plan, kv_blocks=64, warm_up=True) as eng:
        assert eng.step_id > 0 and eng.mode_counts == {"tp": 0, "sp_tp": 0} and eng.lookahead_steps == 0
        got = [r.tokens for r in eng.generate(REQS, max_new_tokens=8, sampling=greedy)]
    assert got == want


def test_no_step_is_formed_ahead_after_a_long_one(monkeypatch) -> None:
    """A step of more than ``engine_shapes.LOOKAHEAD_MAX_TOKENS`` tokens (here 4, with 5-token steps)
    gets no successor formed while it computes; shorter ones do, and the tokens are the plain engine's."""
    import executors.engine as engine_module

    monkeypatch.setattr(engine_module, "LOOKAHEAD_MAX_TOKENS", 4)
    greedy = Sampling(temperature=0.0, stop_on_eos=False)
    want, *_ = _run(False, greedy, max_batch_tokens=5)
    plan = make_plan("llama", max_batch_tokens=5, max_seqs=8)
    with executors.load(plan, kv_blocks=64) as eng:
        after: list[int] = []  # the tokens of each step a successor was formed ahead of
        look = eng._look_ahead

        def spy(run, sid: int):
            tokens = run.in_flight[sid][2].micro[0].num_tokens
            out = look(run, sid)
            if out is not None:
                after.append(tokens)
            return out

        eng._look_ahead = spy
        got = [r.tokens for r in eng.generate(REQS, max_new_tokens=8, sampling=greedy)]
    assert got == want
    assert after and max(after) <= 4


@pytest.mark.parametrize("placement", ["stage0_dp", "dedicated"])
def test_lookahead_with_image_prompts_in_chunks(placement: str) -> None:
    """A vision-language model's image prompts in 6-token steps beside other requests' decodes, the
    tower in the step or on a dedicated encoder rank: steps with image chunks and pending tokens
    are sent ahead, and every request's tokens are the plain engine's."""
    from tests.tiny.helpers import IMAGE_TOKEN, random_image

    imgs = [random_image((4, 4), 1), random_image((4, 6), 2), random_image((4, 4), 3)]
    reqs = [Request(tokens=[7, 118, IMAGE_TOKEN, 119, 8, 9], images=[imgs[0]], max_new_tokens=5),
            Request(tokens=list(range(20, 31)), max_new_tokens=7),
            Request(tokens=[118, IMAGE_TOKEN, 119, 60, 61], images=[imgs[1]], max_new_tokens=6),
            Request(tokens=[5, 118, IMAGE_TOKEN, 119], images=[imgs[2]], max_new_tokens=4)]
    plan = make_plan("qwen2_vl", max_batch_tokens=6, placement=placement, dedicated=1 if placement == "dedicated" else 0)
    greedy = Sampling(temperature=0.0, stop_on_eos=False)
    out = {}
    for lookahead in (False, True):
        with executors.load(plan, kv_blocks=64, lookahead=lookahead) as eng:
            sent = []
            send = eng._send
            eng._send = lambda steps: (sent.extend(s for s in steps.values() if s.tokens_from is not None
                                                   and not s.micro[0].decode and max(s.tokens_from, default=-1) >= 0),
                                       send(steps))
            res = eng.generate(reqs, sampling=greedy)
            out[lookahead] = ([r.tokens for r in res], len(sent), eng.lookahead_steps)
    assert [len(t) for t in out[True][0]] == [r.max_new_tokens for r in reqs] and out[True][0] == out[False][0]
    assert out[False][2] == 0 and out[True][1] > 0


@settings(max_examples=12, deadline=None, derandomize=True)
@given(prompts=st.lists(st.integers(1, 20), min_size=2, max_size=6),
       outputs=st.lists(st.integers(1, 10), min_size=6, max_size=6),
       arrivals=st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.03]), min_size=6, max_size=6),
       budget=st.sampled_from([5, 8, 64]), seats=st.sampled_from([2, 8]), blocks=st.sampled_from([12, 64]))
def test_lookahead_gives_the_plain_engines_tokens_on_any_traffic(prompts, outputs, arrivals, budget, seats,
                                                                   blocks) -> None:
    """Random traffic on one rank: prompt lengths, output lengths, staggered arrivals, a step's token
    budget (5: prompts chunked beside decodes), seats and KV blocks (12: preemption) drawn together;
    the look-ahead engine's tokens are the plain engine's, every request runs to its length."""
    reqs = [Request(tokens=[(7 * i + j) % 97 + 3 for j in range(n)], max_new_tokens=outputs[i])
            for i, n in enumerate(prompts)]
    plan = make_plan("llama", max_batch_tokens=budget, max_seqs=seats)
    greedy = Sampling(temperature=0.0, stop_on_eos=False)
    got = {}
    for lookahead in (False, True):
        with executors.load(plan, kv_blocks=blocks, lookahead=lookahead) as eng:
            out = {i: r for i, _tok, r in eng.stream(reqs, sampling=greedy, arrivals=arrivals[:len(reqs)])}
            got[lookahead] = [out[i].tokens for i in range(len(reqs))]
            ahead = eng.lookahead_steps
    assert ahead > 0 or max(r.max_new_tokens for r in reqs) == 1  # steps were sent ahead (not after one-token requests)
    assert got[True] == got[False]
    assert [len(t) for t in got[True]] == [r.max_new_tokens for r in reqs]
