"""Pipeline lanes: a pp2 replica keeps one step per lane in flight, and its tokens are the ones a
single-stage run of the same weights gives."""

from __future__ import annotations

import executors
from executors import Request, Sampling
from tests.tiny.helpers import make_plan


def test_pp2_lanes_overlap_and_give_the_single_stage_tokens() -> None:
    reqs = [Request(tokens=list(range(3 + i, 12 + 2 * i))) for i in range(4)]
    greedy = Sampling(temperature=0.0, stop_on_eos=False)
    with executors.load(make_plan("llama"), kv_blocks=64) as one:
        want = [r.tokens for r in one.generate(reqs, max_new_tokens=6, sampling=greedy)]
    with executors.load(make_plan("llama", pp=2, microbatches=2), kv_blocks=64) as eng:
        assert eng.lanes == 2 and len(eng.plan.stages) == 2
        got = [r.tokens for r in eng.generate(reqs, max_new_tokens=6, sampling=greedy)]
        assert eng.peak_in_flight == 2  # both lanes' steps in flight at once
        assert len(eng.schedulers) == 2 and all(sc.pool is eng.schedulers[0].pool for sc in eng.schedulers)
    assert got == want
