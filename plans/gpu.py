"""The GPU description shared by the catalog (``costmodels.hardware``), specs that give a custom
GPU inline, and plans compiled for one (``Hardware.gpu_spec``). Rates are dense (no sparsity), per
GPU; bandwidths per direction.

``CATALOG_NAMES`` and ``ALIASES`` are the names a plan may give ``hardware.gpu``; the figures of
those GPUs live in ``costmodels.hardware.CATALOG`` (which holds exactly these names). Kept here so
``plans.schema`` checks a plan's GPU without importing the cost model."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from plans.numbers import Float

# a rate or a size: a finite number above zero (not a boolean, not NaN or infinity)
Positive = Annotated[Float, Field(gt=0)]
# Figures of an inline GPU, bounded to what a device (a CPU rank at the low end) can have: a figure
# of 1e-300 or 1e300 is a typo, and would cost steps of no or endless time (NaN memory, a hung simulation).
Rate = Annotated[Float, Field(ge=1e-3, le=1e6)]  # TFLOP/s or TOP/s
MemoryGB = Annotated[Float, Field(ge=1e-3, le=1e5)]
MemoryTBps = Annotated[Float, Field(ge=1e-3, le=1e3)]
LinkGBps = Annotated[Float, Field(ge=1e-3, le=1e6)]


class GPU(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    bf16_tflops: Rate
    fp16_tflops: Rate | None = None  # defaults to bf16
    fp8_tflops: Rate | None = None  # None: the part has no fp8 tensor cores
    int8_tops: Rate | None = None
    int4_tops: Rate | None = None
    fp32_tflops: Rate | None = None  # non-tensor-core fp32 (CPU ranks, fp32 tests)
    hbm_gb: MemoryGB  # device memory, GB (1e9 bytes)
    hbm_tbps: MemoryTBps  # device memory bandwidth, TB/s
    link_gbps: LinkGBps  # intra-node (NVLink / Infinity Fabric) bandwidth per GPU per direction, GB/s
    inter_node_gbps: LinkGBps = 50.0  # per GPU per direction, GB/s (400 Gb/s NIC per GPU)
    source: str = "inline spec"  # datasheet the figures come from


CATALOG_NAMES: tuple[str, ...] = ("h100", "h200", "a100-80g", "b200", "mi300x", "mi325x", "mi355x", "l40s", "cpu")
ALIASES: dict[str, str] = {
    "h100-sxm": "h100", "h100-80g": "h100", "h100-sxm5": "h100", "h200-sxm": "h200",
    "a100": "a100-80g", "a100-sxm": "a100-80g", "mi300": "mi300x", "mi325": "mi325x", "mi355": "mi355x",
}


def catalog_key(name: str) -> str | None:
    """The catalog name of ``name`` (case-insensitive, aliases resolved), None if unknown."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    return key if key in CATALOG_NAMES else None
