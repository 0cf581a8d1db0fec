"""Decode steps replayed as CUDA graphs, one graph per (batch, keys) bucket.

A decode micro-batch (``S`` sequences, one new token each) costs one read of the
stage's weights and KV; run eagerly, its hundreds of small kernels are launched one by one from
Python and the step is bound by the launches, not by HBM. Here the whole stage forward
(``StageModel.decode_forward``: embedding or received hidden states, every layer with its
collectives, the lm_head) is captured once per bucket and replayed:

* batch bucket ``B >= S`` from ``BATCH_BUCKETS``; key bucket ``L >=`` the longest context
  (``keys_bucket``; both from ``plans.engine_shapes``, which the cost model reads too);
* the graph reads one static int64 buffer ``[tokens B | pos R*B | slots B | lens B | table B*L/bs]``
  (``R`` = 1, or 3 rows for M-RoPE; ``table``: each sequence's KV blocks, the block table), filled by
  one host-to-device copy per step; attention reads whole blocks through the table. Padding rows
  write the scratch slot, read one key, and their outputs are dropped;
* later pipeline stages copy the received hidden states into a static ``[B, hidden]`` buffer;
* plain TP mode, or SP x TP where the stage's Ulysses all-to-all is the LL kernel
  (``executors.all_to_all``, on GPUs of one host; NCCL's hung inside a graph): then ``B`` is a
  multiple of sp, each sp rank runs ``B / sp`` rows and the rows are gathered through the same kernel
  (``StageModel.decode_forward``), one graph per ``(B, L, mode)``.

Prefill and mixed steps (``MixedGraphs``; plain TP, or SP x TP as above) are captured the same way, per bucket
``(T, L)`` of tokens (``TOKEN_BUCKETS``, up to ``max_tokens``) and keys, room for ``S`` sequences
(``max_seqs``' bucket, at most ``T``) whatever the step holds: the static
buffer is ``[tokens T | pos R*T | slots T | image flag T | sample S | t0, nq, ctx S+1 | seq_of, row0 P
| table (S+1)*L/bs]``; a VL model's image rows are copied into one static ``[T, hidden]`` buffer before
each replay. ``StageModel.mixed_forward`` attends the prefill chunks with the paged prefill kernel
(``executors.paged_prefill``) over a fixed grid of ``P = T / 16 + S`` programs, each sequence's keys
in ranges set by the key bucket ``L`` (``paged_prefill.splits``), and the decodes (sequences of one
query row) with the paged decode kernel over the ``S + 1`` sequence slots, key count 0 on the others
(``GRAPH_DECODES``; ``paged_prefill.PrefillInputs.decode_inputs``); row ``S`` is an empty sequence that
padding programs point at. Other SP x TP steps and steps past the largest bucket run eagerly.

Graphs share one memory pool, one static input buffer per kind (with its pinned host twin) and one
static output (``[rows, V]`` logits or ``[rows, hidden]``): graphs run one at a time, each step
refills the prefix its bucket reads, and the replay's rows are copied out before the next. Every
bucket up to the longest context the stage can hold (``max_keys``) is captured at warm-up
(``capture_all``, ``RankRunner.finish_warm_up``): a bucket first met while serving would cost its
step the capture, tens to hundreds of milliseconds. Every rank of a stage captures the same buckets
in the same order (the NCCL and one-shot collectives inside pair up). CPU ranks never use this module.
"""

from __future__ import annotations

import functools
import time

import torch

from executors import paged_decode, paged_prefill
from executors.batch import MicroBatch, to_device
from executors.switches import switch
from plans.engine_shapes import BATCH_BUCKETS, MIN_KEYS, key_sizes, keys_bucket
from plans.mesh import GRAPH_TOKEN_BUCKETS as TOKEN_BUCKETS
from plans.mesh import bucket

# a captured step's decodes through the paged decode kernel (0: through the paged prefill kernel with the
# chunks, where a program of 16 query rows holds one decode: one layer of 8-128 decodes took 1.1-2.3x the
# decode kernel's time on an H200, bench/results/graph_decodes.md)
GRAPH_DECODES = switch("SHIFTPLAN_GRAPH_DECODES")


class StaticInputs:
    """One static int64 buffer on the device that every graph of a kind reads a prefix of, and its
    pinned host twin: a step packs its bucket's prefix on the host and copies it up without
    blocking; the next step waits for that copy (``copied``) before packing again."""

    def __init__(self, n: int, device: torch.device):
        self.dev = torch.zeros(n, dtype=torch.long, device=device)
        self.host = torch.zeros(n, dtype=torch.long).pin_memory()
        self.copied = torch.cuda.Event()

    def fill(self, n: int, pack) -> torch.Tensor:
        """``pack(host[:n])``, then ``host[:n]`` copied to the device; returns ``dev[:n]``."""
        self.copied.synchronize()  # the previous step's copy has left the host buffer
        pack(self.host[:n])
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        self.copied.record()
        return self.dev[:n]


class _BucketGraphs:
    """What decode and mixed graphs share: graphs by bucket key, captured into one memory pool
    (``pools.pool``: the decode graphs' own, which the mixed graphs share: the two never run at
    once); the static inputs (``inputs``, sized for the largest bucket, made at first use); received
    hidden states ``h [max_rows, hidden]`` (later pipeline stages); one output every graph writes
    its rows into, ``[out_rows, V]`` logits (last stage) or ``[max_rows, hidden]``."""

    def __init__(self, model, max_rows: int, out_rows: int, max_keys: int, pools=None):
        self.model = model
        self.pools, self.pool = (pools if pools is not None else self), None
        self.rows = 3 if model.a.mrope_section else 1
        self.block = model.block_size
        self.key_sizes = key_sizes(max_keys, self.block)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0  # wall time spent capturing (graphs: len(self.graphs))
        self.last: tuple | None = None  # the last replayed bucket: the only one the static inputs hold a step of
        a, dev, dtype = model.a, model.par.device, model.dtype
        self.h = torch.zeros(max_rows, a.hidden, dtype=dtype, device=dev) if model.model.embed is None else None
        self.out = (torch.zeros(out_rows, a.vocab, dtype=torch.float32, device=dev) if model.model.lm_head is not None
                    else torch.zeros(max_rows, a.hidden, dtype=dtype, device=dev))

    @functools.cached_property
    def inputs(self) -> StaticInputs:
        return StaticInputs(self._largest(), self.model.par.device)

    def _largest(self) -> int:
        raise NotImplementedError

    def _filled(self, mb: MicroBatch, shape: tuple, static: bool = True) -> torch.Tensor:
        """``mb``'s inputs for bucket ``shape`` on the device: packed on the host (``_pack``) and copied
        up, into the static buffer (``static``) or a new one; a look-ahead step's tokens, already on
        the device (some sampled by the previous step), are copied over the buffer's first rows,
        where every kind holds its tokens."""
        if static:
            buf = self.inputs.fill(self._size(*shape), lambda host: self._pack(host, mb, *shape))
        else:
            buf = torch.empty(self._size(*shape), dtype=torch.long)
            self._pack(buf, mb, *shape)
            buf = buf.to(self.model.par.device)
        if mb.tokens.is_cuda:
            buf[:mb.num_tokens].copy_(mb.tokens)
        return buf

    def _capture(self, key: tuple, fn, warm_runs: int = 2) -> torch.cuda.CUDAGraph:
        """Capture ``fn`` (a forward over the static inputs whose result is copied into ``out``)."""
        t = time.perf_counter()
        graph, _, self.pools.pool = capture(fn, self.model.par.device, self.pools.pool, warm_runs)
        self.graphs[key] = graph
        self.capture_s += time.perf_counter() - t
        return graph

    def capture_all(self, modes: tuple[str, ...]) -> int:
        """Capture every bucket of ``buckets(modes)`` not yet captured, on padding-only inputs
        (``_pack`` of no micro-batch: every row writes the scratch slot and is dropped); the number
        captured. Every rank of a stage calls it with the same modes, so their captures pair up. A
        bucket whose rows and mode an earlier capture ran (compiled shapes, tuned kernels) is warmed up
        once before its capture, not twice."""
        n, done = 0, {(key[0], key[-1]) for key in self.graphs}
        for key in self.buckets(modes):
            if key not in self.graphs:
                shape = key[:-1]
                inp = self.inputs.fill(self._size(*shape), lambda host: self._pack(host, None, *shape))
                if self._capture_bucket(*key, inp, warm_runs=1 if (key[0], key[-1]) in done else 2) is None:
                    break
                done.add((key[0], key[-1]))
                n += 1
        self.last = None  # the static inputs hold padding
        return n

    def _into_out(self, y: torch.Tensor) -> torch.Tensor:
        out = self.out[:y.shape[0]]
        out.copy_(y)  # into the shared output: a graph keeps no output of its own alive
        return out


class DecodeGraphs(_BucketGraphs):
    """Captures and replays ``model.decode_forward`` per bucket (``model``: a ``StageModel``), for
    contexts up to ``max_keys``."""

    def __init__(self, model, max_batch: int, max_keys: int = MIN_KEYS):
        self.sizes = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (bucket(max_batch, BATCH_BUCKETS) or max_batch,)
        super().__init__(model, self.sizes[-1], self.sizes[-1], max_keys)

    def accepts(self, mb: MicroBatch, mode: str) -> bool:
        """A decode micro-batch with no image rows that fits a bucket: in plain TP mode, or in SP x TP
        mode where the stage's Ulysses all-to-all is the LL kernel (``StageModel.sp_a2a``, capturable)."""
        if not mb.decode or mb.img_tok.numel() or max(mb.ctx) > self.key_sizes[-1]:
            return False
        if mode == "sp_tp" and self.model.sp_a2a is None:
            return False
        return self._batch(mb.num_tokens, mode) is not None

    def _batch(self, S: int, mode: str) -> int | None:
        """The batch bucket of ``S`` sequences: under SP x TP a multiple of the sp degree."""
        sp = self.model.par.sp if mode == "sp_tp" else 1
        return next((b for b in self.sizes if b >= S and b % sp == 0), None)

    def shape(self, mb: MicroBatch, mode: str = "tp") -> tuple[int, int]:
        """The bucket ``(B, L)`` of a decode micro-batch (``L`` a multiple of the block size)."""
        return self._batch(mb.num_tokens, mode), -(-keys_bucket(max(mb.ctx)) // self.block) * self.block

    def _size(self, B: int, L: int) -> int:
        return B * (3 + self.rows) + B * (L // self.block)

    def _largest(self) -> int:
        return self._size(self.sizes[-1], self.key_sizes[-1])

    def padded(self, mb: MicroBatch, h_in: torch.Tensor | None, mode: str = "tp") -> torch.Tensor:
        """What a replay computes, run eagerly on padded inputs (no graph): ``[S, ...]``."""
        B, L = self.shape(mb, mode)
        buf = self._filled(mb, (B, L), static=False)
        h = None if h_in is None else torch.cat([h_in, h_in.new_zeros(B - h_in.shape[0], h_in.shape[1])])
        return self._forward(buf, h, B, L, mode)[:mb.num_tokens]

    def run(self, mb: MicroBatch, h_in: torch.Tensor | None, mode: str = "tp") -> torch.Tensor:
        """``[S, V]`` logits (last stage) or ``[S, hidden]`` for the micro-batch."""
        S = mb.num_tokens
        B, L = self.shape(mb, mode)
        inp = self._filled(mb, (B, L))
        if self.h is not None:
            self.h[:S].copy_(h_in)
        graph = self.graphs.get((B, L, mode)) or self._capture_bucket(B, L, mode, inp)
        graph.replay()
        self.last = (B, L, mode)
        return self.out[:S].clone()  # the next replay overwrites the static output

    def buckets(self, modes: tuple[str, ...]) -> list[tuple[int, int, str]]:
        """Every ``(B, L, mode)`` a micro-batch this stage accepts can meet, in capture order."""
        return [(B, L, mode) for mode in modes if mode != "sp_tp" or self.model.sp_a2a is not None
                for B in sorted({self._batch(b, mode) for b in self.sizes} - {None}) for L in self.key_sizes]

    def _capture_bucket(self, B: int, L: int, mode: str, inp: torch.Tensor, warm_runs: int = 2) -> torch.cuda.CUDAGraph:
        h = None if self.h is None else self.h[:B]
        return self._capture((B, L, mode), lambda: self._into_out(self._forward(inp, h, B, L, mode)), warm_runs)

    def _pack(self, buf: torch.Tensor, mb: MicroBatch | None, B: int, L: int) -> None:
        """Fill ``buf`` for ``mb`` (None: padding rows only)."""
        S = mb.num_tokens if mb is not None else 0
        tok, pos, slots, lens, table = self._views(buf, B, L)
        tok.zero_()
        pos.zero_()
        slots.fill_(self.model.scratch_slot)
        lens.fill_(1)  # a padding row reads one key (block 0's first slot) and is dropped
        table.zero_()
        if mb is None:
            return
        if not mb.tokens.is_cuda:  # device tokens (look-ahead): ``_filled`` copies them in
            tok[:S] = mb.tokens
        pos[:, :S] = mb.pos.view(-1, S)
        slots[:S] = mb.slots
        lens[:S] = torch.tensor(mb.ctx)
        table[:S] = mb.block_table(table.shape[1])

    def _views(self, buf: torch.Tensor, B: int, L: int) -> tuple[torch.Tensor, ...]:
        R, nb = self.rows, L // self.block
        tok, pos, slots, lens, table = buf.split([B, R * B, B, B, B * nb])
        return tok, pos.view(R, B), slots, lens, table.view(B, nb)

    def _forward(self, inp: torch.Tensor, h: torch.Tensor | None, B: int, L: int, mode: str) -> torch.Tensor:
        tok, pos, slots, lens, table = self._views(inp, B, L)
        return self.model.decode_forward(tok, h, pos if self.rows == 3 else pos[0], slots, table, lens, mode)


def capture(fn, dev: torch.device, pool, warm_runs: int = 2) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, object]:
    """``fn()`` (device work on static tensors) warmed up ``warm_runs`` times on a side stream (lazy
    inits, compiled kernels, autotuning) and captured in ``pool`` (made at the first capture);
    returns the graph, its static output and the pool."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(warm_runs):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out, pool


class MixedGraphs(_BucketGraphs):
    """Captures and replays ``model.mixed_forward`` per ``(T, S, L)`` bucket (module doc), for
    contexts up to ``max_keys``; shares ``pool_of``'s memory pool (the stage's ``DecodeGraphs``)."""

    def __init__(self, model, max_tokens: int, max_seqs: int, pool_of, max_keys: int = MIN_KEYS):
        top = min(max_tokens, TOKEN_BUCKETS[-1])
        self.sizes = tuple(b for b in TOKEN_BUCKETS if b < top) + (bucket(top, TOKEN_BUCKETS),)
        self.seq_sizes = tuple(b for b in BATCH_BUCKETS if b < max_seqs) + (bucket(max_seqs, BATCH_BUCKETS) or max_seqs,)
        super().__init__(model, self.sizes[-1], min(self.seq_sizes[-1], self.sizes[-1]), max_keys, pools=pool_of)
        # the step's image rows (VL models), made here, never inside a capture
        self.img = torch.zeros(self.sizes[-1], model.a.hidden, dtype=model.dtype, device=model.par.device) if self.images else None
        # decodes through the paged decode kernel (``GRAPH_DECODES``) where it takes the model's head groups
        self.decode_kernel = GRAPH_DECODES and model.a.heads // model.a.kv_heads <= paged_decode.BLOCK_G

    def accepts(self, mb: MicroBatch, mode: str) -> bool:
        """A prefill or mixed micro-batch (image rows included), naming every sequence's blocks, that
        fits a bucket, on a stage the paged prefill kernel serves: in plain TP mode, or in SP x TP mode
        where the stage's Ulysses all-to-all is the LL kernel (``StageModel.sp_a2a``) and the token
        bucket is a multiple of sp."""
        if mb.decode or not 0 < mb.num_tokens <= self.sizes[-1] or max(mb.ctx, default=0) > self.key_sizes[-1]:
            return False
        if mode == "sp_tp" and not self._mode_ok(bucket(mb.num_tokens, self.sizes), mode):
            return False
        return self.model.paged_prefill_ok and len(mb.ctx) <= self.seq_sizes[-1] and len(mb.blocks) == len(mb.ctx)

    def _mode_ok(self, T: int, mode: str) -> bool:
        return mode != "sp_tp" or (self.model.sp_a2a is not None and T % self.model.par.sp == 0)

    def shape(self, mb: MicroBatch) -> tuple[int, int, int]:
        """The bucket ``(T, S, L)``: ``S`` is the most sequences ``T`` tokens can hold (``max_seqs``'
        bucket, at most ``T``), not the step's own count, so steps of few and of many sequences share a
        graph; the extra programs point at the empty sequence and exit. ``L`` a multiple of the
        block size."""
        T = bucket(mb.num_tokens, self.sizes)
        return T, self._seqs(T), -(-keys_bucket(max(mb.ctx)) // self.block) * self.block

    def _seqs(self, T: int) -> int:
        return min(self.seq_sizes[-1], T)

    def _programs(self, T: int, S: int) -> int:
        return T // paged_prefill.BLOCK_M + S

    def _size(self, T: int, S: int, L: int) -> int:
        return T * (3 + self.rows) + S + 3 * (S + 1) + 2 * self._programs(T, S) + (S + 1) * (L // self.block)

    def _largest(self) -> int:
        T = self.sizes[-1]
        return self._size(T, self._seqs(T), self.key_sizes[-1])

    def _views(self, buf: torch.Tensor, T: int, S: int, L: int) -> tuple[torch.Tensor, ...]:
        R, P, nb = self.rows, self._programs(T, S), L // self.block
        tok, pos, slots, flag, sample, seqs, progs, table = buf.split(
            [T, R * T, T, T, S, 3 * (S + 1), 2 * P, (S + 1) * nb])
        return tok, pos.view(R, T), slots, flag, sample, seqs.view(3, S + 1), progs.view(2, P), table.view(S + 1, nb)

    def _pack(self, buf: torch.Tensor, mb: MicroBatch | None, T: int, S: int, L: int) -> None:
        """Fill ``buf`` for ``mb`` (None: padding only, every program pointing at the empty sequence)."""
        tok, pos, slots, flag, sample, seqs, progs, table = self._views(buf, T, S, L)
        for t in (tok, flag, pos, sample, seqs, table):
            t.zero_()
        slots.fill_(self.model.scratch_slot)
        if mb is None:
            progs[0], progs[1] = S, 0
            return
        n, s, k = mb.num_tokens, len(mb.ctx), mb.sample_idx.numel()
        if not mb.tokens.is_cuda:  # device tokens (look-ahead): ``_filled`` copies them in
            tok[:n] = mb.tokens
        flag[mb.img_tok] = 1
        pos[:, :n] = mb.pos.view(-1, n)
        slots[:n] = mb.slots
        sample[:k] = mb.sample_idx
        nq = torch.bincount(mb.seq, minlength=s)
        seqs[0, :s] = torch.cumsum(nq, 0) - nq  # t0: tokens are packed sequence by sequence
        seqs[1, :s] = nq
        seqs[2, :s] = torch.tensor(mb.ctx)
        progs[0], progs[1] = paged_prefill.program_rows(nq, seqs[0, :s], progs.shape[1], S,
                                                        decodes=not self.decode_kernel)
        table[:s] = mb.block_table(table.shape[1])

    def _forward(self, inp: torch.Tensor, h: torch.Tensor | None, T: int, S: int, L: int, mode: str) -> torch.Tensor:
        tok, pos, slots, flag, sample, seqs, progs, table = self._views(inp, T, S, L)
        pre = paged_prefill.PrefillInputs(table, seqs[0], seqs[1], seqs[2], progs[0], progs[1], self.block)
        if self.decode_kernel:
            pre = pre.decode_inputs(T)
        image = (flag, self.img[:T]) if self.images else None
        return self.model.mixed_forward(tok, h, pos if self.rows == 3 else pos[0], slots, sample, pre, image, mode)

    @property
    def images(self) -> bool:
        """The stage embeds tokens of a model with a vision tower: steps may carry image rows."""
        return self.model.a.vision is not None and self.model.model.embed is not None

    def _fill_images(self, mb: MicroBatch) -> None:
        if self.images and mb.img_tok.numel():
            self.img.index_copy_(0, to_device(mb.img_tok, self.img.device), self.model.image_rows(mb).to(self.img.dtype))

    def padded(self, mb: MicroBatch, h_in: torch.Tensor | None, mode: str = "tp") -> torch.Tensor:
        """What a replay computes, run eagerly on padded inputs (no graph)."""
        T, S, L = self.shape(mb)
        buf = self._filled(mb, (T, S, L), static=False)
        h = None if h_in is None else torch.cat([h_in, h_in.new_zeros(T - h_in.shape[0], h_in.shape[1])])
        self._fill_images(mb)
        return self._out(mb, self._forward(buf, h, T, S, L, mode))

    def _out(self, mb: MicroBatch, y: torch.Tensor) -> torch.Tensor:
        return y[:mb.sample_idx.numel()] if self.model.model.lm_head is not None else y[:mb.num_tokens]

    def run(self, mb: MicroBatch, h_in: torch.Tensor | None, mode: str = "tp") -> torch.Tensor:
        """``[S, V]`` logits of the sampled rows (last stage) or ``[T, hidden]`` for the micro-batch."""
        T, S, L = self.shape(mb)
        inp = self._filled(mb, (T, S, L))
        self._fill_images(mb)  # before a capture too: its warm-up runs read real rows
        if self.h is not None:
            self.h[:mb.num_tokens].copy_(h_in)
        graph = self.graphs.get((T, S, L, mode))
        if graph is None:
            graph = self._capture_bucket(T, S, L, mode, inp)
            if graph is None:
                return self.model.forward(mb, h_in)  # the kernel failed in the warm-up: eager, and no more graphs
        graph.replay()
        self.last = (T, S, L, mode)
        return self._out(mb, self.out).clone()  # the next replay overwrites the static output

    def buckets(self, modes: tuple[str, ...]) -> list[tuple[int, int, int, str]]:
        """Every ``(T, S, L, mode)`` a micro-batch this stage accepts can meet, in capture order."""
        return [(T, self._seqs(T), L, mode) for mode in modes for T in self.sizes if self._mode_ok(T, mode)
                for L in self.key_sizes]

    def _capture_bucket(self, T: int, S: int, L: int, mode: str, inp: torch.Tensor,
                        warm_runs: int = 2) -> torch.cuda.CUDAGraph | None:
        """The bucket's graph, or None where the paged prefill kernel failed in the capture's warm-up
        (``paged_prefill._failed``: no more graphs; any other failure is raised)."""
        h = None if self.h is None else self.h[:T]
        try:
            return self._capture((T, S, L, mode), lambda: self._into_out(self._forward(inp, h, T, S, L, mode)), warm_runs)
        except Exception:
            if not paged_prefill._failed:
                raise
            return None


def profile(graphs: DecodeGraphs, reps: int = 100) -> dict:
    """Where a decode step's GPU time goes (``SHIFTPLAN_GRAPH_PROFILE``, ``worker.run_rank``): for the
    last decode step's bucket (``last``: the static inputs hold that step's), the replay time in ms
    (CUDA events over ``reps`` replays) and its kernels (``kernel_table``). Every rank of a group
    replays the same graph as often (their collectives pair up)."""
    if graphs.last is None:
        return {}
    key = graphs.last
    g = graphs.graphs[key]
    for _ in range(10):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return {"bucket": list(key), "graph_replay_ms": round(a.elapsed_time(b) / reps, 4), "graph_kernels": kernel_table(g.replay)}


def kernel_table(fn, reps: int = 5, top: int = 40) -> list[dict]:
    """The GPU kernels of ``fn`` (a graph replay) by total time per call: where a step's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    try:
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
        return [{"kernel": e.key[:90], "us_per_step": round(e.device_time_total / reps, 1), "calls_per_step": e.count // reps}
                for e in rows]
    except Exception as e:  # profiling is a diagnosis, never a reason to lose the run
        return [{"error": f"{type(e).__name__}: {e}"}]

