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
"""

from __future__ import annotations

import torch

from executors import gemv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the unfused path
    triton = None

PROGRAMS = 16  # programs of every call (fixed: a program's rows and flags are the same call to call)
# rows served here (bench/results/allreduce_latency.md, in CUDA graphs, 4,096 bf16 a row: 7.4 against
# 8.6 us at 1 row, 10.6 against 10.9 at 32, 22.5 against 16.9 at 128); more rows take the one-shot
# all-reduce and the compiled add + norm
MAX_ROWS = 32


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
        if USE_GDC:  # launched while the product before it finished (gemv.PDL): wait for x, let the next launch
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
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
