"""What one forward pass (a micro-batch of a scheduler step) tells every rank.

Tokens of all scheduled sequences are packed on one axis, ``T`` tokens in all. Attention keys
are gathered from the paged KV cache: ``key_slots [K]`` lists, sequence after sequence, the
cache slot of every key position ``0 .. ctx-1`` a query may read; the mask is block-diagonal
causal: query t sees key k iff ``key_seq[k] == seq[t]`` and ``key_pos[k] <= tok_idx[t]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from itertools import chain

import numpy as np
import torch


def grid_patches(grid: list[tuple[int, int, int]]) -> int:
    """Vision patches of images with patch grids ``(t, h, w)``."""
    return sum(t * h * w for t, h, w in grid)


@dataclass
class ImageJob:
    """Encode one request's images (all of them, concatenated) and keep the embeddings; with
    ``encoder`` set, a dedicated encoder rank has them (stage 0 receives, no pixels sent)."""

    req: int
    pixels: torch.Tensor | None  # [N_patches, patch_dim]
    grid: list[tuple[int, int, int]]  # (t, h, w) patches per image
    encoder: int | None = None  # global rank of the dedicated encoder that encodes this request

    @property
    def patches(self) -> int:
        return grid_patches(self.grid)

    def __reduce__(self) -> tuple:
        """Pickle the pixels as a numpy array of their raw bits (bf16 has no numpy type): pickle 5
        hands its bytes out of band to ``executors.worker.to_frame`` (written once into the step
        channel), where torch's tensor pickling goes through ``torch.save`` (a step of 16 448x448
        images, 38 MB of bf16: about 2x slower each way even in band, on a CPU core)."""
        raw = None
        if self.pixels is not None:
            p = self.pixels.contiguous()
            raw = (p.view(_BITS[p.element_size()]).numpy(), p.dtype)
        return _imagejob_from, (self.req, raw, self.grid, self.encoder)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width integer views


def _imagejob_from(req: int, raw: tuple[np.ndarray, torch.dtype] | None, grid: list, encoder: int | None) -> ImageJob:
    pixels = None if raw is None else torch.from_numpy(raw[0]).view(raw[1])
    return ImageJob(req, pixels, grid, encoder)


@dataclass
class MicroBatch:
    mode: str  # "sp_tp" (Ulysses SP x TP) or "tp" (plain TP over tp*sp GPUs)
    tokens: torch.Tensor  # [T] int64
    pos: torch.Tensor  # [T] or [3, T] rotary positions
    seq: torch.Tensor  # [T] index of the token's sequence within this micro-batch
    tok_idx: torch.Tensor  # [T] index of the token within its sequence
    slots: torch.Tensor  # [T] KV-cache slot written by the token
    key_slots: torch.Tensor  # [K]
    key_seq: torch.Tensor  # [K]
    key_pos: torch.Tensor  # [K]
    sample_idx: torch.Tensor  # [S] tokens whose logits are wanted (a sequence's last)
    sample_req: list[int] = field(default_factory=list)  # request id of each sampled row
    img_tok: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [N] token idx
    img_src: list[tuple[int, int, int]] = field(default_factory=list)  # (req, first row, rows), in order
    images: list[ImageJob] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)  # per pipeline stage (stages may have own thresholds)
    blocks: list[list[int]] = field(default_factory=list)  # per sequence: its KV blocks (block table row)
    ctx: list[int] = field(default_factory=list)  # per sequence: keys it reads (cached + new)
    decode: bool = False  # every sequence contributes one token, its last: a decode micro-batch

    def mode_of(self, stage: int) -> str:
        return self.modes[stage] if self.modes else self.mode

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    def __reduce__(self) -> tuple:
        """Pickle compactly: index tensors travel as numpy arrays (a decode step's pickle round trip
        takes ~0.1 ms instead of ~1 ms through torch's tensor pickling)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return _microbatch_from, ({k: v.numpy() if isinstance(v, torch.Tensor) and not v.is_floating_point() else v
                                   for k, v in state.items()},)

    def block_table(self, nb: int = 0) -> torch.Tensor:
        """``[S, max(nb, longest)]`` each sequence's KV blocks in order, padded with block 0 (many rows
        are filled in one masked assignment: a per-row loop cost ~0.3 ms at 128 sequences)."""
        if len(self.blocks) <= 8:  # a few rows: plain lists are cheaper than numpy's set-up
            nb = max([nb] + [len(b) for b in self.blocks])
            return torch.tensor([b + [0] * (nb - len(b)) for b in self.blocks], dtype=torch.long)
        lens = np.fromiter((len(b) for b in self.blocks), dtype=np.int64, count=len(self.blocks))
        nb = max(nb, int(lens.max()) if lens.size else 0)
        out = np.zeros((lens.size, nb), dtype=np.int64)
        out[np.arange(nb)[None, :] < lens[:, None]] = np.fromiter(chain.from_iterable(self.blocks), dtype=np.int64,
                                                                  count=int(lens.sum()))
        return torch.from_numpy(out)

    def key_grid(self, block: int, width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys [S, L], valid [S, L])``: sequence i's key slots ``blocks[i][p // block] * block +
        p % block`` for ``p < L`` (``L``: the longest context, or ``width`` if larger) and which of them
        are its real keys (``p < ctx[i]``)."""
        L = max(width, max(self.ctx))
        table = self.block_table(-(-L // block))
        keys = (table * block)[:, :, None].add(torch.arange(block)).flatten(1)[:, :L]
        return keys, torch.arange(L)[None, :] < torch.tensor(self.ctx)[:, None]

    def with_keys(self, block: int) -> "MicroBatch":
        """Fill ``key_slots / key_seq / key_pos`` from ``blocks`` and ``ctx`` when a decode
        micro-batch was built without them (the packed attention paths need them)."""
        if self.key_slots.numel() or not self.ctx:
            return self
        keys, valid = self.key_grid(block)
        S, L = keys.shape
        self.key_slots = keys[valid]
        self.key_seq = torch.arange(S)[:, None].expand(-1, L)[valid]
        self.key_pos = torch.arange(L)[None, :].expand(S, -1)[valid]
        return self


def to_device(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` (a list: as int64) on ``device`` without waiting for the device's queued work.

    A plain host-to-GPU copy from pageable memory returns only when the stream has run everything
    queued before it (``torch.cuda.set_sync_debug_mode`` names it a synchronising call): inside a
    step's launch that is the previous step, and the launch's own kernels so far. A copy from
    page-locked memory is queued behind them instead, and the host goes on. Every host tensor a
    step's launch sends to the GPU goes through here."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _microbatch_from(state: dict) -> MicroBatch:
    return MicroBatch(**{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()})


@dataclass
class Step:
    """One scheduler step of one DP replica: its micro-batches, and requests to forget. The
    step's image jobs are ``images`` plus each micro-batch's; all are encoded before the first
    micro-batch runs."""

    step_id: int
    micro: list[MicroBatch]
    free: list[int] = field(default_factory=list)  # finished requests: drop their worker state
    images: list[ImageJob] = field(default_factory=list)  # jobs outside any micro-batch (draining)
    want_logits: bool = False
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    req_base: int = 0  # request ids of this generate call start here (sampling keys use id - base)
    # a step sent before the previous step's tokens were read (the engine's look-ahead, pp = 1): sampled
    # row j's input token is row tokens_from[j] of the previous step's sampled tokens, taken on the device
    # (-1: the host's token, a prompt's last chunk)
    tokens_from: list[int] | None = None
    trace: bool = False  # the reporting rank times the step's phases (executors.trace)
    end_warm_up: bool = False  # ranks finish warming up first (``RankRunner.finish_warm_up``; Engine.warm_up's last step)

    @property
    def image_jobs(self) -> list[ImageJob]:
        return self.images + [j for mb in self.micro for j in mb.images]


@dataclass
class StepOut:
    step_id: int
    replica: int
    req: list[int]
    tokens: list[int]
    logits: torch.Tensor | None = None  # [S, V] fp32 when asked for
    mode: list[str] = field(default_factory=list)
    graphs: dict[str, float] | None = None  # the reporting rank's CUDA graph captures so far (RankRunner.captures)
    timing: dict[str, float] | None = None  # the step's phases on the reporting rank, when traced (executors.trace)
