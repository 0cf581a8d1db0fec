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
measured on several GPUs overrides the intra-node figures.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodels.gpu import GPU


@dataclass(frozen=True)
class Link:
    gbps: float  # effective bandwidth, GB/s per GPU per direction
    alpha_us: float  # per ring step
    alpha0_us: float  # fixed cost per collective

    def transfer_ms(self, nbytes: float) -> float:
        return nbytes / (self.gbps * 1e9) * 1e3


@dataclass(frozen=True)
class Links:
    intra: Link
    inter: Link
    gpus_per_node: int

    def for_group(self, n: int, stride: int = 1) -> Link:
        """The link of a group of n ranks spaced ``stride`` apart (spans nodes when n*stride > node)."""
        return self.inter if n * stride > self.gpus_per_node else self.intra


def default_links(gpu: GPU, gpus_per_node: int, fit: dict | None = None) -> Links:
    """Links from the catalog (or an inline GPU), overridden by a profile's collective fit."""
    fit = fit or {}
    intra = Link(gbps=float(fit.get("bus_gbps", 0.8 * gpu.link_gbps)),
                 alpha_us=float(fit.get("alpha_us", 1.0)), alpha0_us=float(fit.get("alpha0_us", 8.0)))
    inter = Link(gbps=0.9 * gpu.inter_node_gbps, alpha_us=4.0, alpha0_us=12.0)
    return Links(intra=intra, inter=inter, gpus_per_node=gpus_per_node)


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
