"""A row-parallel output's all-reduce, the residual add and the next RMSNorm in one GPU kernel.

Each decoder layer of a TP rank ends its attention and its MLP with a row-parallel product whose
partial sums ``x_r [n, H]`` (one per rank r of the group) are all-reduced, added to the residual
stream and normalised by the next RMSNorm::

    h = residual + sum_r x_r                      [n, H]   (the new residual stream)
    y = w * rms(h) = w * h / sqrt(mean(h^2) + eps)   [n, H]   (the next product's input)

Unfused that is the all-reduce kernel and a compiled add + norm kernel, each a few microseconds
at decode sizes (~8 KB a row): a TP2 decode step of a 32-layer model runs 64 of each. Here one
kernel does it over PyTorch symmetric memory (peer buffers mapped over NVLink, no NVLink
multicast). Every rank's buffer holds one slot per source rank, ``[world, rows, H]``; program
``pid`` of ``G`` (always ``G = PROGRAMS``; it owns rows ``pid, pid + G, ...``) on rank ``me``:

1. waits until every peer has finished reading what it wrote into that peer's slot ``me`` last
   call (flag ``done[pid, peer]`` in its own signal pad; set to 1 at start-up, so the first
   call passes; the peer set it long ago, during the GEMVs, so this costs one poll);
2. writes its rows of ``x`` into slot ``me`` of every rank's buffer (stores over NVLink: the data
   is pushed, never fetched);
3. raises ``written[pid, me]`` on every rank (release: the rows land first), and waits for
   ``written[pid, peer]`` from every peer (acquire);
4. sums the slots of its own buffer in rank order (fp32, rounded to the model dtype as an
   all-reduce returns it: every rank holds the same bits), adds the residual (rounded once more,
   as ``a + residual`` in the model dtype), writes ``h``; normalises in fp32, rounds, scales by
   ``w`` (as ``layers.rms_norm``), writes ``y``;
5. raises ``done[pid, me]`` on every peer: it may overwrite its slot here next call.

One one-way NVLink latency per call (step 3), no remote reads and no closing barrier: the
one-shot all-reduce kernel pays a barrier, a remote read and a second barrier. Flags are
compare-and-swap 0 -> 1 (raise, retrying while the last one is unconsumed) and 1 -> 0 (wait), so
they need no host reset and the kernel replays inside CUDA graphs. The flags sit at the end of
the signal pad, clear of other kernels' (the one-shot all-reduce's low slots). On Hopper the
kernel is a programmatic dependent launch (``gemv.PDL``): it waits for its own flags before the
product it sums has finished, and the next product launches while it runs.

For bf16 (``SHIFTPLAN_REDUCE_LL=0`` keeps the flags above) the kernel swaps the flags for
data that carries its own flag, NCCL's "LL" protocol: every 8-byte word pushed to a peer holds two
bf16 values and the call's sequence number (``seq << 32 | bits``), written by one 64-bit store, so a
word is either old or whole. The reader polls its buffer until every word of a row carries this
call's ``seq``: no fence, no remote atomic, no flag round trip; one one-way NVLink latency. Words
alternate between two halves of the buffer by ``seq``'s parity, so a rank writing call ``k + 1``
never overwrites call ``k``'s words a peer may still read (it can only be one call ahead: it needs
that peer's call-``k`` words to finish call ``k``). Each program keeps its ``seq`` in a counter at
the end of its rank's buffer that every call advances on every rank (TP ranks run the same calls),
so it replays in CUDA graphs. Twice the bytes of the flag protocol (8 KB of bf16 a row becomes 16 KB):
nothing at decode sizes. On two H200 in CUDA graphs (``bench/results/allreduce_latency.md``) it takes
4.25 / 4.58 / 6.9 us at 1 / 8 / 32 rows of 4,096 bf16 against the flag protocol's 6.67 / 7.68 / 9.46,
with the same bits.
"""

from __future__ import annotations

import torch

from executors import gemv
from executors.switches import switch

try:
    import triton
    import triton.language as tl

    from executors.paged_decode import depend
except ImportError:  # CPU-only installs: the unfused path
    triton = None

PROGRAMS = 16  # programs of every call (fixed: a program's rows and flags are the same call to call)
# rows served here (bench/results/allreduce_latency.md, in CUDA graphs, 4,096 bf16 a row, LL protocol against
# one-shot all-reduce + compiled add + norm: 4.25 against 8.69 us at 1 row, 6.9 against 11.47 at 32, 39.7
# against 17.4 at 128); more rows take the one-shot all-reduce and the compiled add + norm
MAX_ROWS = 32
LL = switch("SHIFTPLAN_REDUCE_LL")  # the LL protocol (module doc) for bf16


def flag_base(signal_pad_bytes: int, world: int) -> int:
    """Index of the first of this kernel's ``2 * PROGRAMS * world`` uint32 flags in a signal pad."""
    return signal_pad_bytes // 4 - 2 * PROGRAMS * world


def launch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, buffer_ptrs: torch.Tensor,
           slot: int, signal_pad_ptrs: torch.Tensor, flags: int, rank: int, world: int,
           sync: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, y)`` for ``x, residual [n, H]`` (see the module doc). ``buffer_ptrs [world]`` /
    ``signal_pad_ptrs [world]``: device addresses of every rank's symmetric buffer (``world`` slots
    of ``slot >= n H`` elements of ``x``'s dtype; fixed, so a row's place never moves) and signal pad, whose uint32 flags from index
    ``flags`` are this kernel's (``init_flags`` once). ``sync=False`` skips the flags (one
    process holding every rank's buffer: the CPU interpreter tests)."""
    n, H = x.shape
    h, y = torch.empty_like(x), torch.empty_like(x)
    BLOCK = triton.next_power_of_2(H)
    assert n * H <= slot
    gdc = gemv.pdl(x)
    _reduce_add_norm[(PROGRAMS,)](x, residual, weight, h, y, buffer_ptrs, slot, signal_pad_ptrs, flags, n, H, eps,
                                  RANK=rank, WORLD=world, BLOCK=BLOCK, SYNC=sync, USE_GDC=gdc,
                                  num_warps=min(8, max(4, BLOCK // 512)), launch_pdl=gdc)
    return h, y


@torch.library.custom_op("shiftplan::reduce_add_norm", mutates_args=())
def reduce_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                    buffer_ptrs: torch.Tensor, slot: int, signal_pad_ptrs: torch.Tensor, flags: int, rank: int,
                    world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``launch`` as an op compiled layers call without a graph break (``parallel.OneShotAllReduce.add_norm``)."""
    return launch(x, residual, weight, eps, buffer_ptrs, slot, signal_pad_ptrs, flags, rank, world)


@reduce_add_norm.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, buffer_ptrs: torch.Tensor, slot: int,
      signal_pad_ptrs: torch.Tensor, flags: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def launch_ll(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, buffer_ptrs: torch.Tensor,
              words: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, y)`` as ``launch``, through the LL protocol (module doc), for bf16 ``x, residual [n, H]``
    (H even). ``buffer_ptrs [world]``: every rank's int64 symmetric buffer of ``ll_words(words, world)``
    words, zeros before the first call: two halves of a slot of ``words >= n H / 2`` words per source
    rank, then this rank's ``PROGRAMS`` sequence counters."""
    n, H = x.shape
    h, y = torch.empty_like(x), torch.empty_like(x)
    H2 = H // 2
    BLOCK = triton.next_power_of_2(H2)
    assert x.dtype == torch.bfloat16 and H % 2 == 0 and n * H2 <= words
    gdc = gemv.pdl(x)
    pairs = [t.contiguous().view(torch.int32) for t in (x, residual, weight)]
    _reduce_add_norm_ll[(PROGRAMS,)](*pairs, h.view(torch.int32), y.view(torch.int32), buffer_ptrs, words, n, H2, eps,
                                     RANK=rank, WORLD=world, BLOCK=BLOCK, USE_GDC=gdc,
                                     num_warps=min(8, max(4, BLOCK // 256)), launch_pdl=gdc)
    return h, y


def ll_words(words: int, world: int, programs: int = PROGRAMS) -> int:
    """Length (int64 words) of a rank's LL buffer for slots of ``words`` words: two halves of a slot per
    source rank, then a counter per program (``ll_begin``)."""
    return 2 * world * words + programs


@torch.library.custom_op("shiftplan::reduce_add_norm_ll", mutates_args=())
def reduce_add_norm_ll(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       buffer_ptrs: torch.Tensor, words: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``launch_ll`` as an op compiled layers call without a graph break (like ``reduce_add_norm``, it
    writes only memory reached through the buffer addresses)."""
    return launch_ll(x, residual, weight, eps, buffer_ptrs, words, rank, world)


@reduce_add_norm_ll.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, buffer_ptrs: torch.Tensor,
      words: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


def init_flags(signal_pad_ptrs: torch.Tensor, flags: int, rank: int, world: int) -> None:
    """Zero this rank's ``written`` flags and raise its ``done`` flags (every peer "has read" before
    the first call). Every rank does it, then the group synchronises, before the first call."""
    _init[(1,)](signal_pad_ptrs, flags, RANK=rank, N=PROGRAMS * world, BLOCK=triton.next_power_of_2(PROGRAMS * world))


if triton is not None:

    @triton.jit
    def _thread_id():
        """This thread's index in its program (one CTA: x only)."""
        return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r", [], dtype=tl.uint32, is_pure=True, pack=1)

    @triton.jit
    def _swap(addr, OLD: tl.constexpr, NEW: tl.constexpr, SEM: tl.constexpr):
        """Compare-and-swap the flag at ``addr`` from ``OLD`` to ``NEW`` (system scope), retrying until
        it holds ``OLD``: a raise is 0 -> 1 (waits while the last raise is unconsumed), a consume
        1 -> 0 (waits for a raise)."""
        tl.inline_asm_elementwise(
            f"""{{ .reg .u32 %v; .reg .pred %p;
            retry: atom.global.{SEM}.sys.cas.b32 %v, [$1], {OLD}, {NEW};
            setp.eq.u32 %p, %v, {OLD}; @!%p bra retry; mov.u32 $0, %v; }}""",
            "=r, l", [addr], dtype=tl.uint32, is_pure=False, pack=1)

    @triton.jit
    def _raise_on_peers(pads, index, WORLD: tl.constexpr):
        """Thread j < WORLD raises flag ``index`` in rank j's signal pad, after every thread's
        earlier memory accesses (release)."""
        tl.debug_barrier()
        peers = tl.arange(0, WORLD)
        addr = tl.load(pads + peers).to(tl.pointer_type(tl.uint32)) + index
        if _thread_id() < WORLD:
            _swap(addr, 0, 1, "release")

    @triton.jit
    def _consume_from_peers(pads, index, RANK: tl.constexpr, WORLD: tl.constexpr):
        """Thread j < WORLD consumes flag ``index + j`` of this rank's signal pad (acquire); then
        every thread goes on."""
        mine = tl.load(pads + RANK).to(tl.pointer_type(tl.uint32))
        if _thread_id() < WORLD:
            _swap(mine + index + tl.arange(0, WORLD), 1, 0, "acquire")
        tl.debug_barrier()

    @triton.jit
    def _init(pads, flags, RANK: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
        mine = tl.load(pads + RANK).to(tl.pointer_type(tl.uint32)) + flags
        i = tl.arange(0, BLOCK)
        tl.store(mine + i, tl.zeros([BLOCK], tl.uint32), mask=i < N)  # written
        tl.store(mine + N + i, tl.full([BLOCK], 1, tl.uint32), mask=i < N)  # done

    @triton.jit
    def _reduce_add_norm(X, R, W, Hout, Y, bufs, stride, pads, flags, n, H, eps, RANK: tl.constexpr, WORLD: tl.constexpr,
                         BLOCK: tl.constexpr, SYNC: tl.constexpr, USE_GDC: tl.constexpr):
        pid, G = tl.program_id(0), tl.num_programs(0)
        written, done = flags + pid * WORLD, flags + G * WORLD + pid * WORLD  # this program's flag rows
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        dt = X.dtype.element_ty
        if SYNC:
            _consume_from_peers(pads, done, RANK, WORLD)
        depend(USE_GDC)  # launched while the product before it finished (gemv.PDL): wait for x, let the next launch
        for row in range(pid, n, G):
            x = tl.load(X + row * H + cols, mask=mask)
            for peer in tl.static_range(WORLD):
                buf = tl.load(bufs + peer).to(tl.pointer_type(dt))
                tl.store(buf + RANK * stride + row * H + cols, x, mask=mask)
        if SYNC:
            _raise_on_peers(pads, written + RANK, WORLD)
            _consume_from_peers(pads, written, RANK, WORLD)
        own = tl.load(bufs + RANK).to(tl.pointer_type(dt))
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        for row in range(pid, n, G):
            s = tl.zeros([BLOCK], tl.float32)
            for peer in tl.static_range(WORLD):
                s += tl.load(own + peer * stride + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            res = tl.load(R + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            h = (s.to(dt).to(tl.float32) + res).to(dt)
            tl.store(Hout + row * H + cols, h, mask=mask)
            hf = h.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / H + eps)
            tl.store(Y + row * H + cols, ((hf * rstd).to(dt).to(tl.float32) * w).to(dt), mask=mask)
        if SYNC:
            _raise_on_peers(pads, done + RANK, WORLD)

    @triton.jit
    def _unpack(d):
        """Two bf16 in an int32 (element 2j in the low half) -> their fp32 values (exact)."""
        return (d << 16).to(tl.float32, bitcast=True), (d & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _pack(lo, hi):
        """fp32 ``lo, hi`` rounded to bf16 -> one int32 (``lo`` in the low half)."""
        a = lo.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 65535
        b = hi.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        return a | (b << 16)

    @triton.jit
    def ll_begin(bufs, words, RANK: tl.constexpr, WORLD: tl.constexpr):
        """An LL call's start in program ``pid``: ``(own, counter, seq, tag, half)``: this rank's int64
        buffer, the program's counter at ``2 * WORLD * words + pid`` of it, the call's sequence number,
        it shifted to a word's high half, and the first source slot of the half it selects."""
        own = tl.load(bufs + RANK).to(tl.pointer_type(tl.int64))
        counter = own + 2 * WORLD * words + tl.program_id(0)
        seq = tl.load(counter) + 1
        return own, counter, seq, seq << 32, (seq % 2) * WORLD

    @triton.jit
    def ll_poll(at, mask, tag, seq):
        """The words at ``at`` once every one carries the call's ``seq`` (volatile loads, no time limit)."""
        p = tl.load(at, mask=mask, other=tag, volatile=True)
        while tl.min(((p >> 32) == seq).to(tl.int32), axis=0) == 0:
            p = tl.load(at, mask=mask, other=tag, volatile=True)
        return p

    @triton.jit
    def _reduce_add_norm_ll(X, R, W, Hout, Y, bufs, words, n, H2, eps, RANK: tl.constexpr,
                            WORLD: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
        """The LL protocol (module doc). ``X, R, W, Hout, Y``: int32 views of bf16 rows, ``H2`` pairs
        a row; word ``j`` of row ``row`` from rank ``src`` sits at ``((parity * WORLD + src) * words +
        row * H2 + j)`` of the receiving rank's buffer; program ``pid``'s counter at ``2 * WORLD *
        words + pid`` of this rank's."""
        pid, G = tl.program_id(0), tl.num_programs(0)
        depend(USE_GDC)
        own, counter, seq, tag, half = ll_begin(bufs, words, RANK, WORLD)
        cols = tl.arange(0, BLOCK)
        mask = cols < H2
        for row in range(pid, n, G):  # push: one 64-bit store a word, data and seq together
            word = tag | (tl.load(X + row * H2 + cols, mask=mask).to(tl.int64) & 0xFFFFFFFF)
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    buf = tl.load(bufs + peer).to(tl.pointer_type(tl.int64))
                    tl.store(buf + (half + RANK) * words + row * H2 + cols, word, mask=mask)
        w_lo, w_hi = _unpack(tl.load(W + cols, mask=mask, other=0))
        for row in range(pid, n, G):
            s_lo = tl.zeros([BLOCK], tl.float32)
            s_hi = tl.zeros([BLOCK], tl.float32)
            for peer in tl.static_range(WORLD):  # rank order: every rank sums the same way
                if peer == RANK:
                    d = tl.load(X + row * H2 + cols, mask=mask, other=0)
                else:
                    d = ll_poll(own + (half + peer) * words + row * H2 + cols, mask, tag, seq).to(tl.int32)
                lo, hi = _unpack(d)
                s_lo += lo
                s_hi += hi
            r_lo, r_hi = _unpack(tl.load(R + row * H2 + cols, mask=mask, other=0))
            h_lo = (s_lo.to(tl.bfloat16).to(tl.float32) + r_lo).to(tl.bfloat16).to(tl.float32)
            h_hi = (s_hi.to(tl.bfloat16).to(tl.float32) + r_hi).to(tl.bfloat16).to(tl.float32)
            tl.store(Hout + row * H2 + cols, _pack(h_lo, h_hi), mask=mask)
            ss = tl.sum(tl.where(mask, h_lo * h_lo + h_hi * h_hi, 0.0), axis=0)
            rstd = 1.0 / tl.sqrt(ss / (2 * H2) + eps)
            y_lo = (h_lo * rstd).to(tl.bfloat16).to(tl.float32) * w_lo
            y_hi = (h_hi * rstd).to(tl.bfloat16).to(tl.float32) * w_hi
            tl.store(Y + row * H2 + cols, _pack(y_lo, y_hi), mask=mask)
        tl.store(counter, seq)
