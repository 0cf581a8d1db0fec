"""Calibration profiles: efficiencies measured on a real GPU, committed as
``costmodels/profiles/<gpu>.json``.

A profile holds fitted tables (what the cost model reads) and the raw points they were
fitted from (so a fit can be redone without the GPU). Tables, all in log2-space grids:

* ``gemm``: efficiency e(M, N, K) = 2MNK / (t * peak), t the measured kernel time less the
  launch overhead, peak the catalog bf16 rate. Covers the memory-bound small-M regime too.
* ``attn_causal`` / ``attn_full``: efficiency of prefill attention e(L, B) = F / (t * peak) for
  B sequences of L new tokens, F = 4 * heads * head_dim * pairs (QK^T and PV); e(L, B, heads)
  where several head counts were measured (full attention in newer profiles).
* ``attn_decode``: bandwidth efficiency of decode attention e(B, C) = bytes / (t * hbm_bw),
  bytes = KV read (2 * B * C * kv_heads * head_dim * 2 bytes).
* ``attn_decode_engine`` (when measured): the same efficiency of the engine's own paged decode kernel
  (``executors.paged_decode``, the one its CUDA graphs replay), e(B, C, kv heads per GPU): plans the
  engine runs read it in place of ``attn_decode`` (SDPA's kernels, which stand for a vendor's).
* ``attn_prefill_engine`` (when measured): the engine's paged prefill kernel
  (``executors.paged_prefill``, which the prefill chunks of every step it replays as a CUDA graph
  run), e(L, B, kv heads, group) on prefill chunks against the bf16 peak; group = query heads per KV
  head, padded to a power of two as the kernel pads it. Plans the engine runs read it in place of
  ``attn_causal`` (cuDNN's flash attention) for the steps that run this kernel.
* ``memops[name]``: time in microseconds of a memory-bound op (HF implementation: RMSNorm,
  LayerNorm, SiLU*mul, QuickGELU, RoPE, add, copy) vs the elements it produces.
* ``gemm_bias``: extra microseconds a bias adds to a linear, e(M, N) (averaged over K).
* ``gemm_fp8`` (when the calibration ran FP8 GEMMs, ``torch._scaled_mm`` with e4m3 operands and
  bf16 output): e(M, N, K) against the catalog FP8 peak. FP8-weight linears read it; without it
  they read ``gemm`` at the FP8 peak (the bf16 efficiency scaled, not measured). Points name their
  kernel: this repo's engine's calls (``executors.quant.linear``).
* ``gemm_fp8_tensor`` (when measured): the same for ``torch._scaled_mm`` with one scale per tensor
  (cuBLASLt's FP8 GEMM, TensorRT-LLM's FP8 recipe), read for plans whose backend is ``tensorrt``
  (``CostModel(fp8_kernels="tensor")``).
* ``overhead_us``: per-kernel launch gap inside a CUDA graph.
* ``collectives`` (when more than one GPU was seen): measured ``tables[mode][op][group size]`` =
  {"bytes": [...], "us": [...]} for all-reduce, all-gather, reduce-scatter, all-to-all and p2p,
  mode ``graph`` (K calls captured in a CUDA graph) or ``eager``, read by
  ``costmodels.collectives.Measured``; their ``meta`` (device, driver, torch, date, group sizes);
  and the alpha-beta fit (``alpha0_us``, ``alpha_us``, ``bus_gbps``) of the largest group, which
  the formulas use for groups beyond the tables.
* ``steps`` (when measured): step-level terms of this repo's engine, each ``{"value", "source",
  "derivation"}``: ``host_ms_per_layer[backend]``, the host time of an eagerly launched step per
  decoder layer, ``ulysses_ns_per_byte``, the Ulysses exchange's in-step cost per byte
  (``costmodels.steps``, which fits them from ``bench/results/shift_crossover.json``),
  ``gemv_GBps`` and ``gemv_call_us``, the streaming rate and fixed time a product of the engine's
  decode GEMV (from ``bench/results/engine_speed.json`` and ``mesh_speed.fused_no_pdl.json``), ``pp_handoff_ms``, a PP step's dispatch latency per stage
  boundary (from ``bench/results/mesh_speed.pp2.json``), and ``symm_all_reduce_us``, the engine's
  symmetric-memory all-reduce in a CUDA graph by bytes, one-shot and fused with the residual add and
  RMSNorm (from ``bench/results/allreduce_latency.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from costmodels.interp import LogGrid
from plans.errors import UserError

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass
class Profile:
    gpu: str  # catalog name the profile is for, e.g. "h100"
    id: str  # e.g. "h100-2026-11-23"
    device_name: str
    meta: dict[str, Any]  # driver, torch version, date, command
    overhead_us: float
    gemm: LogGrid  # e(M, N, K)
    attn_causal: LogGrid  # e(L, B)
    attn_full: LogGrid  # e(L, B) or e(L, B, heads)
    attn_decode: LogGrid  # bandwidth efficiency e(B, C)
    memops: dict[str, LogGrid]  # name -> us(elements)
    collectives: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    gemm_bias: LogGrid | None = None  # extra us of a bias epilogue, e(M, N)
    gemm_fp8: LogGrid | None = None  # e(M, N, K) of FP8 GEMMs against the FP8 peak, when measured
    gemm_fp8_tensor: LogGrid | None = None  # the same for per-tensor-scaled FP8 GEMMs, when measured
    attn_decode_engine: LogGrid | None = None  # e(B, C, kv heads) of the engine's paged decode kernel, when measured
    # the engine's paged prefill kernel, when measured: compute e(L, B, kv heads, group) on prefill chunks
    # (group: query heads per KV head, padded to a power of two)
    attn_prefill_engine: LogGrid | None = None
    steps: dict[str, Any] = field(default_factory=dict)  # step-level terms of the engine (``costmodels.steps``)

    def memop_us(self, name: str, elements: float) -> float | None:
        """Measured time (us) of memory-bound op ``name`` writing ``elements`` elements.

        ``silu`` alone (graphs that list SiLU and the gating multiply as two ops) is derived:
        silu_mul(e) - add(e) + one launch, at least one launch."""
        e = max(elements, 1.0)
        g = self.memops.get(name)
        if g is not None:
            return g(e)
        if name == "silu" and "silu_mul" in self.memops and "add" in self.memops:
            return max(self.memops["silu_mul"](e) - self.memops["add"](e) + self.overhead_us, self.overhead_us)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu, "id": self.id, "device_name": self.device_name, "meta": self.meta,
            "overhead_us": self.overhead_us,
            "tables": {
                "gemm": self.gemm.to_json(), "attn_causal": self.attn_causal.to_json(),
                "attn_full": self.attn_full.to_json(), "attn_decode": self.attn_decode.to_json(),
                "memops": {k: v.to_json() for k, v in sorted(self.memops.items())},
                **({"gemm_bias": self.gemm_bias.to_json()} if self.gemm_bias else {}),
                **({"gemm_fp8": self.gemm_fp8.to_json()} if self.gemm_fp8 else {}),
                **({"gemm_fp8_tensor": self.gemm_fp8_tensor.to_json()} if self.gemm_fp8_tensor else {}),
                **({"attn_decode_engine": self.attn_decode_engine.to_json()} if self.attn_decode_engine else {}),
                **({"attn_prefill_engine": self.attn_prefill_engine.to_json()} if self.attn_prefill_engine else {}),
            },
            "collectives": self.collectives,
            **({"steps": self.steps} if self.steps else {}),
            "raw": self.raw,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Profile":
        t = d["tables"]
        return cls(gpu=d["gpu"], id=d["id"], device_name=d.get("device_name", ""), meta=d.get("meta", {}),
                   overhead_us=float(d["overhead_us"]), gemm=LogGrid.from_json(t["gemm"]),
                   attn_causal=LogGrid.from_json(t["attn_causal"]), attn_full=LogGrid.from_json(t["attn_full"]),
                   attn_decode=LogGrid.from_json(t["attn_decode"]),
                   memops={k: LogGrid.from_json(v) for k, v in t["memops"].items()},
                   collectives=d.get("collectives", {}), raw=d.get("raw", {}),
                   gemm_bias=LogGrid.from_json(t["gemm_bias"]) if "gemm_bias" in t else None,
                   gemm_fp8=LogGrid.from_json(t["gemm_fp8"]) if "gemm_fp8" in t else None,
                   gemm_fp8_tensor=LogGrid.from_json(t["gemm_fp8_tensor"]) if "gemm_fp8_tensor" in t else None,
                   attn_decode_engine=LogGrid.from_json(t["attn_decode_engine"]) if "attn_decode_engine" in t else None,
                   attn_prefill_engine=LogGrid.from_json(t["attn_prefill_engine"]) if "attn_prefill_engine" in t else None,
                   steps=d.get("steps", {}))


def read_profile(path: str | Path) -> Profile:
    """A profile from a JSON file; UserError if missing or malformed."""
    p = Path(path)
    try:
        return Profile.from_json(json.loads(p.read_text()))
    except FileNotFoundError:
        raise UserError(f"calibration profile not found: {p}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{p}: not a valid calibration profile ({type(e).__name__}: {e})") from None


def write_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_json(), indent=1, sort_keys=False) + "\n")


def load_profile(gpu_name: str) -> Profile | None:
    """The committed profile for a catalog GPU (``profiles/<gpu>.json``), or None."""
    p = PROFILE_DIR / f"{gpu_name.lower()}.json"
    return read_profile(p) if p.is_file() else None
