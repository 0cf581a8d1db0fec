"""Does a serving replay's heavy step run slower the hotter the GPU has been? A check on traced runs.

``bench/results/step_profile.heat.md`` shows compute-bound steps taking 5-13% longer after seconds of
full matmul load (the H200 at its power limit, its SM clock down to 1,455-1,750 MHz) than after rest.
This asks whether that explains the heavy steps' shortfall in serving. For each traced replay of a
fidelity report (``bench/fidelity_2gpu.py --trace``; each step costed again, ``bench/step_fidelity.py``)
it follows a power proxy along the replica's timeline: the share of recent time spent in heavy steps,
an exponential average with time constant ``tau`` (idle time and light steps count 0),

    P <- P exp(-dt / tau) + heavy (1 - exp(-dt / tau))     per step of period dt,

read at each step's start. Heavy: image steps, prefill steps, mixed steps of more than 256 tokens;
those predicted at over 5 ms are kept. Reported: per replay, the heavy steps' mean proxy and the
geometric mean of measured GPU time over predicted; over all replays, the least-squares fit of
``log(measured / predicted) = a + b P`` for several ``tau``, its correlation and the spread of the
log-ratio before and after it. A heat effect shows as ratios that grow with the proxy and a fit that
takes much of the spread away.

    python bench/serving_heat.py                 # bench/results/serving_heat.md
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import step_fidelity as sf  # noqa: E402

# the traced reports and the models each measured itself (a --resume run also carries the cases it kept)
REPORTS = {"fidelity_2gpu.vl_single.json": ("qwen2-vl",), "fidelity_2gpu.single.json": ("llama", "qwen2-vl"),
           "fidelity_2gpu.single_recompile.json": ("llama",)}
TAUS = (0.25, 0.5, 1.0, 2.0, 4.0)  # seconds
HEAVY_MIXED_TOKENS = 256
MIN_PREDICTED_MS = 5.0


def heavy_steps(report: Path, models: tuple[str, ...]) -> dict[tuple[str, str], list[dict]]:
    """``(model case, rate) -> steps`` of ``models`` in a traced report, each with its heaviness,
    predicted and GPU ms and its span on the timeline (``end``, ``period``)."""
    rep, steps = json.loads(report.read_text()), sf.read_steps(sf.steps_beside(report))
    out = {}
    for model, cases in ((m, c) for m, c in steps.items() if m in models):
        for case, rates in cases.items():
            plan = sf.plan_of(rep, model, case)
            coster, enc = sf.coster_of(plan), sf.in_step_encoder(plan)
            for frac, recs in rates.items():
                rows = sf.cost_steps(recs, coster, enc)
                out[(f"{report.stem.removeprefix('fidelity_2gpu.')} {model} {case}", frac)] = [
                    {"heavy": c["kind"] in ("image", "prefill") or (c["kind"] == "mixed" and c["tokens"] > HEAVY_MIXED_TOKENS),
                     "pred": c["predicted_ms"], "gpu": c["gpu_ms"], "end": r["answered_ms"], "period": c["period_ms"]}
                    for (r, _last), c in zip(sf.after_answers(recs), rows) if c["gpu_ms"]]
    return out


def proxy(series: list[dict], tau_s: float) -> list[float]:
    """The power proxy at each step's start (module doc)."""
    p, out, last_end = 0.0, [], None
    for s in series:
        start = s["end"] - s["period"]
        if last_end is not None and start > last_end:  # idle: decays
            p *= math.exp(-(start - last_end) / 1e3 / tau_s)
        out.append(p)
        d = math.exp(-s["period"] / 1e3 / tau_s)
        p = p * d + float(s["heavy"]) * (1 - d)
        last_end = s["end"]
    return out


def kept(series: list[dict], tau_s: float) -> list[tuple[float, float]]:
    """``(proxy, log(measured / predicted))`` of the series' heavy steps predicted over the floor."""
    return [(p, math.log(s["gpu"] / s["pred"])) for s, p in zip(series, proxy(series, tau_s))
            if s["heavy"] and s["pred"] > MIN_PREDICTED_MS]


def fit(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least squares ``y = a + b x``: a, b, the correlation, the spread of y and of its residual (a flat
    line through the mean where x or y does not vary)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    varies = statistics.pstdev(xs) > 0 and statistics.pstdev(ys) > 0
    b, a = statistics.linear_regression(xs, ys) if varies else (0.0, statistics.fmean(ys))
    resid = [y - a - b * x for x, y in points]
    corr = statistics.correlation(xs, ys) if varies else 0.0
    return {"a": a, "b": b, "corr": corr, "sd": statistics.pstdev(ys), "resid_sd": statistics.pstdev(resid)}


def main() -> None:
    groups = {}
    for name, models in REPORTS.items():
        groups.update(heavy_steps(ROOT / "bench" / "results" / name, models))
    lines = ["# Heavy steps against the GPU's recent load, in traced serving replays", "",
             "Command: `python bench/serving_heat.py` (no GPU: the committed traces of "
             + ", ".join(f"`{n}`" for n in REPORTS) + ", costed with the cost model as it is now). Method: the "
             "module doc of `bench/serving_heat.py`.", "",
             "| replay | rate | heavy steps | mean proxy (tau 1 s) | measured / predicted (geometric mean) |", "|---|---|---|---|---|"]
    for (case, frac), series in sorted(groups.items()):
        pts = kept(series, 1.0)
        if pts:
            lines.append(f"| {case} | {frac} | {len(pts)} | {statistics.fmean(p for p, _ in pts):.2f} | "
                         f"{math.exp(statistics.fmean(y for _, y in pts)):.3f} |")
    lines += ["", "Over all replays: log(measured / predicted) = a + b x proxy.", "",
              "| tau s | steps | a | b | correlation | spread of the log-ratio | after the fit |", "|---|---|---|---|---|---|---|"]
    for tau in TAUS:
        pts = [x for series in groups.values() for x in kept(series, tau)]
        f = fit(pts)
        lines.append(f"| {tau} | {len(pts)} | {f['a']:.4f} | {f['b']:.4f} | {f['corr']:.3f} | {f['sd']:.4f} | {f['resid_sd']:.4f} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "bench" / "results" / "serving_heat.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
