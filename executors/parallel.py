"""The process groups of one rank, built from the plan's mesh (passed explicitly, never global).

The mesh is ``init_device_mesh(device, (dp, pp, tp, sp), mesh_dim_names=("dp", "pp", "tp", "sp"))``
(row-major, ``sp`` innermost; the rank arithmetic is ``plans.mesh.ParallelDims``'s). Per rank we
keep: the ``tp`` group, the ``sp`` group, the ``shift`` group (the tp*sp GPUs of one stage,
flattened in ``tp_i*sp + sp_i`` order) and the global ranks of the previous/next pipeline stage.

Plans with ``vision.placement: dedicated`` add encoder ranks after the mesh: global ranks
``mesh.size .. mesh.size + dedicated_gpus - 1`` run only the vision tower. They take part in
building the DeviceMesh (group creation is collective over the world) but belong to no group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from executors import reduce_norm
from executors.switches import switch
from plans.mesh import ParallelDims, shift_rank
from plans.schema import Mesh


@dataclass
class Par:
    """Where this rank sits and how it talks. Groups are None when their size is 1."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    sp: int = 1
    dp_i: int = 0
    pp_i: int = 0
    tp_i: int = 0
    sp_i: int = 0
    tp_group: Any = None
    sp_group: Any = None
    shift_group: Any = None
    prev_rank: int | None = None  # global rank of the same local GPU on stage pp_i - 1
    next_rank: int | None = None
    device: torch.device = torch.device("cpu")
    rank: int = 0  # global rank
    replica_ranks: tuple[int, ...] = (0,)  # every rank of this DP replica, stage by stage, shift-rank order
    stage0_ranks: tuple[int, ...] = (0,)  # this replica's stage-0 ranks, shift-rank order

    @property
    def P(self) -> int:
        return self.tp * self.sp

    @property
    def r(self) -> int:
        """Shift (TP-P) rank of this GPU (``plans.mesh.shift_rank``)."""
        return shift_rank(self.tp_i, self.sp_i, self.sp)


def _dims(mesh: Mesh) -> ParallelDims:
    return ParallelDims(dp=mesh.dp, pp=mesh.pp, tp=mesh.tp, sp=mesh.sp, axis_order=tuple(mesh.axis_order))


def global_rank(mesh: Mesh, coords: dict[str, int]) -> int:
    """The global rank at mesh coordinates, axes not given 0 (``ParallelDims.rank``)."""
    return _dims(mesh).rank(**coords)


def reporting_rank(mesh: Mesh, replica: int) -> int:
    """The rank that samples and reports a replica's tokens: (dp=replica, pp=last, tp=0, sp=0)."""
    return global_rank(mesh, {"dp": replica, "pp": mesh.pp - 1})


def replica_ranks(mesh: Mesh, replica: int, stages: range | None = None) -> tuple[int, ...]:
    """Global ranks of one DP replica (of ``stages``, default all), stage by stage, each stage in
    shift-rank order (``ParallelDims.replica_ranks``)."""
    return _dims(mesh).replica_ranks(replica, stages)


def build_par(mesh: Mesh, rank: int, device: torch.device) -> Par | None:
    """Create the DeviceMesh and this rank's groups. Every rank of the world must call it
    (collective); encoder ranks (``rank >= mesh.size``) get None."""
    from torch.distributed.device_mesh import init_device_mesh

    if rank >= mesh.size:
        if mesh.size > 1:
            order = tuple(mesh.axis_order)
            dm = init_device_mesh(device.type, tuple(getattr(mesh, a) for a in order), mesh_dim_names=order)
            if mesh.sp > 1 and mesh.tp > 1:
                _shift_group(dm, mesh, None)
        return None
    dims = _dims(mesh)
    c = dims.coords(rank)
    par = Par(dp=mesh.dp, pp=mesh.pp, tp=mesh.tp, sp=mesh.sp, dp_i=c.dp, pp_i=c.pp, tp_i=c.tp,
              sp_i=c.sp, device=device, rank=rank, replica_ranks=dims.replica_ranks(c.dp),
              stage0_ranks=dims.stage_ranks(c.dp, 0))
    if mesh.size == 1:
        return par
    order = tuple(mesh.axis_order)
    dm = init_device_mesh(device.type, tuple(getattr(mesh, a) for a in order), mesh_dim_names=order)
    if mesh.tp > 1:
        par.tp_group = dm["tp"].get_group()
    if mesh.sp > 1:
        par.sp_group = dm["sp"].get_group()
    if par.P > 1:
        par.shift_group = _shift_group(dm, mesh, par)
    if par.pp_i > 0:
        par.prev_rank = dims.rank(c.dp, c.pp - 1, c.tp, c.sp)
    if par.pp_i < mesh.pp - 1:
        par.next_rank = dims.rank(c.dp, c.pp + 1, c.tp, c.sp)
    return par


def _shift_group(dm: Any, mesh: Mesh, par: Par | None) -> Any:
    """The tp*sp ranks of this stage as one group, ordered ``tp_i*sp + sp_i`` (``par`` None: an
    encoder rank joining the collective group creation)."""
    if mesh.sp == 1:
        return par.tp_group
    if mesh.tp == 1:
        return par.sp_group
    sub = dm["tp", "sp"]
    try:
        flat = sub._flatten("shift")
        return flat.get_group() if par is not None else None
    except Exception:  # a DeviceMesh without _flatten: one new_group per stage, every rank in the same order
        dims, mine = _dims(mesh), None
        for rep in range(mesh.dp):
            for st in range(mesh.pp):
                grp = dist.new_group(list(dims.stage_ranks(rep, st)))
                if par is not None and (rep, st) == (par.dp_i, par.pp_i):
                    mine = grp
        return mine


# ---------------------------------------------------------------- collectives (no-ops on size 1)


def all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``x`` over ``group`` (a process group, or a ``OneShotAllReduce`` wrapping one); returns
    the sum (in place for NCCL, a new tensor for the one-shot kernel)."""
    if isinstance(group, OneShotAllReduce):
        return group(x)
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


# fused all-reduce + residual add + RMSNorm (executors.reduce_norm); SHIFTPLAN_FUSED_ADD_NORM=0 keeps
# the one-shot all-reduce and separate add / norm kernels (A/B measurements)
FUSED_ADD_NORM = switch("SHIFTPLAN_FUSED_ADD_NORM")
ONE_SHOT_MAX_BYTES = 1 << 20  # one-shot beats NCCL up to here (bench/results/allreduce_latency.md: 1 MB, 12.6 vs 26.7 us)


class OneShotAllReduce:
    """Small all-reduces through PyTorch symmetric memory's one-shot kernel: each GPU copies its
    ``x`` into its own symmetric buffer, the group meets at a barrier inside the kernel, then each
    GPU reads every peer's buffer over NVLink and sums them (a second barrier ends the kernel, so
    the buffer can be reused at once). One kernel and no host involvement; on two H200s a
    ``[1, 4096]`` bf16 all-reduce costs 6.1 us in a CUDA graph against NCCL's 16 us
    (``bench/allreduce_latency.py``). A tensor over ``ONE_SHOT_MAX_BYTES``, of another dtype or
    not 16-byte aligned goes to NCCL on the same group. Every GPU sums the peers in rank order,
    so all ranks get the same bits."""

    def __init__(self, group: Any, dtype: torch.dtype, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group, self.name = group, group.group_name
        self.buf = symm_mem.empty(ONE_SHOT_MAX_BYTES // dtype.itemsize, dtype=dtype,
                                  device=device)
        hdl = symm_mem.rendezvous(self.buf, self.name)
        self.rank, self.world = hdl.rank, hdl.world_size
        self.fused = reduce_norm.triton is not None and FUSED_ADD_NORM
        if self.fused:  # executors.reduce_norm's own buffer (a slot per rank) and flags
            self.slot = self.buf.numel()
            self.fused_buf = symm_mem.empty(self.world * self.slot, dtype=dtype, device=device)
            fh = symm_mem.rendezvous(self.fused_buf, self.name)
            self.buffer_ptrs = torch.tensor(list(fh.buffer_ptrs), dtype=torch.int64, device=device)
            self.signal_pad_ptrs = torch.tensor(list(fh.signal_pad_ptrs), dtype=torch.int64, device=device)
            self.flags = reduce_norm.flag_base(fh.signal_pad_size, self.world)
            reduce_norm.init_flags(self.signal_pad_ptrs, self.flags, self.rank, self.world)
            self.ll = reduce_norm.LL and dtype == torch.bfloat16
            if self.ll:  # the LL protocol's buffer: two halves of a slot per rank (8-byte words), its counters
                self.words = self.slot // 2
                self.ll_buf = symm_mem.empty(reduce_norm.ll_words(self.words, self.world), dtype=torch.int64,
                                             device=device).zero_()
                self.ll_ptrs = torch.tensor(list(symm_mem.rendezvous(self.ll_buf, self.name).buffer_ptrs),
                                            dtype=torch.int64, device=device)
            torch.cuda.synchronize(device)
            dist.barrier(group=group)

    def fits(self, x: torch.Tensor) -> bool:
        return (x.dtype == self.buf.dtype and x.is_contiguous() and x.numel() <= self.buf.numel()
                and x.data_ptr() % 16 == 0 and (x.numel() * x.element_size()) % 16 == 0)

    @torch.compiler.disable  # a graph break in compiled layers: the op has no tracing rule
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fits(x):
            dist.all_reduce(x, group=self.group)
            return x
        out = torch.empty_like(x)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(self.buf[:x.numel()].view_as(x), x, "sum", self.name, out)
        return out

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, y)``: ``h = residual + sum over the group of x``, ``y = rms_norm(h, weight, eps)``, in
        one kernel for up to ``reduce_norm.MAX_ROWS`` rows that fit the buffer (``executors.reduce_norm``),
        else the one-shot or NCCL all-reduce, then the add and the norm (the same arithmetic)."""
        small = x.dim() == 2 and x.shape[0] <= reduce_norm.MAX_ROWS
        if self.fused and small and self.fits(x) and residual.is_contiguous():
            if self.ll and x.shape[1] % 2 == 0:
                return torch.ops.shiftplan.reduce_add_norm_ll(x, residual, weight, eps, self.ll_ptrs, self.words,
                                                              self.rank, self.world)
            return torch.ops.shiftplan.reduce_add_norm(x, residual, weight, eps, self.buffer_ptrs, self.slot,
                                                       self.signal_pad_ptrs, self.flags, self.rank, self.world)
        from executors.layers import rms_norm

        h = self(x) + residual
        return h, rms_norm(h, weight, eps)


def one_host_groups(groups: list[Any], device: torch.device) -> list[Any]:
    """The distinct groups (in order) whose ranks are CUDA ranks of one host, where symmetric memory
    works: checked by an exchange of host names over each group (a collective: every rank calls it
    with the same groups)."""
    import socket

    if device.type != "cuda":
        return []
    out: list[Any] = []
    for g in dict.fromkeys(g for g in groups if g is not None):
        hosts: list[Any] = [None] * dist.get_world_size(g)
        dist.all_gather_object(hosts, socket.gethostname(), group=g)
        if len(set(hosts)) == 1:
            out.append(g)
    return out


def one_shot_groups(groups: list[Any], dtype: torch.dtype, device: torch.device) -> dict[Any, OneShotAllReduce]:
    """A ``OneShotAllReduce`` per distinct group of one host (``one_host_groups``) where the one-shot
    op is present. Otherwise none (NCCL stays)."""
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return {}
    return {g: OneShotAllReduce(g, dtype, device) for g in one_host_groups(groups, device)}


class SymmAllToAll:
    """Ulysses' all-to-all over symmetric memory in one kernel (``executors.all_to_all``: NCCL's LL
    protocol), capturable in CUDA graphs; chunks over ``max_bytes`` (sized by the stage for every step
    a CUDA graph may hold) or not a multiple of 4 bytes go to NCCL on the same group. A rank's buffer:
    ``4 x group size x max_bytes`` (each 4-byte word travels in 8, in two halves)."""

    def __init__(self, group: Any, device: torch.device, max_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        from executors import all_to_all as a2a

        self.group, self.world = group, dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.max_bytes = max_bytes
        self.words = -(-max_bytes // 4)
        self.buf = symm_mem.empty(a2a.ll_words(self.words, self.world), dtype=torch.int64, device=device).zero_()
        hdl = symm_mem.rendezvous(self.buf, group.group_name)
        self.ptrs = torch.tensor(list(hdl.buffer_ptrs), dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        chunk = x.numel() * x.element_size() // self.world
        if chunk % 4 or chunk > self.max_bytes:
            return all_to_all(x, self.group)
        return torch.ops.shiftplan.all_to_all_ll(x.contiguous(), self.ptrs, self.words, self.rank, self.world)


def symm_all_to_all_groups(groups: list[Any], device: torch.device, max_bytes: int) -> dict[Any, SymmAllToAll]:
    """A ``SymmAllToAll`` (chunks up to ``max_bytes``) per distinct group of one host
    (``one_host_groups``) unless ``SHIFTPLAN_A2A_LL=0`` (``executors.switches``); otherwise none
    (NCCL stays)."""
    from executors import all_to_all as a2a

    if not (a2a.ENABLED and a2a.triton is not None) or device.type != "cuda":
        return {}
    return {g: SymmAllToAll(g, device, max_bytes) for g in one_host_groups(groups, device)}


def all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``x`` is ``[n, ...]`` with chunk j going to group rank j; returns chunk i from each rank.
    ``group``: a process group, or a ``SymmAllToAll`` (the LL kernel)."""
    if group is None:
        return x
    if isinstance(group, SymmAllToAll):
        return group(x)
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def all_gather_cat(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """Concatenate ``x`` from every group rank along dim 0 (rank order)."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)
