"""GPU-side helpers shared by calibration (``costmodels.calibrate``) and the accuracy
benchmark (``bench/cost_accuracy.py``): the attention kernels both time, and the timer.

Imports torch: only the calibration/benchmark code imports this module, never the cost model.

Attention layouts (H query heads, G KV heads, d head dim):

* packed prefill: q [T, H, d], k/v [T, G, d] for sequences of ``lengths`` packed along T;
  torch's varlen flash kernel where this torch has one with GQA, else one SDPA call per
  sequence (flash backend, causal or full). Both paths are CUDA-graph capturable.
* decode: q [B, H, 1, d] against a dense cache k/v [B, G, C, d] (SDPA, GQA, non-causal).
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from plans.engine_shapes import keys_bucket


def _varlen_fn() -> tuple[Callable | None, dict]:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415
    except ImportError:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    if "enable_gqa" not in params:
        return None, {}
    return varlen_attn, {"is_causal": "is_causal" in params, "window": "window_size" in params}


class PackedAttention:
    """Attention over packed variable-length sequences, q [T, H, d] -> out [T, H, d]."""

    def __init__(self, device: torch.device, prefer_varlen: bool = True):
        fn, caps = _varlen_fn() if (prefer_varlen and device.type == "cuda") else (None, {})
        self.varlen, self.caps = fn, caps
        self.device = device
        self.fallback_reason = ""

    @property
    def kernel(self) -> str:
        return "varlen" if self.varlen is not None else "sdpa_loop"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], causal: bool,
                 cu: torch.Tensor | None = None) -> torch.Tensor:
        if self.varlen is not None:
            try:
                return self._varlen(q, k, v, lengths, causal, cu)
            except (RuntimeError, TypeError, ValueError) as e:  # unsupported shape/dtype: fall back for good
                self.varlen, self.fallback_reason = None, f"{type(e).__name__}: {e}"[:300]
        return self._loop(q, k, v, lengths, causal)

    def _varlen(self, q, k, v, lengths: list[int], causal: bool, cu) -> torch.Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if cu is None:
            cu = cu_seqlens(lengths, q.device)
        mx = max(lengths)
        kw: dict = {"enable_gqa": k.shape[1] != q.shape[1]}
        if self.caps.get("is_causal"):
            kw["is_causal"] = causal
        elif self.caps.get("window"):
            kw["window_size"] = (-1, 0) if causal else (-1, -1)
        return self.varlen(q, k, v, cu, cu, mx, mx, **kw)

    def _loop(self, q, k, v, lengths: list[int], causal: bool) -> torch.Tensor:
        outs, start = [], 0
        gqa = k.shape[1] != q.shape[1]
        for n in lengths:
            qs = q[start:start + n].transpose(0, 1).unsqueeze(0)
            ks = k[start:start + n].transpose(0, 1).unsqueeze(0)
            vs = v[start:start + n].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa)
            outs.append(o.squeeze(0).transpose(0, 1))
            start += n
        return torch.cat(outs, 0) if len(outs) > 1 else outs[0].contiguous()

    def check(self) -> float:
        """Max abs difference of the varlen path against the SDPA loop on a small random case."""
        if self.varlen is None:
            return 0.0
        g = torch.Generator(device=self.device).manual_seed(0)
        lens = [37, 64, 5]
        T = sum(lens)
        q = torch.randn(T, 8, 64, device=self.device, dtype=torch.bfloat16, generator=g)
        k = torch.randn(T, 2, 64, device=self.device, dtype=torch.bfloat16, generator=g)
        v = torch.randn(T, 2, 64, device=self.device, dtype=torch.bfloat16, generator=g)
        a = self._varlen(q, k, v, lens, True, None)
        loop = PackedAttention(self.device, prefer_varlen=False)
        b = loop(q, k, v, lens, True)
        return float((a.float() - b.float()).abs().max())


def make_packed_attention(device: torch.device) -> PackedAttention:
    """The varlen kernel if it runs and agrees with the SDPA loop (max abs diff < 0.05), else the loop."""
    attn = PackedAttention(device)
    if attn.varlen is not None:
        try:
            err = attn.check()
        except Exception as e:  # noqa: BLE001
            err, attn.fallback_reason = float("inf"), f"{type(e).__name__}: {e}"[:300]
        if not err < 5e-2:
            attn.varlen = None
            attn.fallback_reason = attn.fallback_reason or f"varlen differs from SDPA by {err}"
    return attn


def cu_seqlens(lengths: list[int], device: torch.device) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """q [B, H, 1, d] over caches [B, G, C, d] -> [B, H, 1, d]."""
    return F.scaled_dot_product_attention(q, k_cache, v_cache, is_causal=False,
                                          enable_gqa=k_cache.shape[1] != q.shape[1])


def paged_prefill_case(B: int, n: int, C: int, hq: int, hkv: int, D: int, block_m: int, block_size: int = 16,
                       generator: torch.Generator | None = None, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """Inputs of ``executors.paged_prefill.paged_prefill`` on ``device`` for B sequences of ``n`` new tokens
    each after ``C - n`` cached keys (random bf16 ``q [B n, hq, D]``, cache ``k, v``; each sequence's
    blocks in order, its table row as wide as a step graph's, ``plans.engine_shapes.keys_bucket(C)``):
    ``(q, k, v, table, t0, nq, ctx, seq_of, row0)``, the programs cut at ``block_m`` tokens."""
    from executors import paged_prefill

    used, width = -(-C // block_size), keys_bucket(C) // block_size
    rnd = dict(device=device, dtype=torch.bfloat16, generator=generator)
    k = torch.randn(B * used * block_size + 1, hkv, D, **rnd)
    v = torch.randn(B * used * block_size + 1, hkv, D, **rnd)
    q = torch.randn(B * n, hq, D, **rnd)
    table = torch.zeros(B, width, device=device, dtype=torch.int32)
    table[:, :used] = torch.arange(B * used, device=device, dtype=torch.int32).reshape(B, used)
    spans = [(i * n, n, C - n, C) for i in range(B)]
    seq_of, row0 = paged_prefill.programs(spans, block_m)
    i32 = lambda xs: torch.tensor(xs, device=device, dtype=torch.int32)  # noqa: E731
    return q, k, v, table, i32([s[0] for s in spans]), i32([n] * B), i32([C] * B), i32(seq_of), i32(row0)


class Timer:
    """Median time per call of ``fn`` in ms.

    CUDA: warm up, capture ``reps`` calls in a CUDA graph (reps chosen so a replay lasts
    about ``min_ms``), replay ``rounds`` times between events, median / reps; eager timing
    with events if capture fails. CPU: perf_counter around a loop."""

    def __init__(self, device: torch.device, min_ms: float = 2.0, max_reps: int = 50, rounds: int = 5,
                 use_graphs: bool = True):
        self.device, self.min_ms, self.max_reps, self.rounds, self.use_graphs = device, min_ms, max_reps, rounds, use_graphs
        self.graph_failures = 0

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type != "cuda":
            fn()
            t0 = time.perf_counter()
            fn()
            est = (time.perf_counter() - t0) * 1e3
            reps = max(1, min(self.max_reps, int(self.min_ms / max(est, 1e-3))))
            times = []
            for _ in range(min(self.rounds, 3)):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / reps)
            return statistics.median(times)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        est = e0.elapsed_time(e1)
        reps = max(1, min(self.max_reps, int(self.min_ms / max(est, 1e-3))))
        if self.use_graphs:
            try:
                return self._graph(fn, reps)
            except Exception:  # noqa: BLE001 -- capture can fail on data-dependent code
                self.graph_failures += 1
                torch.cuda.synchronize()
        times = []
        for _ in range(self.rounds):
            e0.record()
            for _ in range(reps):
                fn()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) / reps)
        return statistics.median(times)

    def _graph(self, fn: Callable[[], object], reps: int) -> float:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        g.replay()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.rounds):
            e0.record()
            g.replay()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) / reps)
        del g
        return statistics.median(times)
