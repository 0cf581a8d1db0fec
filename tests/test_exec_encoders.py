"""Point 4, the vision encoder where the plan places it: dealing images over GPUs, the
encoder -> stage-0 exchange on gloo (all_dp owners on every stage, a dedicated encoder rank), and
end to end: dedicated encoders under KV exhaustion and an abandoned stream, against HF."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import executors
from executors import Request, Sampling
from executors.batch import ImageJob
from executors.encoders import EncoderServer, deal, exchange
from executors.engine import free_port
from tests.tiny.helpers import IMAGE_TOKEN, check_against_oracle, make_plan, random_image, save_checkpoint

GREEDY = Sampling(stop_on_eos=False)
HIDDEN = 3


def _job(req: int, patches: int, encoder: int | None = None) -> ImageJob:
    return ImageJob(req, None, [(1, 1, patches)], encoder)


def test_deal_largest_first_to_least_loaded_across_steps() -> None:
    load = [0, 0, 0]
    first = deal([_job(1, 4), _job(2, 16), _job(3, 8)], load)
    assert first == {2: 0, 3: 1, 1: 2} and load == [16, 8, 4]
    # a later step with one image goes to the GPU with the fewest patches so far, not to GPU 0
    assert deal([_job(4, 4)], load) == {4: 2} and load == [16, 8, 8]


# ---------------------------------------------------------------- exchange on gloo
STAGE0, REPLICA, ENCODER = (0, 1), (0, 1, 2, 3), 4


def _rows(j: ImageJob) -> tuple[int, int]:
    return (j.patches, HIDDEN)


def _exchange_rank(rank: int, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=5)
    # all_dp: 4 requests dealt over the replica's 4 GPUs; each owner encodes its rows as its rank
    jobs = [_job(10, 6), _job(11, 2), _job(12, 4), _job(13, 8)]
    fill = lambda js: [torch.full(_rows(j), float(rank)) for j in js]  # noqa: E731  (one call per step)
    if rank == ENCODER:
        server = EncoderServer(lambda pixels, grid: torch.full((sum(t * h * w for t, h, w in grid), HIDDEN), 40.0))
        server.serve(20, None, [(1, 1, 5)], list(STAGE0))
        server.serve(21, None, [(1, 1, 3)], list(STAGE0))
        for w, _ in server.in_flight:
            w.wait()
        got, ded = {}, {}
    else:
        got = exchange(jobs, REPLICA, [0] * 4, STAGE0, rank, fill, _rows, torch.float32, torch.device("cpu"))
        ded = exchange([_job(20, 5, ENCODER), _job(21, 3, ENCODER)], (), [], STAGE0, rank, fill, _rows,
                       torch.float32, torch.device("cpu"))
    out[rank] = ({r: t[0, 0].item() for r, t in got.items()}, {r: (tuple(t.shape), t.mean().item()) for r, t in ded.items()})
    dist.destroy_process_group()


def test_exchange_sends_every_embedding_to_stage0_from_any_stage_and_from_dedicated_encoders() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = mp.Manager().dict()
    mp.spawn(_exchange_rank, args=(free_port(), out), nprocs=5, join=True)
    owner = {r: REPLICA[k] for r, k in deal([_job(10, 6), _job(11, 2), _job(12, 4), _job(13, 8)], [0] * 4).items()}
    assert set(owner.values()) == {0, 1, 2, 3}  # stage-1 GPUs (ranks 2, 3) encode too
    for rank in STAGE0:
        got, ded = out[rank]
        assert got == {r: float(o) for r, o in owner.items()}  # each embedding from its owner
        assert ded == {20: ((5, HIDDEN), 40.0), 21: ((3, HIDDEN), 40.0)}
    for rank in (2, 3):
        assert out[rank] == ({}, {})  # later stages keep nothing


# ---------------------------------------------------------------- dedicated encoders end to end


def test_dedicated_encoder_under_kv_exhaustion_and_an_abandoned_stream(tmp_path: Path) -> None:
    """tp2 + 2 dedicated encoder ranks, a 12-block cache and four image requests: requests are
    preempted and recomputed, yet each request's images are encoded once (stage 0 keeps them) and
    every output matches HF. A stream abandoned after its first token leaves no embedding in
    flight: the next call still matches HF."""
    oracle = save_checkpoint("qwen2_vl", tmp_path, seed=5)
    plan = make_plan("qwen2_vl", tp=2, placement="dedicated", dedicated=2, max_batch_tokens=32)
    imgs = [random_image((4, 4), 1), random_image((4, 6), 2), random_image((4, 4), 3), random_image((4, 4), 4)]
    reqs = [Request(tokens=[7, 118, IMAGE_TOKEN, 119, 8, 9], images=[imgs[0]]), Request(tokens=list(range(20, 31))),
            Request(tokens=[118, IMAGE_TOKEN, 119, 60, 61], images=[imgs[1]]),
            Request(tokens=[118, IMAGE_TOKEN, 119, 62], images=[imgs[2]]),
            Request(tokens=[5, 118, IMAGE_TOKEN, 119], images=[imgs[3]])]
    with executors.load(plan, weights=tmp_path, keep_logits=True, kv_blocks=12) as eng:
        assert eng.world == 4
        results = eng.generate(reqs, max_new_tokens=16, sampling=GREEDY)
        preempted = eng.schedulers[0].preemptions
        jobs = list(eng.encoder_jobs)
        late = Request(tokens=list(range(20, 50)) + [118, IMAGE_TOKEN, 119], images=[imgs[2]])
        stream = eng.stream([Request(tokens=[5, 6, 7]), late, reqs[4]], max_new_tokens=4, sampling=GREEDY)
        next(stream)  # the first step: 3 + 29 tokens, before `late`'s image token
        stream.close()  # `late`'s and the last request's embeddings were sent but not received
        again = Request(tokens=[118, IMAGE_TOKEN, 119, 9], images=[imgs[1]])
        second = eng.generate([again], max_new_tokens=8, sampling=GREEDY)[0]
    assert preempted > 0
    assert sum(jobs) == 4 and min(jobs) > 0  # once per image request, both encoders used
    for req, res in zip(reqs, results):
        assert res.error is None and len(res.tokens) == 16
        assert check_against_oracle(oracle, req.tokens, res, req.images or None) < 1e-4
    assert check_against_oracle(oracle, again.tokens, second, [imgs[1]]) < 1e-4


def test_preempted_requests_keep_their_image_embeddings(tmp_path: Path) -> None:
    """In-step placement on one rank, a 12-block cache: requests are preempted and recomputed, but
    each request's images are encoded once (stage 0 keeps the embeddings), and outputs match HF."""
    oracle = save_checkpoint("qwen2_vl", tmp_path, seed=5)
    plan = make_plan("qwen2_vl", max_batch_tokens=32)
    imgs = [random_image((4, 4), 1), random_image((4, 6), 2), random_image((4, 4), 3)]
    reqs = [Request(tokens=[7, 118, IMAGE_TOKEN, 119, 8, 9], images=[imgs[0]]), Request(tokens=list(range(20, 31))),
            Request(tokens=[118, IMAGE_TOKEN, 119, 60, 61], images=[imgs[1]]),
            Request(tokens=[5, 118, IMAGE_TOKEN, 119], images=[imgs[2]])]
    with executors.load(plan, weights=tmp_path, keep_logits=True, kv_blocks=12) as eng:
        results = eng.generate(reqs, max_new_tokens=16, sampling=GREEDY)
        assert eng.schedulers[0].preemptions > 0
        assert eng.local.model.images_encoded == 3
    for req, res in zip(reqs, results):
        assert check_against_oracle(oracle, req.tokens, res, req.images or None) < 1e-4


def test_joined_pixels_equal_a_cat_then_a_cast() -> None:
    """``requests.join_pixels``: one pass per image into the output, the same values as
    ``cat(...).to(dtype)``; one image already in the dtype is passed through without a copy."""
    from executors.requests import join_pixels

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 12, generator=g) for n in (16, 4, 64)]
    for dtype in (torch.bfloat16, torch.float32):
        got = join_pixels(parts, dtype)
        assert got.dtype == dtype and torch.equal(got, torch.cat(parts).to(dtype))
    assert join_pixels(parts[:1], torch.float32) is parts[0]
    assert join_pixels(parts[:1], torch.bfloat16).data_ptr() != parts[0].data_ptr()
