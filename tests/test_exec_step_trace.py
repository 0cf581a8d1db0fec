"""The step trace (``executors.trace``, ``load(..., trace=True)``): one record a step with the driver's
and the reporting rank's times, for the in-process rank and for spawned ranks of two replicas; an
image step names its images; tracing changes no token; off, nothing is recorded."""

from __future__ import annotations

import pytest

import executors
from executors import Request, Sampling
from tests.tiny.helpers import IMAGE_TOKEN, make_plan, random_image

GREEDY = Sampling(temperature=0.0, stop_on_eos=False)
RANK_KEYS = {"unpickle_ms", "wait_ms", "gc_ms", "images_host_ms", "forward_host_ms", "sample_host_ms"}


def _run(model: str, mesh: dict, reqs: list[Request], trace: bool) -> tuple[list[list[int]], list | None]:
    plan = make_plan(model, max_batch_tokens=32, max_seqs=8, **mesh)
    with executors.load(plan, kv_blocks=64, trace=trace) as eng:
        out = eng.generate(reqs, max_new_tokens=3, sampling=GREEDY)
        return [r.tokens for r in out], eng.step_trace


@pytest.mark.parametrize("mesh", [{}, {"dp": 2}], ids=["in-process", "dp2 spawned"])
def test_each_step_has_a_record_and_tracing_changes_no_token(mesh: dict) -> None:
    reqs = [Request(tokens=list(range(3 + i, 12 + 2 * i))) for i in range(4)]
    plain, none = _run("llama", mesh, reqs, trace=False)
    got, trace = _run("llama", mesh, reqs, trace=True)
    assert none is None and got == plain
    assert trace and len({r["step"] for r in trace}) == len(trace)
    spawned = bool(mesh)
    assert {r["replica"] for r in trace} == ({0, 1} if spawned else {0})
    for r in trace:
        assert 0 <= r["sent_ms"] <= r["answered_ms"] and r["tokens"] >= 1 and r["images"] == 0
        assert RANK_KEYS <= set(r["rank"]) and all(v >= 0 for v in r["rank"].values())
        assert (r["bytes"] > 0 and r["send_ms"] > 0) if spawned else (r["bytes"] == 0 and r["send_ms"] == 0)
        assert (r["rank"]["unpickle_ms"] > 0) == spawned
    assert sum(r["tokens"] for r in trace) >= sum(len(q.tokens) for q in reqs)  # every prompt token ran
    for r in trace:  # the step's shape: new tokens and keys read, per micro-batch and sequence
        assert sum(map(sum, r["new"])) == r["tokens"] and sum(map(len, r["ctx"])) == r["seqs"]
        assert all(c >= n >= 1 for nn, cc in zip(r["new"], r["ctx"]) for n, c in zip(nn, cc))
    first = min(trace, key=lambda r: (r["replica"], r["step"]))
    assert first["new"] == first["ctx"]  # a first step reads only its own keys


def test_an_image_step_names_its_images() -> None:
    """An image step names each image's patches (a request of two images: two counts, as the
    simulator charges the tower per image, attention being within an image)."""
    img, wide = random_image((4, 4), 9), random_image((4, 8), 10)
    reqs = [Request(tokens=[7, 118, IMAGE_TOKEN, 119, IMAGE_TOKEN, 8], images=[img, wide]),
            Request(tokens=[40, 41, 42])]
    plain, _ = _run("qwen2_vl", {}, reqs, trace=False)
    got, trace = _run("qwen2_vl", {}, reqs, trace=True)
    assert got == plain
    first = [r for r in trace if r["images"]]
    assert len(first) == 1 and first[0]["images"] == 1 and first[0]["pixel_mb"] > 0
    assert first[0]["patches"] == [img.grid[0] * img.grid[1] * img.grid[2], wide.grid[0] * wide.grid[1] * wide.grid[2]]
    assert first[0]["rank"]["images_host_ms"] > 0
