"""The GPU description shared by the catalog (``costmodels.hardware``) and specs that give a
custom GPU inline. Rates are dense (no sparsity), per GPU; bandwidths per direction."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class GPU(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    bf16_tflops: float
    fp16_tflops: float | None = None  # defaults to bf16
    fp8_tflops: float | None = None  # None: the part has no fp8 tensor cores
    int8_tops: float | None = None
    int4_tops: float | None = None
    fp32_tflops: float | None = None  # non-tensor-core fp32 (CPU ranks, fp32 tests)
    hbm_gb: float  # device memory, GB (1e9 bytes)
    hbm_tbps: float  # device memory bandwidth, TB/s
    link_gbps: float  # intra-node (NVLink / Infinity Fabric) bandwidth per GPU per direction, GB/s
    inter_node_gbps: float = 50.0  # per GPU per direction, GB/s (400 Gb/s NIC per GPU)
    source: str = "inline spec"  # datasheet the figures come from
