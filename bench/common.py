"""Helpers shared by the GPU benchmarks: random weights made on the device, the measured matmul
rate, a timer (CUDA events on a GPU, the host clock on a CPU), the GPU's clock and power over time,
medians and specs built in code."""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], Any], device: torch.device | str, reps: int, warmup: int,
             before: Callable[[], None] | None = None, host: bool = False) -> list[float]:
    """Times of ``reps`` calls of ``fn`` (after ``warmup`` untimed ones), in ms: CUDA events on a
    GPU (synchronised before and after each call), the host clock on a CPU, or with ``host`` the
    host clock from the call to the device's completion (launch costs included). ``before`` runs
    before each call, untimed (e.g. a barrier)."""
    dev = torch.device(device)
    out: list[float] = []
    for i in range(warmup + reps):
        if before is not None:
            before()
        sync(dev)
        if dev.type == "cuda" and not host:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t = time.perf_counter()
            fn()
            sync(dev)
            ms = 1e3 * (time.perf_counter() - t)
        if i >= warmup:
            out.append(ms)
    return out


def driver_version() -> str:
    """The NVIDIA driver's version (``nvidia-smi``), or ``-`` where there is none: results name it."""
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:
        return "-"


def graphed_us(fn: Callable[[], Any], reps: int = 20, replays: int = 7, flush_mb: int = 256) -> float:
    """GPU microseconds of one call of ``fn`` with a cold L2, as a CUDA graph runs it (the engine's
    decode steps): a graph of ``reps`` x (zero a ``flush_mb`` MB buffer, ``fn()``) against one of the
    flushes alone, each replayed ``replays`` times; the difference of the medians over ``reps``. No
    host launch time is in it, where ``triton.testing.do_bench``'s per-call events count a host
    launch that outlasts the flush before it. ``fn`` is called once first (autotuning, lazy inits)."""
    fn()
    torch.cuda.synchronize()
    cache = torch.empty(flush_mb << 20, dtype=torch.int8, device="cuda")

    def graph(with_fn: bool) -> torch.cuda.CUDAGraph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                cache.zero_()
                if with_fn:
                    fn()
        return g

    def ms(g: torch.cuda.CUDAGraph) -> float:
        out = []
        for _ in range(replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        return median(out)

    both, flush = graph(True), graph(False)
    ms(both)  # first replays upload the graphs
    ms(flush)
    return max(0.0, (ms(both) - ms(flush)) / reps * 1e3)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def matmul_rate(device: torch.device | str, dtype: torch.dtype) -> dict[str, float]:
    """Measured dense matmul rate (TFLOP/s): an ``n x n x n`` product on random data, the median of
    several (n = 8192 on a GPU, 256 on a CPU)."""
    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 256
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    ms = median(timed_ms(lambda: a @ b, dev, reps=20 if dev.type == "cuda" else 5, warmup=5 if dev.type == "cuda" else 1))
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "ms": round(ms, 4),
            "TFLOPs": round(2 * n**3 / (ms / 1e3) / 1e12, 6)}


def heat(seconds: float, device: torch.device | str = "cuda", n: int = 8192) -> None:
    """Keep the GPU at its full matmul load for ``seconds`` (back-to-back bf16 ``n x n x n`` products):
    its power rises to the limit, and the SM clock falls to what the limit allows."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(8):
            a @ b
        sync(device)


class ClockLog:
    """The GPU's SM clock (MHz) and power draw (W), sampled by ``nvidia-smi`` every ``period_ms`` while
    the context is open (``gpu``: an index or ``GPU-<uuid>``). ``window(t0, t1)`` summarises the samples
    between two ``time.time()`` instants: nvidia-smi stamps each with the local wall clock to the ms.
    Without nvidia-smi the log stays empty and every window says so."""

    def __init__(self, gpu: str = "0", period_ms: int = 50):
        self.gpu, self.period_ms = gpu, period_ms
        self.proc: subprocess.Popen | None = None
        self.kept: list[tuple[float, float, float]] | None = None
        self.path = Path(tempfile.mkstemp(suffix=".csv")[1])

    def __enter__(self) -> "ClockLog":
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "-i", self.gpu, "--query-gpu=timestamp,clocks.sm,power.draw",
                                          "--format=csv,noheader,nounits", "-lms", str(self.period_ms),
                                          "-f", str(self.path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.kept = self.samples()  # nvidia-smi has stopped and flushed: read once, drop its file
        self.path.unlink(missing_ok=True)

    def samples(self) -> list[tuple[float, float, float]]:
        """``(epoch s, SM MHz, W)`` of every sample written so far (all of them once the log is closed)."""
        if self.kept is not None:
            return self.kept
        out = []
        for line in self.path.read_text().splitlines() if self.path.is_file() else []:
            try:
                ts, mhz, watts = (x.strip() for x in line.split(","))
                t = datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                out.append((t, float(mhz), float(watts)))
            except ValueError:
                continue
        return out

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Samples in ``[t0, t1]``: their count, the median and lowest SM clock and the mean power."""
        xs = [(mhz, w) for t, mhz, w in self.samples() if t0 <= t <= t1]
        if not xs:
            return {"samples": 0}
        return {"samples": len(xs), "sm_mhz_median": median([m for m, _ in xs]), "sm_mhz_min": min(m for m, _ in xs),
                "power_w_mean": round(sum(w for _, w in xs) / len(xs), 1)}


def random_like(name: str, shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A seeded random tensor of one checkpoint name made on ``device`` (the same on every rank):
    norms ``1 + 0.1 N``, biases ``0.1 N``, embeddings ``N``, matrices ``N / sqrt(fan_in)`` (the
    scales of ``executors.weights.random_tensor``, which draws on the CPU)."""
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    base = name.rsplit(".", 1)[0]
    if name.endswith("bias"):
        x = x * 0.1
    elif "norm" in base or base.endswith("ln_q"):
        x = 1.0 + 0.1 * x
    elif "embed_tokens" not in name:
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        x = x / max(1, fan_in) ** 0.5
    return x.to(dtype)


class DeviceRandomSource:
    """A ``executors.weights.WeightSource`` of seeded random weights drawn on the device (seconds
    for an 8B model, where drawing on the CPU takes minutes)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device, dtype: torch.dtype, seed: int = 0):
        self.shapes, self.device, self.dtype, self.seed = shapes, device, dtype, seed
        self._last: tuple[str, torch.Tensor] | None = None

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def rows(self, name: str, runs: list[tuple[int, int]] | None = None, dim: int = 0) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = (name, random_like(name, self.shapes[name], self.seed, self.device, self.dtype))
        t = self._last[1]
        if runs is None:
            return t
        # contiguous, as a checkpoint's slices are: a strided weight would slow the matmuls it feeds
        parts = [t.narrow(dim, s, e - s) for s, e in runs]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=dim)


def write_checkpoint(cfg: dict, out: Path, device: torch.device, dtype: torch.dtype, seed: int = 0,
                     shard_bytes: int = 4 << 30) -> dict[str, float]:
    """A safetensors checkpoint of seeded random weights with every tensor the engine reads
    (``executors.model.checkpoint_shapes``), drawn on ``device``; shards of ~``shard_bytes``."""
    import json

    from safetensors.torch import save_file

    from executors.config import model_args
    from executors.model import checkpoint_shapes

    t0 = time.perf_counter()
    shapes = checkpoint_shapes(model_args(cfg))
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, files, where, total = 0, [], {}, 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            where.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        t = random_like(name, shape, seed, device, dtype).cpu()
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": where}))
    return {"bytes": total, "seconds": round(time.perf_counter() - t0, 2)}


def spec_for(name: str, cfg_path: str | None, preset: str | None, gpus: int, dtype: str,
             search: dict | None = None, images: bool = False, tokens: tuple[int, int, int] = (1024, 8192, 256),
             backend: str | None = None) -> Any:
    """A ``planner.spec.Spec`` for ``gpus`` H200s of one node (a preset, or a config file);
    ``tokens``: the workload's (mean input, max input, mean output) tokens; ``backend``: the
    runtime's layers (``runtime.backend``; the spec's default when None)."""
    from planner.spec import Spec

    model: dict[str, Any] = {"weights_dtype": dtype, "kv_dtype": dtype}
    if preset:
        model["preset"] = preset
    else:
        model["config"] = cfg_path
    workload: dict[str, Any] = {"arrival_rate": 4.0, "input_tokens": {"mean": tokens[0], "max": tokens[1]},
                                "output_tokens": {"mean": tokens[2]}}
    if images:
        workload["images"] = {"per_request": [1], "resolution": [[448, 448]]}
    d: dict[str, Any] = {"name": name, "model": model, "hardware": {"gpu": "h200", "gpus_per_node": gpus, "nodes": 1},
                         "workload": workload, "objective": "max_throughput"}
    if search:
        d["search"] = search
    if backend:
        d["runtime"] = {"backend": backend}
    return Spec.model_validate(d)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that made a report, its output folder written ``DIR``."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    out = []
    for i, x in enumerate(args):
        out.append("DIR" if i > 0 and args[i - 1] == "--out" else ("--out DIR" if x.startswith("--out=") else x))
    return " ".join(["python", script] + [shlex.quote(x) for x in out])


def write_report(out: Path, name: str, report: dict[str, Any], md: str, echo: bool = False) -> None:
    """A benchmark's results: ``out/name.json`` (the report) and ``out/name.md`` (its markdown),
    the folder made if missing; ``echo`` prints the markdown too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(md)
    if echo:
        print(md)


def price_report(ap: Any, path: Path, name: str, price: Callable[[dict[str, Any]], None],
                 markdown: Callable[[dict[str, Any]], str], out: Path, argv: list[str] | None) -> dict[str, Any]:
    """A measured report ``path`` of ``bench/NAME.py`` priced again on any machine (``price`` adds
    the cost model's figures to it in place), stamped with the command and written to ``out``
    (``write_report``); a file that is not such a report ends the script with ``ap.error`` (exit 2)."""
    try:
        report = json.loads(path.read_text())
        price(report)
    except (OSError, ValueError, KeyError, TypeError) as e:
        ap.error(f"--price {path}: not a {name} report of this script's cases ({type(e).__name__}: {e})")
    report["priced"] = command_line(f"bench/{name}.py", argv)
    write_report(out, name, report, markdown(report), echo=True)
    return report
