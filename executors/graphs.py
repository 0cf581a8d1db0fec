"""Decode steps replayed as CUDA graphs, one graph per (batch, keys) bucket.

A decode micro-batch (``S`` sequences, one new token each, plain TP mode) costs one read of the
stage's weights and KV; run eagerly, its hundreds of small kernels are launched one by one from
Python and the step is bound by the launches, not by HBM. Here the whole stage forward
(``StageModel.decode_forward``: embedding or received hidden states, every layer with its
collectives, the lm_head) is captured once per bucket and replayed:

* batch bucket ``B >= S`` from ``BATCH_BUCKETS``; key bucket ``L >=`` the longest context
  (``keys_bucket``);
* the graph reads one static int64 buffer ``[tokens B | pos R*B | slots B | lens B | table B*L/bs]``
  (``R`` = 1, or 3 rows for M-RoPE; ``table``: each sequence's KV blocks, the block table), filled by
  one host-to-device copy per step; attention reads whole blocks through the table. Padding rows
  write the scratch slot, read one key, and their outputs are dropped;
* later pipeline stages copy the received hidden states into a static ``[B, hidden]`` buffer.

Graphs share one memory pool and are captured lazily, the first time a bucket is met (NCCL
collectives are captured too; every rank of a stage meets the same buckets in the same order,
since they run the same steps). CPU ranks never use this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from executors.batch import MicroBatch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
MIN_KEYS = 256


def bucket(n: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest size ``>= n``, or None past the largest."""
    return next((b for b in sizes if b >= n), None)


def keys_bucket(n: int) -> int:
    """Key width for a longest context of ``n``: the next multiple of ``MIN_KEYS`` up to 8 of them,
    then the next power of two (a few graphs per batch size; at most 1/8 of the keys padding)."""
    if n <= 8 * MIN_KEYS:
        return max(1, -(-n // MIN_KEYS)) * MIN_KEYS
    return 1 << (n - 1).bit_length()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inp: torch.Tensor  # [B * (3 + R) + B * L / bs] int64, static
    host: torch.Tensor  # the same, pinned host memory, refilled each step
    copied: torch.cuda.Event  # the last copy out of ``host`` is done
    h: torch.Tensor | None  # [B, hidden] static (later pipeline stages)
    out: torch.Tensor  # [B, V] logits or [B, hidden]


class DecodeGraphs:
    """Captures and replays ``model.decode_forward`` per bucket (``model``: a ``StageModel``)."""

    def __init__(self, model, max_batch: int):
        self.model = model
        self.sizes = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (bucket(max_batch, BATCH_BUCKETS) or max_batch,)
        self.rows = 3 if model.a.mrope_section else 1
        self.block = model.block_size
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None  # one memory pool for every graph, made at the first capture

    def accepts(self, mb: MicroBatch, mode: str) -> bool:
        """A decode micro-batch in plain TP mode that fits a bucket, with no image rows."""
        return mb.decode and mode == "tp" and mb.num_tokens <= self.sizes[-1] and not mb.img_tok.numel()

    def shape(self, mb: MicroBatch) -> tuple[int, int]:
        """The bucket ``(B, L)`` of a decode micro-batch (``L`` a multiple of the block size)."""
        return bucket(mb.num_tokens, self.sizes), -(-keys_bucket(max(mb.ctx)) // self.block) * self.block

    def _size(self, B: int, L: int) -> int:
        return B * (3 + self.rows) + B * (L // self.block)

    def padded(self, mb: MicroBatch, h_in: torch.Tensor | None) -> torch.Tensor:
        """What a replay computes, run eagerly on padded inputs (no graph): ``[S, ...]``."""
        B, L = self.shape(mb)
        buf = torch.empty(self._size(B, L), dtype=torch.long)
        self._pack(buf, mb, B, L)
        buf = buf.to(self.model.par.device)
        if mb.tokens.is_cuda:
            buf[:mb.num_tokens].copy_(mb.tokens)
        h = None if h_in is None else torch.cat([h_in, h_in.new_zeros(B - h_in.shape[0], h_in.shape[1])])
        return self._forward(buf, h, B, L)[:mb.num_tokens]

    def run(self, mb: MicroBatch, h_in: torch.Tensor | None) -> torch.Tensor:
        """``[S, V]`` logits (last stage) or ``[S, hidden]`` for the micro-batch."""
        S = mb.num_tokens
        B, L = self.shape(mb)
        g = self.graphs.get((B, L))
        if g is not None:
            g.copied.synchronize()  # the previous step's copy has left the host buffer
            host = g.host
        else:
            host = torch.empty(self._size(B, L), dtype=torch.long).pin_memory()
        self._pack(host, mb, B, L)
        if g is None:
            g = self.graphs[(B, L)] = self._capture(B, L, host, h_in)
        g.inp.copy_(host, non_blocking=True)
        g.copied.record()
        if mb.tokens.device != host.device:  # tokens sampled by the previous step: copied on the device
            g.inp[:S].copy_(mb.tokens)
        if g.h is not None:
            g.h[:S].copy_(h_in)
        g.graph.replay()
        return g.out[:S].clone()  # the next replay overwrites the static output

    def _pack(self, buf: torch.Tensor, mb: MicroBatch, B: int, L: int) -> None:
        S = mb.num_tokens
        tok, pos, slots, lens, table = self._views(buf, B, L)
        tok.zero_()
        if not mb.tokens.is_cuda:  # device tokens (look-ahead) are copied in after the buffer
            tok[:S] = mb.tokens
        pos.zero_()
        pos[:, :S] = mb.pos.view(-1, S)
        slots.fill_(self.model.scratch_slot)
        slots[:S] = mb.slots
        lens.fill_(1)  # a padding row reads one key (block 0's first slot) and is dropped
        lens[:S] = torch.tensor(mb.ctx)
        table.zero_()
        table[:S] = mb.block_table(table.shape[1])

    def _views(self, buf: torch.Tensor, B: int, L: int) -> tuple[torch.Tensor, ...]:
        R, nb = self.rows, L // self.block
        tok, pos, slots, lens, table = buf.split([B, R * B, B, B, B * nb])
        return tok, pos.view(R, B), slots, lens, table.view(B, nb)

    def _forward(self, inp: torch.Tensor, h: torch.Tensor | None, B: int, L: int) -> torch.Tensor:
        tok, pos, slots, lens, table = self._views(inp, B, L)
        return self.model.decode_forward(tok, h, pos if self.rows == 3 else pos[0], slots, table, lens)

    def _capture(self, B: int, L: int, host: torch.Tensor, h_in: torch.Tensor | None) -> _Graph:
        dev = self.model.par.device
        inp = host.to(dev)
        h = None if h_in is None else torch.zeros(B, h_in.shape[-1], dtype=h_in.dtype, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm up outside the graph (lazy inits, compiled kernels)
            for _ in range(2):
                self._forward(inp, h, B, L)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(inp, h, B, L)
        return _Graph(graph, inp, host, torch.cuda.Event(), h, out)
