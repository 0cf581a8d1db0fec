"""Fit a calibration profile's tables from raw micro-benchmark points (no torch).

Raw points (``raw``, as written by ``costmodels.calibrate``), times in ms:

* ``gemm``: {m, n, k, ms}  ->  e = 2mnk / ((ms - overhead) * peak)
* ``attn_causal`` / ``attn_full``: {L, B, heads, kv_heads, head_dim, ms}
  ->  e = 4 * heads * head_dim * pairs / ((ms - overhead) * peak), pairs = B L(L+1)/2 or B L^2;
  e(L, B), or e(L, B, heads) where the points hold more than one head count (full attention)
* ``attn_decode``: {B, C, heads, kv_heads, head_dim, ms}
  ->  bandwidth efficiency e = bytes / ((ms - overhead) * bw), bytes as ``decode_attention_bytes``
* ``attn_decode_engine``: the same of the engine's paged decode kernel at several KV head counts
  -> e(B, C, kv_heads) (``fit_decode``)
* ``memops[name]``: {elements, ms}  ->  us(elements) (kept as measured, launch included;
  interpolated log-log, exact where time grows as a power of size)
* ``collectives``: {op, bytes, n, mode, ms} (NCCL, several GPUs)  ->  measured tables per mode
  (graph / eager), op and group size (``collective_tables``), and an alpha-beta fit of the
  largest group's eager all-reduce (``fit_collectives``) for groups beyond the tables
* ``gemm_fp8``: {m, n, k, ms}  ->  e = 2mnk / ((ms - overhead) * fp8 peak) (``fit_gemm_fp8``)
* ``gemm_bias``: {m, n, k, ms, ms_nobias}  ->  extra us(M, N) = ms - ms_nobias, averaged over K
  with weights 1 / ms_nobias^2 (``fit_gemm_bias``)

``peak`` and ``bw`` are the catalog datasheet figures of the GPU the profile is for, so a
profile says how far from the datasheet the real part runs. Grid cells that were not
measured (size caps) take the nearest measured cell along the first axis; the FP8 GEMM table's
take the bf16 table's efficiency scaled as the nearest measured cells of their own M row
(``fit_gemm_fp8``).

Every table is interpolated log-log (log of the value against log of the coordinates).
Chosen by leave-every-other-grid-point-out on the calibration points themselves (no
validation data): against linear-in-value interpolation it cut the median error of GEMM
efficiency along M from 4.7% to 1.6%, of causal attention efficiency along L from 12% to
3-6%, of full attention from 13% to 9%, of decode efficiency along B from 6% to 2%, and was
neutral along N, K and the decode context.
"""

from __future__ import annotations

import math
from typing import Any

from costmodels.hardware import get_gpu
from costmodels.interp import LogGrid
from costmodels.profile import Profile


def decode_attention_bytes(B: float, C: float, heads: float, kv_heads: float, d: float, kv_b: float = 2,
                           a_b: float = 2) -> float:
    """Bytes a decode-attention step moves: KV read (B*C tokens) and written (B tokens),
    q/k/v in and output out -- the same count ``costmodels.opcost`` divides by bandwidth."""
    kv = (2 * kv_heads * d * B * C + 2 * kv_heads * d * B) * kv_b
    act = ((heads + 2 * kv_heads) * d * B + heads * d * B) * a_b
    return kv + act


def fit_decode(points: list[dict], keys: tuple[str, ...], overhead_us: float, gpu: str) -> LogGrid:
    """Decode attention's bandwidth efficiency over the axes ``keys``: e = ``decode_attention_bytes`` /
    ((ms - overhead) * bw). ``("B", "C")`` for SDPA's table (``attn_decode``), ``("B", "C", "kv_heads")``
    for the engine's paged kernel (``attn_decode_engine``; with one kv-heads value the same along that
    axis)."""
    bw = get_gpu(gpu).hbm_tbps * 1e12
    return _grid(points, keys,
                 lambda p: decode_attention_bytes(p["B"], p["C"], p["heads"], p["kv_heads"], p["head_dim"])
                 / (_net_s(p["ms"], overhead_us) * bw), log_values=True)


def fit_decode_engine(points: list[dict], overhead_us: float, gpu: str) -> LogGrid:
    """The engine's paged decode kernel's e(B, C, kv_heads) (``fit_decode``)."""
    return fit_decode(points, ("B", "C", "kv_heads"), overhead_us, gpu)


def fit_prefill_engine(points: list[dict], overhead_us: float, gpu: str) -> LogGrid | None:
    """The engine's paged prefill kernel on prefill chunks (``calibrate.run_prefill_engine``'s points of
    ``kind: prefill``) as compute efficiency e(L, B, kv_heads, group) = 4 heads D pairs / (t x bf16
    peak), pairs = B L (L + 1) / 2, over its query heads per KV head (``group``, a power of two: the
    kernel pads a group to one, so a model's group reads the table at its padded size); None with no
    such points. (Points of ``kind: decode``, decode rows through this kernel, which graphed mixed
    steps ran before their decodes moved to the decode kernel, are kept in the raw file and not read:
    ``bench/results/graph_decodes.md``.)"""
    peak = get_gpu(gpu).bf16_tflops * 1e12
    pre = [{**p, "group": p["heads"] // p["kv_heads"]} for p in points if p["kind"] == "prefill"]
    return _grid(pre, ("L", "B", "kv_heads", "group"),
                 lambda p: 4 * p["heads"] * p["head_dim"] * p["B"] * p["L"] * (p["L"] + 1) / 2
                 / (_net_s(p["ms"], overhead_us) * peak), log_values=True) if pre else None


def _grid(points: list[dict], keys: tuple[str, ...], value, log_values: bool = False, *,
          row_first: bool = False, like=None) -> LogGrid:
    """A LogGrid over the distinct coordinates of ``points``; unmeasured cells take the
    nearest measured cell, moving along the first axis before any other.

    With ``row_first`` an unmeasured cell takes the measured cells of its own first-axis row
    nearest to it over the other axes (the nearest row that has any, where its own has none), and
    with ``like`` (a function of the coordinates) their value's ratio to ``like``, averaged in logs
    over equally near cells: the cell is ``like`` at the cell times that ratio."""
    axes = [sorted({float(p[k]) for p in points}) for k in keys]
    pos = [{x: i for i, x in enumerate(a)} for a in axes]
    cells = {tuple(pos[d][float(p[k])] for d, k in enumerate(keys)): value(p) for p in points}
    known = list(cells)
    rows: dict[int, list[tuple[int, ...]]] = {}
    for c in known:
        rows.setdefault(c[0], []).append(c)

    def ref(idx: tuple[int, ...]) -> float:
        return like(*(axes[d][i] for d, i in enumerate(idx))) if like is not None else 1.0

    def at(idx: tuple[int, ...]) -> float:
        if idx in cells:
            return cells[idx]
        if not row_first:
            near = min(known, key=lambda c: abs(c[0] - idx[0]) + 1000 * sum(abs(a - b) for a, b in zip(c[1:], idx[1:])))
            return cells[near]
        row = rows.get(idx[0]) or rows[min(rows, key=lambda r: (abs(r - idx[0]), r))]
        dist = {c: sum(abs(a - b) for a, b in zip(c[1:], idx[1:])) for c in row}
        best = min(dist.values())
        near = [c for c in row if dist[c] == best]
        ratio = sum(math.log(max(cells[c], 1e-12) / max(ref(c), 1e-12)) for c in near) / len(near)
        return ref(idx) * math.exp(ratio)

    def build(prefix: tuple[int, ...]) -> Any:
        d = len(prefix)
        if d == len(axes) - 1:
            return [at(prefix + (i,)) for i in range(len(axes[d]))]
        return [build(prefix + (i,)) for i in range(len(axes[d]))]

    return LogGrid(axes, build(()), log_values)


def fit_collectives(points: list[dict]) -> dict[str, float]:
    """Alpha-beta link parameters from all-reduce timings {op, bytes, n, ms} of the largest group
    measured: the graph-timed ones where there are any, else the eager ones (points without a
    ``mode`` are eager).

    Ring all-reduce: t = alpha0 + 2(n-1) alpha + 2(n-1)/n * S / B. The latency floor c is the
    fastest small (<= 64 KiB) all-reduce; B comes from the largest size:
    B = 2(n-1)/n * S_max / (t_max - c). The fit serves groups larger than any measured, so it
    reads the GPU-side cost: a graph replay. Eager small all-reduces are bounded by the host's
    launch rate (about 50 us a call on the 2 x H200 machine against 11 us in a graph), a cost
    that does not grow with the ring. One group size cannot separate alpha0 from alpha: alpha
    keeps the datasheet default of 1 us per ring step (less where c is small: at most a quarter
    of c per step pair) and alpha0 takes the rest of c, so the fit gives c back at the measured n
    and adds 2 x 1 us per extra GPU. (An earlier rule gave alpha0 at most 8 us and the rest to
    alpha: from the eager 49 us floor that made alpha 20 us and an 8-GPU all-reduce ~0.3 ms.)"""
    ar = [p for p in points if p["op"] == "all_reduce"]
    if any(p.get("mode") == "graph" for p in ar):
        ar = [p for p in ar if p.get("mode") == "graph"]
    else:
        ar = [p for p in ar if p.get("mode", "eager") == "eager"]
    if not ar:
        return {}
    n = max(int(p["n"]) for p in ar)
    ar = sorted((p for p in ar if int(p["n"]) == n), key=lambda p: p["bytes"])
    small = [p["ms"] for p in ar if p["bytes"] <= 65536] or [ar[0]["ms"]]
    c_us = min(small) * 1e3
    big = ar[-1]
    dt_s = max(big["ms"] * 1e-3 - c_us * 1e-6, 1e-9)
    bus = 2 * (n - 1) / n * big["bytes"] / dt_s / 1e9
    alpha = max(0.01, min(1.0, c_us / 4 / (2 * (n - 1))))
    alpha0 = c_us - 2 * (n - 1) * alpha
    return {"bus_gbps": round(bus, 2), "alpha_us": round(alpha, 3), "alpha0_us": round(alpha0, 3), "n": n}


def collective_tables(points: list[dict]) -> dict[str, dict[str, dict[str, dict[str, list[float]]]]]:
    """Measured tables ``{mode: {op: {group size: {"bytes": [...], "us": [...]}}}}`` from
    {op, bytes, n, mode, ms} points (sorted by size; points without a mode are eager).
    ``costmodels.collectives.Measured`` interpolates them."""
    acc: dict = {}
    for p in points:
        cell = acc.setdefault(p.get("mode", "eager"), {}).setdefault(p["op"], {}).setdefault(str(int(p["n"])), {})
        cell[float(p["bytes"])] = round(p["ms"] * 1e3, 3)
    return {mode: {op: {n: {"bytes": sorted(c), "us": [c[b] for b in sorted(c)]} for n, c in sorted(by_n.items())}
                   for op, by_n in sorted(ops.items())} for mode, ops in sorted(acc.items())}


def profile_collectives(points: list[dict], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A profile's ``collectives``: the alpha-beta fit (for groups larger than measured), the
    measured tables and their ``meta`` (device, driver, torch, date, group sizes)."""
    if not points:
        return {}
    sizes = sorted({int(p["n"]) for p in points})
    return {**fit_collectives(points), "tables": collective_tables(points),
            "meta": {**(meta or {}), "group_sizes": sizes}}


def fit_gemm_fp8(points: list[dict], gpu: str, overhead_us: float, bf16: LogGrid | None = None) -> LogGrid | None:
    """FP8 GEMM efficiency e(M, N, K) = 2MNK / ((ms - overhead) * fp8 peak) from {m, n, k, ms};
    None without points or without an FP8 peak in the catalog.

    A cell not measured takes, from the measured cells of its own M nearest over (N, K), their
    efficiency's ratio to the bf16 table ``bf16`` (the profile's ``gemm``, efficiency against the
    bf16 peak), applied to the bf16 efficiency of the cell: the bf16 table carries how the cost
    grows with N and K, the FP8 points how the FP8 kernel at that M differs (a run that measured
    some (N, K) pairs of a row: a time-bounded run over the small-M rows). Checked by leaving each of
    the 435 points measured on the H200 at M = 1-1024 (22 (N, K) pairs) out and filling it from the
    rest: median error 8.0%, 5.4% over the 75 points of the largest pairs (N x K >= 3072 x 12288);
    the nearest measured efficiency as it is (the fill without ``bf16``)
    gave 11.6% and 15.4%."""
    g = get_gpu(gpu)
    if not points or not g.fp8_tflops:
        return None
    peak = g.fp8_tflops * 1e12
    return _grid(points, ("m", "n", "k"),
                 lambda p: 2 * p["m"] * p["n"] * p["k"] / (_net_s(p["ms"], overhead_us) * peak), log_values=True,
                 row_first=True, like=bf16)


def _net_s(ms: float, overhead_us: float) -> float:
    """Kernel seconds less the launch overhead, at least 5% of the measured time."""
    return max(ms * 1e-3 - overhead_us * 1e-6, ms * 1e-3 * 0.05)


def fit_gemm_bias(points: list[dict]) -> LogGrid:
    """Extra us of a linear's bias epilogue, e(M, N), from {m, n, k, ms, ms_nobias}.

    The epilogue adds a vector to the M x N output, so its cost does not depend on K; the
    points at the several K of one (M, N) are estimates of one number. Their noise is not
    alike: the difference of two timings of a GEMM scatters in proportion to the GEMM's time
    (clock and power jitter of a multi-millisecond kernel is tens to hundreds of us, more than
    the epilogue itself). So the K estimates are averaged with inverse-variance weights
    1 / ms_nobias^2, negative differences kept (clamping them first biases the mean upward),
    and the mean clamped at 0. A plain mean over K let one K=18432 outlier make the bias of a
    16384 x 4608 linear 125 us instead of about 10."""
    acc: dict[tuple, list[tuple[float, float]]] = {}
    for p in points:
        w = 1.0 / max(p["ms_nobias"], 1e-6) ** 2
        acc.setdefault((p["m"], p["n"]), []).append((w, (p["ms"] - p["ms_nobias"]) * 1e3))
    rows = [{"m": m, "n": n, "us": max(sum(w * d for w, d in v) / sum(w for w, _ in v), 0.0)}
            for (m, n), v in acc.items()]
    return _grid(rows, ("m", "n"), lambda p: p["us"])


def fit_profile(raw: dict[str, Any], *, gpu: str, profile_id: str, device_name: str, meta: dict[str, Any]) -> Profile:
    """A Profile for catalog GPU ``gpu`` from raw calibration points."""
    g = get_gpu(gpu)
    peak = g.bf16_tflops * 1e12
    ovh = float(raw.get("overhead_us", 2.0))

    def net_s(ms: float) -> float:
        return _net_s(ms, ovh)

    gemm = _grid(raw["gemm"], ("m", "n", "k"), lambda p: 2 * p["m"] * p["n"] * p["k"] / (net_s(p["ms"]) * peak),
                 log_values=True)

    def attn_eff(causal: bool):
        def f(p: dict) -> float:
            L, B = p["L"], p["B"]
            pairs = B * (L * (L + 1) / 2 if causal else L * L)
            return 4 * p["heads"] * p["head_dim"] * pairs / (net_s(p["ms"]) * peak)
        return f

    causal = _grid(raw["attn_causal"], ("L", "B"), attn_eff(True), log_values=True)
    # full attention measured at several head counts: a heads axis, e(L, B, heads)
    full_keys = ("L", "B", "heads") if len({p["heads"] for p in raw["attn_full"]}) > 1 else ("L", "B")
    full = _grid(raw["attn_full"], full_keys, attn_eff(False), log_values=True)
    dec = fit_decode(raw["attn_decode"], ("B", "C"), ovh, gpu)
    memops = {name: _grid(pts, ("elements",), lambda p: p["ms"] * 1e3, log_values=True)
              for name, pts in raw["memops"].items() if pts}
    bias = fit_gemm_bias(raw["gemm_bias"]) if raw.get("gemm_bias") else None
    fp8 = fit_gemm_fp8(raw.get("gemm_fp8") or [], gpu, ovh, gemm)
    dec_engine = fit_decode_engine(raw["attn_decode_engine"], ovh, gpu) if raw.get("attn_decode_engine") else None
    pre_engine = fit_prefill_engine(raw.get("attn_prefill_engine") or [], ovh, gpu)
    return Profile(gpu=g.name, id=profile_id, device_name=device_name, meta=meta, overhead_us=ovh, gemm=gemm,
                   attn_causal=causal, attn_full=full, attn_decode=dec, memops=memops,
                   collectives=profile_collectives(raw["collectives"], raw.get("collectives_meta"))
                   if isinstance(raw.get("collectives"), list) else {},
                   raw=raw, gemm_bias=bias, gemm_fp8=fp8, attn_decode_engine=dec_engine,
                   attn_prefill_engine=pre_engine)
