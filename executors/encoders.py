"""Where a step's images are encoded, and how their embeddings reach stage 0 (``vision.placement``).

Every GPU of stage 0 needs every image embedding of a step: the embedding rows replace the
image-token rows of ``x [T, hidden]`` before the SP split. An image of patch grid ``(t, h, w)``
gives ``t*h*w / merge^2`` embedding rows of ``hidden`` values. Per placement:

* ``none`` / ``stage0_tp``: stage 0's P GPUs run the tower together (TP-sharded when its heads
  and MLP width divide by P, else whole on each GPU); nothing is exchanged.
* ``stage0_dp``: requests are dealt to stage 0's P GPUs (largest first, to the GPU with the fewest
  patches encoded so far, counted over all steps: every rank sees the same steps, so each keeps
  the same tally); each owner sends its embeddings to the other P - 1.
* ``all_dp``: dealt the same way over all ``pp * P`` GPUs of the replica (every GPU holds the
  tower); owners on later stages send to each of stage 0's GPUs.
* ``dedicated``: encoder ranks after the LLM mesh encode each request as soon as the driver
  submits it (``EncoderServer``) and send the embeddings to stage 0's GPUs of the request's
  replica; stage 0 receives them in the step that first needs them and keeps them across
  preemption (the encoder sends once).

Sends and receives of one step go through one ``dist.batch_isend_irecv``, so no pair waits on
another; every pair's messages are posted in the same order on both sides (tag 0, as NCCL
ignores tags).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from executors.batch import ImageJob
from executors.config import VisionArgs
from executors.layers import load
from executors.parallelize import parallelize_tower
from executors.vision import VisionTower
from executors.weights import WeightSource

Encode = Callable[[list[ImageJob]], list[torch.Tensor]]  # jobs' pixels -> each one's [rows, hidden] embeddings


def load_tower(v: VisionArgs, src: WeightSource, dtype: torch.dtype, device: torch.device, group: Any = None,
               rank: int = 0, size: int = 1) -> VisionTower:
    """The tower on one GPU: built on meta, TP-sharded over ``group`` (``size`` GPUs, this one rank
    ``rank``) when ``size > 1``, loaded in place (each GPU reads only its rows)."""
    with torch.device("meta"):
        tower = VisionTower(v)
    if size > 1:
        parallelize_tower(tower, group, rank, size)
    return load(tower, src, device, dtype)


def deal(jobs: list[ImageJob], load: list[int]) -> dict[int, int]:
    """Request id -> index of the GPU that encodes it: largest first, to the GPU with the fewest
    patches so far (``load``, one tally per GPU, updated in place; ties to the lowest index)."""
    n = len(load)
    owner: dict[int, int] = {}
    for j in sorted(jobs, key=lambda j: -j.patches):
        k = min(range(n), key=lambda i: load[i])
        owner[j.req] = k
        load[k] += j.patches
    return owner


def exchange(jobs: list[ImageJob], ranks: tuple[int, ...], load: list[int], stage0: tuple[int, ...], me: int,
             encode: Encode, rows_shape: Callable[[ImageJob], tuple[int, int]], dtype: torch.dtype,
             device: torch.device) -> dict[int, torch.Tensor]:
    """Deal ``jobs`` over ``ranks`` (global ranks; ``load`` their patch tallies), encode my share,
    send each embedding to every stage-0 rank, and return (on stage-0 ranks) every job's
    embedding by request id. Jobs with an ``encoder`` rank were encoded by a dedicated encoder:
    stage-0 ranks only receive them."""
    own = [j for j in jobs if j.encoder is None]
    owner = {r: ranks[k] for r, k in deal(own, load).items()}
    src = {j.req: j.encoder if j.encoder is not None else owner[j.req] for j in jobs}
    mine = [j for j in jobs if src[j.req] == me]
    got: dict[int, torch.Tensor] = {j.req: e.contiguous() for j, e in zip(mine, encode(mine))}  # one tower call
    ops: list[dist.P2POp] = []
    for j in jobs:
        if src[j.req] == me:
            e = got[j.req]
            ops += [dist.P2POp(dist.isend, e, dst) for dst in stage0 if dst != me]
        elif me in stage0:
            got[j.req] = torch.empty(rows_shape(j), dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, got[j.req], src[j.req]))
    if ops:
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    return got if me in stage0 else {}


class EncoderServer:
    """A dedicated encoder rank: encode a request's images, send the embeddings to stage 0.

    Sends are left in flight (stage 0 posts its receive only once the driver admits the
    request, which waits for this rank's "encoded" report); finished ones are dropped."""

    def __init__(self, encode: Callable[[torch.Tensor, list[tuple[int, int, int]]], torch.Tensor]):
        self.encode = encode
        self.in_flight: list[tuple[object, torch.Tensor]] = []

    def serve(self, req: int, pixels: torch.Tensor, grid: list[tuple[int, int, int]], dst: list[int]) -> None:
        e = self.encode(pixels, grid).contiguous()
        self.in_flight = [(w, t) for w, t in self.in_flight if not w.is_completed()]
        self.in_flight += [(dist.isend(e, d), e) for d in dst]
