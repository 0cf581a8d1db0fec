"""Hardware catalog: dense per-GPU rates, memory and links from the vendors' datasheets.

Every figure is *dense* (no structured sparsity) and per GPU; link bandwidths are per GPU
per direction (an "aggregate bidirectional" datasheet figure is halved). HBM in GB = 1e9 bytes.

Sources (named per entry in ``GPU.source``):

* NVIDIA H100 Tensor Core GPU datasheet (SXM5 80 GB column): BF16/FP16 989.4 TFLOP/s,
  FP8 1978.9, INT8 1978.9 TOPS, FP32 67; HBM3 80 GB at 3.35 TB/s; NVLink 900 GB/s (450 per
  direction). Hopper tensor cores have no INT4 mode.
* NVIDIA H200 Tensor Core GPU datasheet (SXM column): same compute as H100 SXM; HBM3e 141 GB
  at 4.8 TB/s; NVLink 900 GB/s.
* NVIDIA A100 Tensor Core GPU datasheet (80 GB SXM column): BF16/FP16 312, INT8 624,
  INT4 1248, FP32 19.5; HBM2e 80 GB at 2.039 TB/s; NVLink 600 GB/s (300 per direction); no FP8.
* NVIDIA DGX/HGX B200 datasheet (per GPU = system / 8): BF16/FP16 2250, FP8 4500, INT8 4500
  (dense); HBM3e 180 GB at 8 TB/s; NVLink 5 1.8 TB/s (900 per direction). FP4 is not INT4.
* AMD Instinct MI300X datasheet: BF16/FP16 1307.4, FP8 2614.9, INT8 2614.9, FP32 163.4;
  HBM3 192 GB at 5.3 TB/s; Infinity Fabric 7 links, 896 GB/s aggregate (448 per direction).
* AMD Instinct MI325X datasheet: compute as MI300X; HBM3E 256 GB at 6.0 TB/s; fabric as MI300X.
* AMD Instinct MI355X datasheet: BF16/FP16 2516.6, FP8 5033.2, INT8 5033.2 (dense), FP32
  157.3; HBM3E 288 GB at 8.0 TB/s; Infinity Fabric 1075 GB/s aggregate (537.5 per direction).
* NVIDIA L40S datasheet: BF16/FP16 362.05, FP8 733, INT8 733, INT4 733 (dense halves of the
  sparse figures), FP32 91.6; GDDR6 48 GB at 0.864 TB/s; no NVLink: PCIe Gen4 x16, 32 GB/s
  per direction.
* ``cpu``: nominal figures for a 2-core x86 CPU rank (tiny models, gloo tests), not a datasheet.

Inter-node default: one 400 Gb/s NIC per GPU = 50 GB/s per direction (L40S: 200 Gb/s, 25 GB/s).

``NODE_ALL_REDUCE_GBPS``: the NCCL bus bandwidth of an all-reduce over all 8 GPUs of one NVSwitch
node, where published: 460-480 GB/s at large sizes for 8 x H100 SXM5 (``nccl-tests``
``all_reduce_perf -g 8``, the reference figures of Alaya NeW's "NCCL-tests in practice", 2026-05-06;
NCCL reduces in the switch, NVLink SHARP, which a ring over 2 GPUs cannot show); the H200 has the
H100's NVLink 4 and NVSwitch, so the same 470.
"""

from __future__ import annotations

import difflib

from costmodels.gpu import GPU
from plans.gpu import ALIASES
from plans.errors import UserError

_NV_H100 = "NVIDIA H100 Tensor Core GPU datasheet (SXM5 80GB)"
_NV_H200 = "NVIDIA H200 Tensor Core GPU datasheet (SXM)"
_NV_A100 = "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)"
_NV_B200 = "NVIDIA DGX B200 / HGX B200 datasheet (per GPU, dense)"
_AMD_300 = "AMD Instinct MI300X accelerator datasheet"
_AMD_325 = "AMD Instinct MI325X accelerator datasheet"
_AMD_355 = "AMD Instinct MI355X accelerator datasheet (dense)"
_NV_L40S = "NVIDIA L40S datasheet (dense = half the sparse figures)"

NODE_ALL_REDUCE_GBPS: dict[str, float] = {"h100": 470.0, "h200": 470.0}

CATALOG: dict[str, GPU] = {
    "h100": GPU(name="h100", bf16_tflops=989.4, fp16_tflops=989.4, fp8_tflops=1978.9, int8_tops=1978.9,
                int4_tops=None, fp32_tflops=67.0, hbm_gb=80, hbm_tbps=3.35, link_gbps=450,
                inter_node_gbps=50, source=_NV_H100),
    "h200": GPU(name="h200", bf16_tflops=989.4, fp16_tflops=989.4, fp8_tflops=1978.9, int8_tops=1978.9,
                int4_tops=None, fp32_tflops=67.0, hbm_gb=141, hbm_tbps=4.8, link_gbps=450,
                inter_node_gbps=50, source=_NV_H200),
    "a100-80g": GPU(name="a100-80g", bf16_tflops=312, fp16_tflops=312, fp8_tflops=None, int8_tops=624,
                    int4_tops=1248, fp32_tflops=19.5, hbm_gb=80, hbm_tbps=2.039, link_gbps=300,
                    inter_node_gbps=25, source=_NV_A100),
    "b200": GPU(name="b200", bf16_tflops=2250, fp16_tflops=2250, fp8_tflops=4500, int8_tops=4500,
                int4_tops=None, fp32_tflops=75, hbm_gb=180, hbm_tbps=8.0, link_gbps=900,
                inter_node_gbps=50, source=_NV_B200),
    "mi300x": GPU(name="mi300x", bf16_tflops=1307.4, fp16_tflops=1307.4, fp8_tflops=2614.9, int8_tops=2614.9,
                  int4_tops=None, fp32_tflops=163.4, hbm_gb=192, hbm_tbps=5.3, link_gbps=448,
                  inter_node_gbps=50, source=_AMD_300),
    "mi325x": GPU(name="mi325x", bf16_tflops=1307.4, fp16_tflops=1307.4, fp8_tflops=2614.9, int8_tops=2614.9,
                  int4_tops=None, fp32_tflops=163.4, hbm_gb=256, hbm_tbps=6.0, link_gbps=448,
                  inter_node_gbps=50, source=_AMD_325),
    "mi355x": GPU(name="mi355x", bf16_tflops=2516.6, fp16_tflops=2516.6, fp8_tflops=5033.2, int8_tops=5033.2,
                  int4_tops=None, fp32_tflops=157.3, hbm_gb=288, hbm_tbps=8.0, link_gbps=537.5,
                  inter_node_gbps=50, source=_AMD_355),
    "l40s": GPU(name="l40s", bf16_tflops=362.05, fp16_tflops=362.05, fp8_tflops=733, int8_tops=733,
                int4_tops=733, fp32_tflops=91.6, hbm_gb=48, hbm_tbps=0.864, link_gbps=32,
                inter_node_gbps=25, source=_NV_L40S),
    "cpu": GPU(name="cpu", bf16_tflops=0.2, fp16_tflops=0.1, fp8_tflops=None, int8_tops=None, int4_tops=None,
               fp32_tflops=0.2, hbm_gb=16, hbm_tbps=0.02, link_gbps=5, inter_node_gbps=1,
               source="nominal 2-core x86 CPU rank (not a datasheet)"),
}
# plans.gpu.CATALOG_NAMES lists these names, in this order (tests/test_hardware.py checks it)


# bytes per element of each storage dtype (int4 packs two per byte)
DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}


def get_gpu(name_or_inline: str | GPU) -> GPU:
    """A catalog GPU by name (case-insensitive, a few aliases), or an inline ``GPU`` as is.

    Raises ``UserError`` naming the nearest catalog names for an unknown name."""
    if isinstance(name_or_inline, GPU):
        return name_or_inline
    key = str(name_or_inline).strip().lower()
    key = ALIASES.get(key, key)
    if key in CATALOG:
        return CATALOG[key]
    names = sorted(CATALOG)
    close = difflib.get_close_matches(key, names + sorted(ALIASES), n=3, cutoff=0.4)
    hint = f" (nearest: {', '.join(close)})" if close else ""
    raise UserError(f"unknown GPU '{name_or_inline}'{hint}; catalog: {', '.join(names)}; "
                    "or give hardware.gpu as an inline spec (name, bf16_tflops, hbm_gb, hbm_tbps, link_gbps)")


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a storage dtype ('bf16' -> 2, 'int4' -> 0.5)."""
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise UserError(f"unknown dtype '{dtype}'; known: {', '.join(DTYPE_BYTES)}") from None


def matmul_tflops(gpu: GPU, weights_dtype: str) -> float:
    """Dense peak of the matmul path for a weight dtype.

    fp8 weights run fp8 tensor cores where the part has them; int4 is weight-only
    quantisation (dequantised to bf16 in the kernel), so it runs at the bf16 rate; fp32
    uses the fp32 rate where given."""
    if weights_dtype == "fp8" and gpu.fp8_tflops:
        return gpu.fp8_tflops
    if weights_dtype == "fp16":
        return gpu.fp16_tflops or gpu.bf16_tflops
    if weights_dtype == "fp32":
        return gpu.fp32_tflops or gpu.bf16_tflops / 4
    return gpu.bf16_tflops
