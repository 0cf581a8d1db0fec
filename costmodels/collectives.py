"""Alpha-beta costs of collectives over a group of n GPUs (ring algorithms).

With per-step latency alpha, a fixed launch/synchronisation cost alpha0 and effective bus
bandwidth B (bytes/s per GPU per direction):

* all-reduce of an S-byte buffer:     alpha0 + 2(n-1) alpha + 2(n-1)/n * S / B
* all-gather (S = gathered output):   alpha0 + (n-1) alpha + (n-1)/n * S / B
* reduce-scatter (S = full input):    same as all-gather
* all-to-all (S = one GPU's buffer):  alpha0 + (n-1) alpha + (n-1)/n * S / B
  (each GPU keeps 1/n of its buffer and sends the rest; the n GPUs send in parallel)
* point-to-point of S bytes:          alpha0 + S / B

A group whose ranks span nodes runs at the inter-node bandwidth (the slowest ring link).
Defaults: B = 80% of the datasheet link rate intra-node (NCCL bus bandwidth on NVLink),
90% of the NIC rate inter-node; alpha0 = 8 us, alpha = 1 us intra / 4 us inter. A profile
measured on several GPUs overrides the intra-node figures (its alpha-beta fit).

Measured tables (``Measured``, from a profile's ``collectives.tables``) replace the formulas
for an intra-node group whose size was measured: the time of op ``op`` at S bytes over n GPUs
is interpolated log-log between the measured sizes S_i < S < S_i+1:

    log t(S) = log t_i + (log S - log S_i) / (log S_i+1 - log S_i) * (log t_i+1 - log t_i)

below the smallest size t(S) = t(S_min) (the latency floor), above the largest
t(S) = t(S_max) * S / S_max (bandwidth-bound). ``graph=True`` (a decode step, which the engine
replays as a CUDA graph with its collectives captured) reads the graph-timed table and falls
back to the eager one (ops not captured, e.g. all-to-all); other steps read the eager table.
Groups larger than measured, and groups across nodes, keep the alpha-beta formulas, with one
exception: an all-reduce over every GPU of a node runs at the node's published NCCL bus bandwidth
where the catalog has one (``hardware.NODE_ALL_REDUCE_GBPS``: on an NVSwitch node NCCL reduces in
the switch, and 8 H100s reach 460-480 GB/s where a fit to 2 GPUs gives ~300).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from costmodels.gpu import GPU
from costmodels.hardware import NODE_ALL_REDUCE_GBPS
from costmodels.interp import LogGrid


@dataclass(frozen=True)
class Link:
    gbps: float  # effective bandwidth, GB/s per GPU per direction
    alpha_us: float  # per ring step
    alpha0_us: float  # fixed cost per collective

    def transfer_ms(self, nbytes: float) -> float:
        return nbytes / (self.gbps * 1e9) * 1e3


class Measured:
    """Measured collective times, ``tables[mode][op][str(n)] = {"bytes": [...], "us": [...]}``
    (``costmodels.fit.collective_tables``), interpolated as the module doc says."""

    def __init__(self, tables: dict[str, Any]):
        self._grids: dict[tuple[str, str, int], LogGrid] = {}
        for mode, ops in tables.items():
            for op, by_n in ops.items():
                for n, t in by_n.items():
                    if t.get("bytes"):
                        self._grids[(mode, op, int(n))] = LogGrid([t["bytes"]], t["us"], log_values=True)

    def ms(self, op: str, nbytes: float, n: int, graph: bool = False) -> float | None:
        """Time of ``op`` over S = ``nbytes`` on ``n`` GPUs, or None where nothing was measured."""
        for mode in (("graph", "eager") if graph else ("eager",)):
            g = self._grids.get((mode, op, n))
            if g is not None:
                s_max = g.axes[0][-1]
                return g(min(nbytes, s_max)) * max(1.0, nbytes / s_max) * 1e-3
        return None


@dataclass(frozen=True)
class Links:
    intra: Link
    inter: Link
    gpus_per_node: int
    measured: Measured | None = None  # tables of intra-node groups (a profile measured on several GPUs)
    node_all_reduce: Link | None = None  # an all-reduce over a whole node, where its bandwidth is published

    def for_group(self, n: int, stride: int = 1) -> Link:
        """The link of a group of n ranks spaced ``stride`` apart (spans nodes when n*stride > node)."""
        return self.inter if n * stride > self.gpus_per_node else self.intra

    def ms(self, op: str, nbytes: float, n: int, *, stride: int = 1, graph: bool = False) -> float:
        """Time of collective ``op`` (``all_reduce``, ``all_gather``, ``reduce_scatter``,
        ``all_to_all``; ``p2p`` with n = 2) of S = ``nbytes`` over a group of n ranks spaced
        ``stride`` apart: the measured table of an intra-node group of n where the profile has
        one, else the alpha-beta formula on the group's link."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        link = self.for_group(n, stride)
        if link is self.intra and self.measured is not None:
            t = self.measured.ms(op, nbytes, n, graph)
            if t is not None:
                return t
        if link is self.intra and op == "all_reduce" and n == self.gpus_per_node and self.node_all_reduce:
            link = self.node_all_reduce
        return p2p_ms(nbytes, link) if op == "p2p" else FORMULAS[op](nbytes, n, link)


def default_links(gpu: GPU, gpus_per_node: int, fit: dict | None = None) -> Links:
    """Links from the catalog (or an inline GPU), overridden by a profile's ``collectives``: its
    alpha-beta fit (``bus_gbps``, ``alpha_us``, ``alpha0_us``) and its measured ``tables``."""
    fit = fit or {}
    intra = Link(gbps=float(fit.get("bus_gbps", 0.8 * gpu.link_gbps)),
                 alpha_us=float(fit.get("alpha_us", 1.0)), alpha0_us=float(fit.get("alpha0_us", 8.0)))
    inter = Link(gbps=0.9 * gpu.inter_node_gbps, alpha_us=4.0, alpha0_us=12.0)
    node = NODE_ALL_REDUCE_GBPS.get(gpu.name)
    return Links(intra=intra, inter=inter, gpus_per_node=gpus_per_node,
                 measured=Measured(fit["tables"]) if fit.get("tables") else None,
                 node_all_reduce=replace(intra, gbps=node) if node and gpus_per_node >= 4 else None)


def all_reduce_ms(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (link.alpha0_us + 2 * (n - 1) * link.alpha_us) * 1e-3 + 2 * (n - 1) / n * link.transfer_ms(nbytes)


def all_gather_ms(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (link.alpha0_us + (n - 1) * link.alpha_us) * 1e-3 + (n - 1) / n * link.transfer_ms(nbytes)


reduce_scatter_ms = all_gather_ms


def all_to_all_ms(nbytes_per_gpu: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes_per_gpu <= 0:
        return 0.0
    return (link.alpha0_us + (n - 1) * link.alpha_us) * 1e-3 + (n - 1) / n * link.transfer_ms(nbytes_per_gpu)


def p2p_ms(nbytes: float, link: Link) -> float:
    if nbytes <= 0:
        return 0.0
    return link.alpha0_us * 1e-3 + link.transfer_ms(nbytes)


FORMULAS = {"all_reduce": all_reduce_ms, "all_gather": all_gather_ms, "reduce_scatter": reduce_scatter_ms,
            "all_to_all": all_to_all_ms}
