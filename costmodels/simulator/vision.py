"""Where the vision encoder runs, and what that costs.

* ``stage0_tp``: the tower is tensor-parallel over stage 0's P GPUs; a step that admits image
  requests first encodes their images there, so stage 0's time grows by the encoder time.
* ``stage0_dp``: the tower is replicated on stage 0's P GPUs and images are split across them by
  patch count (vLLM's ``mm_encoder_tp_mode=data``); stage 0's time grows.
* ``all_dp``: replicated on all pp*P GPUs of the replica, images split across them; every stage
  spends the encoder time (each GPU encodes its share) before the step's LLM work.
* ``dedicated``: ``dedicated_gpus`` GPUs run only the encoder, data-parallel, as a FIFO server
  shared by all replicas; a batch takes the queued images up to ``max_batch_tokens`` image
  tokens; each request then waits for its image embeddings to be sent (p2p) before it can be
  scheduled. The LLM GPUs never stall on the encoder.

A plan with placement ``none`` whose workload has images is simulated as ``stage0_tp``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from costmodels.simulator.coster import Coster
from costmodels.simulator.config import SimConfig
from costmodels.simulator.state import Req


def in_step_ms(cfg: SimConfig, coster: Coster, patches: tuple[int, ...]) -> list[float]:
    """Extra ms per pipeline stage for encoding ``patches`` inside a step (in-step placements)."""
    extra = [0.0] * cfg.pp
    if not patches:
        return extra
    enc = cfg.dims.encoder()  # the stages that encode, as dp tower replicas of tp GPUs
    ms = coster.vision_ms(patches, tp=enc.tp, dp=enc.dp)
    for s in enc.stages:
        extra[s] = ms
    return extra


@dataclass
class DedicatedEncoder:
    """FIFO encoder server on ``gpus`` dedicated GPUs."""

    gpus: int
    token_budget: int
    queue: deque = field(default_factory=deque)
    busy: bool = False
    busy_s: float = 0.0

    def take(self) -> list[Req]:
        """The next encoder batch: queued requests up to ``token_budget`` image tokens (at least one)."""
        batch: list[Req] = []
        toks = 0
        while self.queue and (not batch or toks + self.queue[0].img_tokens <= self.token_budget):
            r = self.queue.popleft()
            toks += r.img_tokens
            batch.append(r)
        return batch

    def batch_ms(self, coster: Coster, batch: list[Req]) -> float:
        patches = tuple(p for r in batch for p in r.patches)
        return coster.vision_ms(patches, tp=1, dp=self.gpus)
