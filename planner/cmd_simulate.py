"""`plan simulate` (registered by planner.cli): what a plan delivers on a workload.

Heavy parts (the cost model, the simulator, matplotlib) import inside the command.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from planner.options import finite
from plans.errors import UserError

HELP = (
    "Simulate serving PLAN(s) on a workload: TTFT / TPOT / e2e p50-p90-p99, tokens/s, goodput.\n\n"
    "The workload is --workload: a model.yaml spec (its workload section and its SLOs) or a trace CSV (columns "
    "arrival/TIMESTAMP, input_tokens/ContextTokens, output_tokens/GeneratedTokens, optionally images/NumImages).\n\n"
    "Without --workload the plan's own spec is used: the path `plan compile -o` recorded in the plan "
    "(provenance.spec, relative to the plan file); if that spec has moved the command stops and says so. A plan "
    "that records no spec falls back to examples/<plan name>.yaml under the current folder, else "
    "<plan folder>/../examples/<plan name>.yaml.\n\n"
    "--rate / --rates re-target the arrival rate (a trace is time-scaled). --json prints one object per "
    "(plan, rate), a list when there are several. --plot draws TTFT p90 and TPOT p90 against combined tokens/s "
    "over the rates, one line per plan."
)


def _rates(rate: Optional[float], rates: Optional[str]) -> list[float | None]:
    if rate is not None and rates is not None:
        raise UserError("give --rate or --rates, not both")
    if rates is not None:
        try:
            items = [x.strip() for x in rates.split(",")]
            if not any(items):
                raise UserError("--rates is empty")
            out = [float(x) for x in items]  # an empty item ('1,,2') is a ValueError
        except ValueError:
            raise UserError(f"--rates must be comma-separated numbers, got '{rates}'") from None
    else:
        out = [rate] if rate is not None else [None]
    from planner.spec import MAX_RATE, MIN_RATE

    bad = [r for r in out if r is not None and not (MIN_RATE <= r <= MAX_RATE)]  # NaN fails both
    if bad:
        raise UserError(f"arrival rates must be > 0 (at least {MIN_RATE:g}) and at most {MAX_RATE:g} requests/s, "
                        f"got {bad[0]}")
    return out


def default_workload(plan_path: Path, plan_name: str, plan: Any = None) -> Path:
    """The plan's recorded spec (``provenance.spec``, relative to the plan file), else
    examples/<name>.yaml in the current folder or beside the plan's folder; UserError if none is there."""
    recorded = plan.spec_file(plan_path) if plan is not None else None
    if recorded is not None:
        if recorded.is_file():
            return recorded
        raise UserError(f"{plan_path}: the plan was compiled from {plan.provenance.spec} (relative to the plan "
                        f"file: {recorded}), which is not there; the spec or the plan has moved. Pass --workload "
                        "SPEC.yaml (or TRACE.csv), or recompile the plan with `plan compile SPEC -o PLAN`")
    tried = [Path("examples") / f"{plan_name}.yaml", plan_path.parent.parent / "examples" / f"{plan_name}.yaml"]
    for p in tried:
        if p.is_file():
            return p
    raise UserError(f"{plan_path}: no workload given and none found for plan '{plan_name}' "
                    f"(looked for {', '.join(str(p) for p in dict.fromkeys(tried))}); "
                    "pass --workload SPEC.yaml or --workload TRACE.csv")


def load_workload(source: Path, info: Any, seed: int, plan: Any = None) -> tuple[Any, Any]:
    """(Workload, SLO targets or None) from a spec or a trace file. A spec for another model than
    ``plan``'s lends only its traffic; a note says so."""
    from costmodels.workload import from_trace
    from planner.inputs import workload_of
    from planner.spec import load_spec

    if not source.is_file():
        raise UserError(f"workload file not found: {source}")
    if source.suffix.lower() in (".yaml", ".yml"):
        spec = load_spec(source)
        wl = workload_of(spec, info)
        other = spec.model.preset or spec.model.config
        if plan is not None and other not in (plan.model.preset, plan.model.config):
            wl = replace(wl, notes=wl.notes + (f"{source} is a spec for {other}; this plan is for {plan.model.name} "
                                               "(only the spec's traffic and SLOs are used)",))
        return wl, spec.slo.targets()
    return from_trace(source, info=info, seed=seed), None


def _row(name: str, rate: float, r: Any) -> dict[str, Any]:
    pick = lambda d: {k: d[k] for k in ("p50", "p90", "p99")}  # noqa: E731
    return {"plan": name, "rate_rps": rate, "ttft_ms": pick(r.ttft_ms), "tpot_ms": pick(r.tpot_ms),
            "e2e_ms": pick(r.e2e_ms), "output_tok_s": r.output_tok_s, "combined_tok_s": r.combined_tok_s,
            "goodput_rps": r.goodput_rps, "shift_tp_fraction": r.shift_tp_fraction, "meets_slo": r.meets_slo,
            "requests": r.requests, "completed": r.completed, "rejected": r.rejected, "preemptions": r.preemptions,
            "kv_peak_fraction": r.kv_peak_fraction, "gpu_memory_gb": r.gpu_memory_gb,
            "stage_utilisation": r.stage_utilisation, "notes": r.notes}


def _clean(x: Any) -> Any:
    """JSON without NaN (null instead)."""
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 4)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def plot(rows: list[dict[str, Any]], out: Path, slo: Any = None) -> None:
    """Write ``latency_figure`` to ``out`` (the format from its suffix)."""
    import matplotlib.pyplot as plt

    fig = latency_figure(rows, slo)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def latency_figure(rows: list[dict[str, Any]], slo: Any = None) -> Any:
    """Latency-throughput curves: TTFT p90 and TPOT p90 vs combined tok/s, one line per plan,
    each point labelled with its arrival rate, the SLOs as dashed lines, plain-number ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 10 else f"{v:.3g}")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    names = list(dict.fromkeys(r["plan"] for r in rows))
    for name in names:
        pts = sorted((r for r in rows if r["plan"] == name), key=lambda r: r["rate_rps"])
        x = [r["combined_tok_s"] for r in pts]
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
            y = [r[key]["p90"] for r in pts]
            ax.plot(x, y, marker="o", label=name)
            for xi, yi, r in zip(x, y, pts):
                if math.isfinite(xi) and math.isfinite(yi):
                    ax.annotate(f"{r['rate_rps']:g} req/s", (xi, yi), textcoords="offset points", xytext=(4, 5),
                                fontsize=7)
    for ax, key, label in zip(axes, ("ttft_p90_ms", "tpot_p90_ms"), ("TTFT p90 (ms)", "TPOT p90 (ms)")):
        target = getattr(slo, key, None) if slo is not None else None
        if target:
            ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"SLO {target:g} ms")
        ax.set_title(label.replace(" (ms)", "") + " vs throughput")
        ax.set_xlabel("combined throughput (tokens/s)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda _v, _p: ""))
        ax.xaxis.set_major_formatter(plain)
        ax.tick_params(axis="x", labelrotation=20)
        ax.margins(x=0.12, y=0.12)  # room for the rate labels
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Simulated latency vs throughput: " + ", ".join(names) + " (points labelled with arrival rate)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def simulate_cmd(
    plans: list[Path] = typer.Argument(..., help="compiled plan file(s)"),
    workload: Optional[Path] = typer.Option(None, "--workload", "-w", help="spec (.yaml) or trace (.csv, .jsonl); "
                                                                          "default: the plan's own spec"),
    rate: Optional[float] = typer.Option(None, "--rate", callback=finite, help="arrival rate, requests/s"),
    rates: Optional[str] = typer.Option(None, "--rates", help="comma-separated arrival rates, requests/s"),
    requests: Optional[int] = typer.Option(None, "--requests", "-n", help="requests to simulate (default: the "
                                                                          "spec's workload.requests / the whole trace)"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**63 - 1,
                                       help="workload seed (default: the spec's workload.seed, 0 for a trace)"),
    ttft_slo: Optional[float] = typer.Option(None, "--ttft-slo", callback=finite,
                                             help="TTFT SLO, ms (overrides the spec's)"),
    tpot_slo: Optional[float] = typer.Option(None, "--tpot-slo", callback=finite,
                                             help="TPOT SLO, ms (overrides the spec's)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    plot_to: Optional[Path] = typer.Option(None, "--plot", help="write a latency-throughput figure (.png, .svg, "
                                                                  ".pdf, ...)"),
) -> None:
    from rich.console import Console
    from rich.markup import escape

    from planner.paths import plot_path
    from planner.spec import MAX_REQUESTS

    rate_list = _rates(rate, rates)
    if requests is not None and not 1 <= requests <= MAX_REQUESTS:
        raise UserError(f"--requests must be from 1 to {MAX_REQUESTS:,}, got {requests:,}")
    if plot_to is not None:
        plot_path(plot_to)
    rows: list[dict[str, Any]] = []
    results: list[tuple[str, float, Any]] = []
    slos: list[Any] = []  # SloTargets or None, per plan
    status = Console(stderr=True).status("reading the plans")
    status.start()
    try:
        _simulate_all(plans, workload, rate_list, requests, seed, ttft_slo, tpot_slo, rows, results, slos,
                      lambda msg: status.update(escape(msg)))
    finally:
        status.stop()
    if plot_to is not None:
        plot(rows, plot_to, slos[0] if len(set(map(repr, slos))) == 1 else None)
    if as_json:
        out = _clean(rows[0] if len(rows) == 1 else rows)
        typer.echo(json.dumps(out, indent=1))
    else:
        _table(results)
    if plot_to is not None and not as_json:
        typer.echo(f"wrote {plot_to}")


def _simulate_all(plans: list[Path], workload: Optional[Path], rate_list: list[float | None], requests: Optional[int],
                  seed: Optional[int], ttft_slo: Optional[float], tpot_slo: Optional[float], rows: list, results: list,
                  slos: list, say: Any) -> None:
    """Every (plan, rate) run of `plan simulate`, appended to ``rows`` / ``results`` / ``slos``."""
    from costmodels.simulator import cost_model_for_plan, coster_for, simulate
    from plans.schema import load_plan

    for path in plans:
        plan = load_plan(path)
        cost = cost_model_for_plan(plan, base_dir=path.parent)
        _located(path, lambda: plan.check_model(cost.info))
        source = workload or default_workload(path, plan.name, plan)
        wl, slo = load_workload(source, cost.info, seed or 0, plan)
        if workload is None and source.suffix.lower() in (".yaml", ".yml"):
            import hashlib

            if hashlib.sha256(source.read_bytes()).hexdigest() != plan.provenance.spec_sha256:
                wl = replace(wl, notes=wl.notes + (f"{source} has changed since this plan was compiled "
                                                   "(provenance.spec_sha256 differs); recompile to plan for it",))
        run_seed = wl.seed if seed is None else seed
        slo = _merge_slo(slo, ttft_slo, tpot_slo)
        slos.append(slo)
        if requests is not None:
            wl = wl.with_requests(requests)
        coster = coster_for(plan, cost)
        for r in rate_list:
            w = wl.with_rate(r) if r is not None else wl
            say(f"simulating {plan.name}: {w.requests} requests at {w.rate:g} req/s")
            res = simulate(plan, cost, w, slo=slo, seed=run_seed, coster=coster)
            rows.append(_row(plan.name, w.rate, res))
            results.append((plan.name, w.rate, res))


def _located(path: Path, check: Any) -> None:
    """Run ``check``; its UserError is prefixed with the plan file, as ``load_plan``'s are."""
    try:
        check()
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def _merge_slo(slo: Any, ttft: Optional[float], tpot: Optional[float]) -> Any:
    """The spec's SLO targets (``SloTargets`` or None) with the command line's overrides."""
    from costmodels.simulator import SloTargets

    out: dict[str, float] = {}
    for key, override in (("ttft_p90_ms", ttft), ("tpot_p90_ms", tpot)):
        v = override if override is not None else (getattr(slo, key, None) if slo is not None else None)
        if v is not None:
            if not (v > 0 and math.isfinite(v)):
                raise UserError(f"SLO {key} must be a finite number > 0 ms, got {v}")
            out[key] = float(v)
    return SloTargets(**out) if out else None


def _table(results: list[tuple[str, float, Any]]) -> None:
    """Plain fixed-width lines (readable in a terminal, a log or a review comment)."""
    head = (f"{'plan':<28} {'rate':>6} {'TTFT p50/p90/p99 ms':>21} {'TPOT p50/p90/p99 ms':>20} {'out tok/s':>9} "
            f"{'tok/s':>8} {'goodput':>12} {'TP-mode':>7} {'preempt':>7} {'KV peak':>7}")
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    for name, rate, r in results:
        f = lambda d: "/".join("-" if d[k] != d[k] else (f"{d[k]:.0f}" if d[k] >= 100 else f"{d[k]:.1f}")  # noqa: E731
                               for k in ("p50", "p90", "p99"))
        good = f"{r.goodput_rps:.2f}" + ("" if r.meets_slo is None else (" ok" if r.meets_slo else " miss"))
        lines.append(f"{name[:28]:<28} {rate:>6.3g} {f(r.ttft_ms):>21} {f(r.tpot_ms):>20} {r.output_tok_s:>9.0f} "
                     f"{r.combined_tok_s:>8.0f} {good:>12} {r.shift_tp_fraction:>7.0%} {r.preemptions:>7d} "
                     f"{r.kv_peak_fraction:>7.0%}")
        notes.extend(f"{name}: {n}" for n in r.notes)
    lines.extend(f"note: {n}" for n in dict.fromkeys(notes))
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Add `plan simulate` to the `plan` app."""
    app.command("simulate", help=HELP)(simulate_cmd)
