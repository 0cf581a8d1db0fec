"""Does a plan fit the memory it is about to run in? Checked before any rank starts, so a plan too
large for the machine is one clear error rather than ranks killed by the kernel's OOM killer (CPU
ranks) or a CUDA out-of-memory error from inside a rank.

The check uses lower bounds only, so it never refuses a run that would fit:

- weights: each replica holds every parameter at least once (TP and PP split them, SP and shift's
  second layout only add copies). A decoder layer has ``h (hq + 2 hkv) d`` QKV weights (``+ (hq + 2
  hkv) d`` biases), ``hq d h`` output, ``3 h i`` MLP and ``2 h`` norm weights; the model adds ``V h``
  embeddings, ``h`` final norm and ``V h`` output head unless tied. The vision tower's blocks add ``4 e^2
  + 2 e m`` each (QKV, projection, MLP; its norms, patch embedding and merger are left out). FP8
  weights count one byte each, others their dtype's size.
- KV cache: each replica allocates ``blocks x block`` token slots of ``2 x layers x hkv x d`` values
  (every layer, every KV head at least once).

Ulysses SP splits the sequence, not the weights: each of a replica's ``sp`` ranks holds its stage's
whole TP shard, so a replica holds its weights ``sp`` times (shift's second layout adds more). CPU ranks
all live in this machine's memory: ``dp (sp W + KV) <= available``. GPU ranks: the most loaded GPU of
a replica holds at least the average, ``W / (pp tp) + KV / (pp tp sp)``, which must not exceed the
largest visible GPU's memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from executors.config import ModelArgs, run_dtypes
from plans.errors import UserError
from plans.schema import Plan


def parameters(a: ModelArgs) -> int:
    """Parameters of the model the engine builds (vision tower: its blocks' products only)."""
    h, d, i, V = a.hidden, a.head_dim, a.intermediate, a.vocab
    qkv = h * (a.heads + 2 * a.kv_heads) * d + ((a.heads + 2 * a.kv_heads) * d if a.qkv_bias else 0)
    layer = qkv + a.heads * d * h + 3 * h * i + 2 * h + (h if a.o_bias else 0) + (2 * i + h if a.mlp_bias else 0)
    n = a.layers * layer + V * h + h + (0 if a.tie_embeddings else V * h)
    if a.vision is not None:
        e, m = a.vision.embed_dim, a.vision.mlp_dim
        n += a.vision.depth * (4 * e * e + 2 * e * m)
    return n


@dataclass(frozen=True)
class ReplicaBytes:
    """Lower bounds on one replica's memory, bytes."""

    weights: int
    kv: int
    params: int
    kv_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.kv


def replica_bytes(plan: Plan, a: ModelArgs, kv_blocks: int) -> ReplicaBytes:
    compute, kv_dtype, fp8 = run_dtypes(plan)
    n = parameters(a)
    tokens = kv_blocks * plan.scheduler.block_size
    kv = tokens * 2 * a.layers * a.kv_heads * a.head_dim * kv_dtype.itemsize
    return ReplicaBytes(weights=n * (1 if fp8 else compute.itemsize), kv=kv, params=n, kv_tokens=tokens)


def available_host_bytes() -> int:
    """Memory the kernel can give without swapping: ``MemAvailable`` (Linux), else all physical memory."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gpu_bytes() -> int:
    """The largest visible GPU's memory (no CUDA context is created)."""
    return max(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def _gb(b: float) -> str:
    return f"{b / 1e9:,.1f} GB"


def check_fits(plan: Plan, a: ModelArgs, kv_blocks: int, device: str, local_ranks: bool = True) -> None:
    """UserError when the plan cannot fit where it is about to run (figures in the message).
    ``local_ranks``: every rank runs on this machine (not torchrun, whose nodes share the ranks)."""
    r = replica_bytes(plan, a, kv_blocks)
    m = plan.mesh
    copies = m.sp  # Ulysses SP splits the sequence, not the weights: each SP rank holds its stage's whole TP shard
    held = f"; each of its {copies} sequence-parallel ranks holds them all" if copies > 1 else ""
    what = (f"{_gb(r.weights)} of weights ({r.params / 1e9:,.2f} B parameters in {plan.model.weights_dtype}{held}) "
            f"and {_gb(r.kv)} of KV cache ({r.kv_tokens:,} token slots)")
    shorter = ", or serve shorter sequences (--max-context N) for a smaller KV cache"
    if device == "cpu" and local_ranks:
        have = available_host_bytes()
        weights = m.dp * copies * r.weights
        need = weights + m.dp * r.kv
        if need > have:
            each = "each of its replicas holds" if m.dp > 1 else "it holds"
            raise UserError(f"plan {plan.name} does not fit in this machine's memory on CPU ranks: {each} at least "
                            f"{what}, {_gb(need)} in all, and {_gb(have)} is available. Run it on its GPUs "
                            f"(--device cuda){shorter if weights <= have else ''}")
    elif device.startswith("cuda"):
        weights = r.weights / (m.pp * m.tp)  # a replica's pp x tp shards, the average one at least
        need, have = weights + r.kv / (m.size // m.dp), gpu_bytes()
        if need > have:
            raise UserError(f"plan {plan.name} does not fit on this machine's GPUs: a replica holds at least {what}, "
                            f"{_gb(need)} a GPU over its {m.size // m.dp} rank(s), and the largest GPU here has "
                            f"{_gb(have)}. Compile the plan for these GPUs{shorter if weights <= have else ''}")
