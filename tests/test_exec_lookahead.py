"""The single-rank engine's look-ahead (the next decode step queued before the last one's tokens
are read, its input tokens taken on the device) gives the tokens of the plain engine: with
requests ending at different lengths and on an end-of-sequence token, with sampling, with
staggered arrivals, and under KV pressure that preempts."""

from __future__ import annotations

import dataclasses

import pytest

import executors
from executors import Request, Sampling
from tests.tiny.helpers import make_plan

REQS = [Request(tokens=list(range(3 + i, 9 + 3 * i)), max_new_tokens=4 + 3 * i) for i in range(5)]


def _run(lookahead: bool, sampling: Sampling, kv_blocks: int = 64, eos: tuple[int, ...] = (),
         arrivals: list[float] | None = None) -> tuple[list[list[int]], int]:
    with executors.load(make_plan("llama", max_batch_tokens=64, max_seqs=8), kv_blocks=kv_blocks,
                        lookahead=lookahead) as eng:
        if eos:
            eng.args = dataclasses.replace(eng.args, eos_token_ids=eos)
        out = {i: r for i, _tok, r in eng.stream(REQS, max_new_tokens=8, sampling=sampling, arrivals=arrivals)}
        return [out[i].tokens for i in range(len(REQS))], eng.lookahead_steps


@pytest.mark.parametrize("case", ["lengths", "eos", "sampled", "arrivals", "kv_pressure"])
def test_lookahead_gives_the_plain_engines_tokens(case: str) -> None:
    greedy = Sampling(temperature=0.0, stop_on_eos=False)
    kw: dict = {"sampling": greedy}
    if case == "eos":  # a token the greedy run produces mid-way ends requests early
        plain, _ = _run(False, greedy)
        kw = {"sampling": Sampling(temperature=0.0, stop_on_eos=True), "eos": (plain[4][2],)}
    elif case == "sampled":
        kw = {"sampling": Sampling(temperature=0.8, top_k=20, seed=3, stop_on_eos=False)}
    elif case == "arrivals":
        kw["arrivals"] = [0.0, 0.0, 0.02, 0.05, 0.05]
    elif case == "kv_pressure":
        kw["kv_blocks"] = 12  # 48 slots for five sequences of up to 27 tokens: preemption
    want, none = _run(False, **kw)
    got, ahead = _run(True, **kw)
    assert got == want
    assert none == 0 and ahead > 0  # the look-ahead ran
    if case == "eos":
        assert any(len(t) < r.max_new_tokens for t, r in zip(got, REQS))
