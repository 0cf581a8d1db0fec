"""Continuous batching for one DP replica: token budget, chunked prefill, max seqs, a paged KV
cache's block allocator, and preemption by recompute.

Each step: running sequences first (a decode is 1 token, an unfinished prefill its next chunk),
then waiting ones, until ``max_batch_tokens`` tokens or ``max_seqs`` sequences. A sequence needs
``ceil(computed_tokens / block_size)`` blocks. When blocks run out for a running sequence, the
most recently admitted sequence (perhaps the one growing) is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed from its prompt plus what it had
generated (its image embeddings stay on stage 0: images are encoded once per request).

The simulator's scheduler (``costmodels.simulator.scheduler``) makes the same choices while KV
suffices and counts KV in the same blocks (``tests/test_scheduler_agreement.py``); it reserves
the blocks of a whole prompt at admission instead of growing them chunk by chunk, so the two
preempt differently when KV runs short.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from executors.batch import ImageJob, MicroBatch


@dataclass(eq=False)  # a sequence is itself: lists of them are searched by identity, not by value
class Seq:
    req: int
    tokens: list[int]  # prompt + generated so far
    prompt_len: int
    max_new: int
    mrope: torch.Tensor | None = None  # [3, prompt_len] positions (VL) ; later tokens: i + delta
    mrope_delta: int = 0
    image_pixels: torch.Tensor | None = None
    image_grid: list[tuple[int, int, int]] = field(default_factory=list)
    image_tok_idx: list[int] = field(default_factory=list)  # prompt indices of image tokens
    computed: int = 0  # tokens whose K/V is in the cache
    blocks: list[int] = field(default_factory=list)
    encoded: bool = False  # images sent for encoding (once per request)
    encoder: int | None = None  # the dedicated encoder rank that encodes this request's images

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def positions(self, lo: int, hi: int) -> torch.Tensor:
        if self.mrope is None:
            return torch.arange(lo, hi)
        idx = torch.arange(lo, hi)
        out = idx[None].repeat(3, 1) + self.mrope_delta
        inside = idx < self.prompt_len
        out[:, inside] = self.mrope[:, idx[inside]]
        return out


@dataclass
class Chunk:
    seq: Seq
    n: int


class BlockPool:
    def __init__(self, num_blocks: int):
        self.free = deque(range(num_blocks))
        self.total = num_blocks

    def need(self, s: Seq, upto: int, block: int) -> int:
        return max(0, -(-upto // block) - len(s.blocks))

    def grow(self, s: Seq, upto: int, block: int) -> bool:
        k = self.need(s, upto, block)
        if k > len(self.free):
            return False
        s.blocks.extend(self.free.popleft() for _ in range(k))
        return True

    def release(self, s: Seq) -> None:
        self.free.extend(s.blocks)
        s.blocks = []


class Scheduler:
    """One lane's continuous batching. The lanes of a replica (pipeline micro-batches in flight,
    ``Scheduler.lanes``) share its KV block pool and its ``max_seqs`` seats; the token budget is
    per step of a lane (one micro-batch), as in the simulator."""

    def __init__(self, num_blocks: int, block_size: int, max_batch_tokens: int, max_seqs: int,
                 pool: BlockPool | None = None):
        self.pool = pool or BlockPool(num_blocks)
        self.peers: list[Scheduler] = [self]  # the replica's lanes, this one included
        self.block, self.budget, self.max_seqs = block_size, max_batch_tokens, max_seqs
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.preemptions = 0

    def add(self, s: Seq) -> None:
        self.waiting.append(s)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self) -> Seq:
        """Preempt the most recently admitted running sequence: free its blocks and put it first
        in the queue, to be recomputed from scratch."""
        victim = self.running.pop()
        self.pool.release(victim)
        victim.computed = 0  # its image embeddings stay on stage 0 (``encoded`` holds)
        self.waiting.appendleft(victim)
        self.preemptions += 1
        return victim

    def schedule(self, skip: frozenset[int] = frozenset()) -> tuple[list[Chunk], list[int]]:
        """Chunks of this step and the requests preempted now (their KV blocks are freed).

        Running sequences are served oldest first; one that cannot grow preempts the newest
        running sequence, itself if it is the newest, so the oldest always progresses (each
        accepted request fits the cache alone) and no two sequences preempt each other forever.
        ``skip``: running requests left out of this step (they end on a token still computing:
        ``Engine._look_ahead``); they keep their blocks until they finish, and their seats go to
        requests admitted now."""
        chunks: list[Chunk] = []
        dropped: list[int] = []
        budget = self.budget
        for s in list(self.running):
            if budget == 0:
                break
            if (dropped and s.req in dropped) or s.req in skip:  # preempted earlier in this loop, or ending
                continue
            n = min(len(s.tokens) - s.computed, budget)
            while not self.pool.grow(s, s.computed + n, self.block):
                victim = self._preempt()
                dropped.append(victim.req)
                if victim is s:
                    break
                if any(c.seq is victim for c in chunks):
                    budget += next(c.n for c in chunks if c.seq is victim)
                    chunks = [c for c in chunks if c.seq is not victim]
            else:
                chunks.append(Chunk(s, n))
                budget -= n
        if dropped:  # blocks are short: admit nothing new this step
            return chunks, dropped
        while self.waiting and budget > 0 and sum(len(p.running) for p in self.peers) < self.max_seqs + len(skip):
            s = self.waiting[0]
            n = min(len(s.tokens) - s.computed, budget)
            if not self.pool.grow(s, s.computed + n, self.block):
                break
            self.waiting.popleft()
            self.running.append(s)
            chunks.append(Chunk(s, n))
            budget -= n
        return chunks, dropped

    @staticmethod
    def lanes(n: int, num_blocks: int, block_size: int, max_batch_tokens: int, max_seqs: int) -> list["Scheduler"]:
        """``n`` lanes of one replica over one pool of ``num_blocks``."""
        pool = BlockPool(num_blocks)
        out = [Scheduler(num_blocks, block_size, max_batch_tokens, max_seqs, pool) for _ in range(n)]
        for sc in out:
            sc.peers = out
        return out

    def finish(self, s: Seq) -> None:
        """``s`` is done (running, or preempted while its last token was pending): free its blocks."""
        if any(x is s for x in self.running):
            self.running = [x for x in self.running if x is not s]
        else:
            self.waiting = deque(x for x in self.waiting if x is not s)
        self.pool.release(s)


def build_microbatch(chunks: list[Chunk], mode: str, block: int, image_token: int | None) -> MicroBatch:
    """Pack chunks into one MicroBatch (tensors on CPU). A sequence's key slots are its blocks
    expanded: ``slot(p) = blocks[p // block] * block + p % block`` for positions ``0 .. hi-1``."""
    if chunks and all(c.n == 1 and c.seq.prompt_len <= c.seq.computed == len(c.seq.tokens) - 1 for c in chunks):
        return _decode_microbatch(chunks, mode, block)
    return _packed_microbatch(chunks, mode, block)


def _packed_microbatch(chunks: list[Chunk], mode: str, block: int) -> MicroBatch:
    """Any chunks: every token on one packed axis, built from plain lists (a mixed step of 64
    sequences in ~0.3 ms, not the ~2 ms of per-sequence tensors). The key lists (every key each
    token may read) are left empty: ``MicroBatch.with_keys`` fills them from ``blocks`` and ``ctx``
    where an attention path needs them (the paged kernels and the step graphs read the block table)."""
    toks: list[int] = []
    seq: list[int] = []
    idx: list[int] = []
    slots: list[int] = []
    samp: list[int] = []
    sreq: list[int] = []
    img_tok: list[int] = []
    img_src: list[tuple[int, int, int]] = []
    images: list[ImageJob] = []
    mrope = chunks[0].seq.mrope is not None if chunks else False
    rows: list[np.ndarray] = []  # M-RoPE positions, per chunk [3, n]
    t = 0
    for j, c in enumerate(chunks):
        s = c.seq
        lo, hi = s.computed, s.computed + c.n
        b = s.blocks
        toks += s.tokens[lo:hi]
        seq += [j] * c.n
        idx += range(lo, hi)
        slots += [b[p // block] * block + p % block for p in range(lo, hi)]
        if mrope:
            rows.append(np.arange(lo, hi)[None].repeat(3, 0) + s.mrope_delta if lo >= s.prompt_len
                        else s.positions(lo, hi).numpy())
        if hi == len(s.tokens):
            samp.append(t + c.n - 1)
            sreq.append(s.req)
        if s.image_tok_idx:
            inside = [k for k, p in enumerate(s.image_tok_idx) if lo <= p < hi]
            if inside:
                img_tok += [t + s.image_tok_idx[k] - lo for k in inside]
                img_src.append((s.req, inside[0], len(inside)))
                if not s.encoded:
                    pixels = s.image_pixels if s.encoder is None else None
                    images.append(ImageJob(s.req, pixels, s.image_grid, s.encoder))
                    s.encoded = True
        t += c.n
    tok_idx = torch.tensor(idx, dtype=torch.long)
    none = torch.zeros(0, dtype=torch.long)
    return MicroBatch(
        mode=mode, tokens=torch.tensor(toks, dtype=torch.long),
        pos=torch.from_numpy(np.concatenate(rows, axis=1)) if mrope else tok_idx,
        seq=torch.tensor(seq, dtype=torch.long), tok_idx=tok_idx, slots=torch.tensor(slots, dtype=torch.long),
        key_slots=none, key_seq=none, key_pos=none, sample_idx=torch.tensor(samp, dtype=torch.long), sample_req=sreq,
        img_tok=torch.tensor(img_tok, dtype=torch.long), img_src=img_src, images=images,
        blocks=[c.seq.blocks[:-(-(c.seq.computed + c.n) // block)] for c in chunks],
        ctx=[c.seq.computed + c.n for c in chunks],
        decode=bool(chunks) and len(samp) == len(chunks) == t,
    )


def _decode_microbatch(chunks: list[Chunk], mode: str, block: int) -> MicroBatch:
    """A micro-batch of decodes (one generated token per sequence, its last) from plain lists in one
    pass: no per-sequence tensors, and no packed key lists (decode attention reads each sequence's
    blocks and context)."""
    S = len(chunks)
    at, toks, slots, blocks, reqs = [0] * S, [0] * S, [0] * S, [[]] * S, [0] * S
    for i, c in enumerate(chunks):
        s, p = c.seq, c.seq.computed  # p: position of the new token
        b = s.blocks
        at[i], toks[i], reqs[i] = p, s.tokens[p], s.req
        slots[i] = b[p // block] * block + p % block
        blocks[i] = b[:p // block + 1]
    tok_idx = torch.tensor(at)
    if chunks[0].seq.mrope is None:
        pos = tok_idx
    else:  # past the prompt, every M-RoPE row is the index plus the sequence's delta
        pos = torch.tensor([p + c.seq.mrope_delta for p, c in zip(at, chunks)]).expand(3, S).clone()
    none = torch.zeros(0, dtype=torch.long)
    seq = torch.arange(S)
    return MicroBatch(
        mode=mode, tokens=torch.tensor(toks), pos=pos, seq=seq, tok_idx=tok_idx, slots=torch.tensor(slots),
        key_slots=none, key_seq=none, key_pos=none, sample_idx=seq, sample_req=reqs, img_tok=none,
        blocks=blocks, ctx=[p + 1 for p in at], decode=True,
    )
