"""Step trace: where each step's time goes, on the driver and on the replica's reporting rank.

Off by default; ``executors.load(..., trace=True)`` turns it on and ``Engine.step_trace`` then holds
one record a step, in the order the answers came::

    {"step", "replica", "tokens", "seqs", "new", "ctx", "images", "patches", "pixel_mb", "mode",
     "sent_ms", "send_ms", "bytes", "by_queue", "answered_ms", "rank": {...}}

The step's shape, per micro-batch: ``new[m][i]``, the tokens sequence ``i`` of micro-batch ``m``
adds (1 for a decode), and ``ctx[m][i]``, the keys it reads (cached + new), and ``patches``, the
patch count of each image the step encodes, so a step can be costed again
(``bench/step_fidelity.py``).

Driver side (milliseconds on the stream's clock, ``Engine.clock0``): ``sent_ms`` when the step left,
``send_ms`` what sending it cost (framing and the channel write, a side file for a step larger than a
slot, or the queue put when not even that could be written, ``by_queue``; 0 for the in-process
rank), ``bytes`` the framed step,
``answered_ms`` when its tokens were back. Rank side (``RankTimer``, the reporting rank):
``unpickle_ms``, then the host time of each phase of ``RankRunner.launch`` (``images_host_ms``:
encoding or receiving the step's images; ``forward_host_ms``: the micro-batches, graph replays or
eager launches; ``sample_host_ms``) and, on a GPU, each phase's device time between CUDA events
(``images_gpu_ms``, ``forward_gpu_ms``, ``sample_gpu_ms``: read once the step's tokens are back, so
no extra synchronisation), and ``wait_ms``, the host's wait for the tokens. On a GPU, a step that is
not all decodes also records what the CUDA caching allocator did during it (``alloc_retries``: a
failed allocation that freed the cache and synchronised the device; ``device_allocs`` /
``device_frees``: cudaMalloc / cudaFree calls), the counters of ``torch.cuda.memory_stats`` (read
twice a step, a Python dict of ~100 entries each time: left out of decode steps). ``gc_ms``: the garbage collector's pauses in the
rank's process from the step's launch to its tokens (``gc.callbacks``, installed by the first
traced step). The events cost a few microseconds a step; with the trace off none are recorded.
``summary`` sums them by kind of step.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch

PHASES = ("images", "forward", "sample")
ALLOCATOR = {"alloc_retries": "num_alloc_retries", "device_allocs": "num_device_alloc",
             "device_frees": "num_device_free"}  # trace key -> torch.cuda.memory_stats counter


_GC = {"ms": 0.0, "since": 0.0, "installed": False}  # this process's collector pauses (``gc_pauses_ms``)


def _on_gc(phase: str, _info: dict) -> None:
    if phase == "start":
        _GC["since"] = time.perf_counter()
    else:
        _GC["ms"] += (time.perf_counter() - _GC["since"]) * 1e3


def gc_pauses_ms() -> float:
    """Milliseconds this process has spent in garbage collections since the first call."""
    if not _GC["installed"]:
        gc.callbacks.append(_on_gc)
        _GC["installed"] = True
    return _GC["ms"]


class RankTimer:
    """Marks the end of each phase of a step (``mark``) on the host and, on a GPU, with a CUDA event
    on the current stream; ``timing`` reads them once the step's work is done."""

    def __init__(self, device: torch.device, unpickle_ms: float = 0.0, allocator: bool = False):
        self.cuda = device.type == "cuda"
        self.device = device
        self.unpickle_ms = unpickle_ms
        self.alloc0 = self._allocator() if (allocator and self.cuda) else None
        self.gc0 = gc_pauses_ms()
        self.host = [time.perf_counter()]
        self.events = [self._event()] if self.cuda else []

    def _allocator(self) -> dict[str, int]:
        stats = torch.cuda.memory_stats(self.device)
        return {k: int(stats.get(name, 0)) for k, name in ALLOCATOR.items()}

    def _event(self) -> Any:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def mark(self) -> None:
        """The end of the next phase of ``PHASES``."""
        self.host.append(time.perf_counter())
        if self.cuda:
            self.events.append(self._event())

    def timing(self, wait_ms: float) -> dict[str, float]:
        """Every phase's host (and device) milliseconds; ``wait_ms``: the wait for the tokens. Call
        after the step's device work is done (its last event has completed)."""
        out = {"unpickle_ms": round(self.unpickle_ms, 3), "wait_ms": round(wait_ms, 3),
               "gc_ms": round(gc_pauses_ms() - self.gc0, 3)}
        for i, name in enumerate(PHASES[:len(self.host) - 1]):
            out[f"{name}_host_ms"] = round((self.host[i + 1] - self.host[i]) * 1e3, 3)
            if self.cuda:
                out[f"{name}_gpu_ms"] = round(self.events[i].elapsed_time(self.events[i + 1]), 3)
        if self.alloc0 is not None:
            now = self._allocator()
            out.update({k: now[k] - self.alloc0[k] for k in ALLOCATOR})
        return out


def step_record(step: Any, replica: int, sent_ms: float, send_ms: float, nbytes: int, by_queue: bool) -> dict:
    """The driver's part of a step's record (module doc)."""
    jobs = step.image_jobs
    return {"step": step.step_id, "replica": replica, "tokens": sum(mb.num_tokens for mb in step.micro),
            "seqs": sum(len(mb.ctx) for mb in step.micro),
            "new": [torch.bincount(mb.seq, minlength=len(mb.ctx)).tolist() for mb in step.micro],
            "ctx": [list(mb.ctx) for mb in step.micro], "images": len(jobs),
            "patches": [t * h * w for j in jobs for t, h, w in j.grid],
            "pixel_mb": round(sum(j.pixels.numel() * j.pixels.element_size() for j in jobs
                                  if j.pixels is not None) / 1e6, 3),
            "mode": [mb.mode for mb in step.micro], "sent_ms": round(sent_ms, 3), "send_ms": round(send_ms, 3),
            "bytes": nbytes, "by_queue": by_queue}


def summary(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per kind of step (``image``: it carries images; ``prefill``: more tokens than sequences, a
    prefill or mixed step; ``decode``), the step count and each time summed over the steps (ms):
    where a run's time went. ``span_ms``: first step sent to last answer."""
    out: dict[str, dict[str, float]] = {}
    for r in records:
        kind = "image" if r["images"] else "prefill" if r["tokens"] > r["seqs"] else "decode"
        acc = out.setdefault(kind, {"steps": 0})
        acc["steps"] += 1
        times = {"send_ms": r["send_ms"], "round_trip_ms": r["answered_ms"] - r["sent_ms"], **(r.get("rank") or {})}
        for k, v in times.items():
            acc[k] = round(acc.get(k, 0.0) + v, 3)
    if records:
        out["all"] = {"steps": len(records),
                      "span_ms": round(max(r["answered_ms"] for r in records) - min(r["sent_ms"] for r in records), 3)}
    return out
