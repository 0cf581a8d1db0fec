"""Each step a serving replay ran, costed again by the simulator's coster: where the engine's time
goes against the prediction, by kind of step.

Input: the step trace of one replay (``executors.trace``: ``load(..., trace=True)``), whose records
carry each micro-batch's shape (``new[m][i]`` tokens added and ``ctx[m][i]`` keys read by sequence
``i``). Per step:

* shape: ``StepShape.from_sequences`` (the prefill chunks and the decodes of each micro-batch);
* ``predicted_ms``: ``ModelCoster.stage_ms(shape, mode, decode part)`` summed over the stages plus
  the stage hops, summed over the step's micro-batches: the step's latency in the simulator, which
  is also its share of the replica's busy time when the replica has one stage;
* ``gpu_ms``: the reporting rank's device time of the step (images + forward + sampling);
* ``period_ms``: ``answered_i - max(answered_{i-1}, sent_i)`` on the same replica: the step's share
  of the engine's wall time (with look-ahead the next step is sent before this one's tokens are
  back, so steps tile the timeline);
* ``gap_ms``: ``sent_i - answered_{i-1}`` where positive: time the replica had no step in flight
  (the driver forming a step that could not be formed ahead).

Kinds: ``decode`` (every sequence adds one token), ``prefill`` (none does), ``mixed`` (both),
``image`` (the step carries images; ``predicted_ms`` holds their tower time where the record names
the images' patches, as the simulator charges in-step encoding; older traces lack them, and their
image steps' predictions are the LLM's part alone).

    python bench/step_fidelity.py DIR/fidelity_2gpu.json      # the steps file beside it, costed now
    python bench/step_fidelity.py REPORT --decode-detail     # + decode steps by batch and spread
    python bench/step_fidelity.py REPORT --image-detail      # + image steps: the tower and the LLM's part

The steps of a ``fidelity_2gpu.py --trace`` run live beside its report in ``STEPS_FILE`` (gzipped JSON:
model -> case -> rate fraction -> records).
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodels.steps import after_answers, sent_ahead  # noqa: E402
from executors.trace import ALLOCATOR  # noqa: E402
from graph.opgraph import StepShape  # noqa: E402

KINDS = ("decode", "mixed", "prefill", "image")
STEPS_FILE = "fidelity_2gpu.steps.json.gz"


def steps_beside(report: Path) -> Path:
    """A fidelity report's steps file: ``NAME.steps.json.gz`` beside ``NAME.json`` (``STEPS_FILE``
    beside ``fidelity_2gpu.json``; a committed variant such as ``fidelity_2gpu.vl_single.json`` keeps
    its own)."""
    return report.with_name(report.name.removesuffix(".json") + ".steps.json.gz")


def write_steps(path: Path, steps: dict[str, Any]) -> None:
    path.write_bytes(gzip.compress(json.dumps(steps).encode(), mtime=0))


def read_steps(path: Path) -> dict[str, Any]:
    return json.loads(gzip.decompress(path.read_bytes()))


KEEP_RANK = ("images_gpu_ms", "forward_gpu_ms", "sample_gpu_ms", "images_host_ms", "forward_host_ms", "wait_ms",
             "unpickle_ms", "gc_ms", *ALLOCATOR)


def compact(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What this analysis reads of each record (the rank's phase times it uses, nothing else)."""
    keys = ("step", "replica", "tokens", "seqs", "new", "ctx", "images", "patches", "mode", "sent_ms", "answered_ms")
    return [{**{k: r[k] for k in keys if k in r},
             "rank": {k: v for k, v in (r.get("rank") or {}).items() if k in KEEP_RANK}} for r in records]


def kind_of(r: dict[str, Any]) -> str:
    if r.get("images"):
        return "image"
    ones = [n == 1 for nn in r["new"] for n in nn]
    return "decode" if all(ones) else "prefill" if not any(ones) else "mixed"


def cost_steps(records: list[dict[str, Any]], coster: Any, encoder: Any = None) -> list[dict[str, Any]]:
    """One row a step: kind, tokens, seqs, predicted / gpu / period / gap ms (module doc). With
    ``encoder`` (the plan's ``ParallelDims.encoder()``), an image step whose record names its
    images' ``patches`` is predicted with the tower's time as the simulator charges it in a step
    (``coster.vision_ms`` over the encoder's TP x replicas)."""
    rows = []
    for r, last in after_answers(records):
        pred = tower = 0.0
        waited = not sent_ahead(r, last)  # the ranks' GPUs wait for their host work (Coster.wait_ms)
        if encoder is not None and r.get("patches"):
            pred += (tower := coster.vision_ms(tuple(r["patches"]), tp=encoder.tp, dp=encoder.dp))
        for m, (new, ctx) in enumerate(zip(r["new"], r["ctx"])):
            shape, dec = StepShape.from_sequences(new, ctx)
            mode = r["mode"][m] if m < len(r["mode"]) else r["mode"][-1]
            pred += sum(coster.stage_ms(shape, mode, dec)) + (coster.pp * coster.wait_ms(shape, mode, dec) if waited else 0.0)
            pred += sum(coster.p2p_ms(shape.tokens, b) for b in range(coster.pp - 1))
        rank = r.get("rank") or {}
        ctx = [c for new, cc in zip(r["new"], r["ctx"]) for n, c in zip(new, cc) if n == 1]  # the decodes' keys
        rows.append({"kind": kind_of(r), "tokens": r["tokens"], "seqs": r["seqs"], "predicted_ms": pred,
                     "tower_predicted_ms": tower, "tower_gpu_ms": rank.get("images_gpu_ms"),
                     "decode_ctx_mean": sum(ctx) / len(ctx) if ctx else 0.0, "decode_ctx_max": max(ctx, default=0),
                     "gpu_ms": sum(rank.get(k, 0.0) for k in ("images_gpu_ms", "forward_gpu_ms", "sample_gpu_ms"))
                     if "forward_gpu_ms" in rank else None,
                     "period_ms": r["answered_ms"] - (r["sent_ms"] if last is None else max(last, r["sent_ms"])),
                     "gap_ms": 0.0 if last is None else max(0.0, r["sent_ms"] - last)})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per kind (and ``all``): step count, median tokens, the medians and sums of each time, and
    ``predicted / period`` and ``predicted / gpu`` of the sums (1.0: the coster accounts for all of it)."""
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS + ("all",):
        rs = [r for r in rows if kind in ("all", r["kind"])]
        if not rs:
            continue
        s: dict[str, float] = {"steps": len(rs), "tokens_p50": statistics.median(r["tokens"] for r in rs)}
        for k in ("predicted_ms", "gpu_ms", "period_ms", "gap_ms"):
            vals = [r[k] for r in rs if r[k] is not None]
            if vals:
                s[k.replace("_ms", "_p50_ms")] = round(statistics.median(vals), 3)
                s[k.replace("_ms", "_sum_ms")] = round(sum(vals), 2)
        for k in ("period", "gpu"):
            if s.get(f"{k}_sum_ms"):
                s[f"predicted_over_{k}"] = round(s["predicted_sum_ms"] / s[f"{k}_sum_ms"], 3)
        out[kind] = s
    return out


SPREAD = 1.5  # longest over mean decode context: at or above, a step's contexts are spread


def decode_by_batch(rows: list[dict[str, Any]], bands: tuple[int, ...] = (1, 8, 16, 32)) -> list[dict[str, Any]]:
    """Decode steps by batch band (``bands``: each band's smallest batch) and by the spread of their
    contexts (longest over mean below or at least ``SPREAD``): steps, medians of the mean and the
    longest context, and predicted / GPU of the sums. The cost model prices a decode batch at its
    mean context; the paged kernel's time follows its longest sequences too."""
    out = []
    for lo, hi in zip(bands, bands[1:] + (None,)):
        for spread in (False, True):
            rs = [r for r in rows if r["kind"] == "decode" and r["gpu_ms"] and lo <= r["seqs"] and (hi is None or r["seqs"] < hi)
                  and (r["decode_ctx_max"] >= SPREAD * r["decode_ctx_mean"]) == spread]
            if rs:
                out.append({"batch": f"{lo}-{hi - 1}" if hi else f"{lo}+", "spread": spread, "steps": len(rs),
                            "ctx_mean_p50": round(statistics.median(r["decode_ctx_mean"] for r in rs)),
                            "ctx_max_p50": round(statistics.median(r["decode_ctx_max"] for r in rs)),
                            "gpu_p50_ms": round(statistics.median(r["gpu_ms"] for r in rs), 3),
                            "predicted_over_gpu": round(sum(r["predicted_ms"] for r in rs) / sum(r["gpu_ms"] for r in rs), 3)})
    return out


def image_split(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The image steps whose tower was predicted (their records name the patches), split in two: the
    tower (predicted against the rank's ``images_gpu_ms``) and the rest, the LLM's forward and
    sampling; ``predicted / GPU`` of each part's sums. None without such steps."""
    rs = [r for r in rows if r["kind"] == "image" and r["tower_predicted_ms"] and r["gpu_ms"] and r["tower_gpu_ms"]]
    if not rs:
        return None
    tower_p, tower_g = sum(r["tower_predicted_ms"] for r in rs), sum(r["tower_gpu_ms"] for r in rs)
    llm_p = sum(r["predicted_ms"] - r["tower_predicted_ms"] for r in rs)
    llm_g = sum(r["gpu_ms"] - r["tower_gpu_ms"] for r in rs)
    return {"steps": len(rs), "tower_predicted_over_gpu": round(tower_p / tower_g, 3), "tower_gpu_sum_ms": round(tower_g, 1),
            "llm_predicted_over_gpu": round(llm_p / llm_g, 3), "llm_gpu_sum_ms": round(llm_g, 1)}


def markdown_images(table: list[tuple[str, str, dict[str, Any] | None]]) -> list[str]:
    """``image_split`` rows ``(case, rate, split)`` as a table (rates without image steps left out)."""
    lines = ["| case | rate | image steps | tower GPU ms (sum) | tower predicted / GPU | LLM GPU ms (sum) | "
             "LLM predicted / GPU |", "|---|---|---|---|---|---|---|"]
    return lines + [f"| {case} | {rate} | {x['steps']} | {x['tower_gpu_sum_ms']} | {x['tower_predicted_over_gpu']} | "
                    f"{x['llm_gpu_sum_ms']} | {x['llm_predicted_over_gpu']} |" for case, rate, x in table if x]


def markdown_decode(table: list[tuple[str, str, list[dict[str, Any]]]]) -> list[str]:
    """``decode_by_batch`` rows ``(case, rate, rows)`` as a table."""
    lines = [f"| case | rate | batch | contexts (longest / mean >= {SPREAD}) | steps | mean context p50 | "
             "longest context p50 | GPU p50 ms | predicted / GPU (sums) |", "|---|---|---|---|---|---|---|---|---|"]
    for case, rate, rows in table:
        lines += [f"| {case} | {rate} | {r['batch']} | {'spread' if r['spread'] else 'even'} | {r['steps']} | "
                  f"{r['ctx_mean_p50']} | {r['ctx_max_p50']} | {r['gpu_p50_ms']} | {r['predicted_over_gpu']} |" for r in rows]
    return lines


def markdown(table: list[tuple[str, str, dict[str, dict[str, float]]]]) -> list[str]:
    """Rows ``(case, rate, summary)`` as a table, one line per kind of step."""
    f = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    lines = ["| case | rate | kind | steps | tokens p50 | predicted p50 ms | period p50 ms | GPU p50 ms | "
             "gap sum ms | predicted / period (sums) | predicted / GPU (sums) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, rate, summ in table:
        for kind, s in summ.items():
            lines.append(f"| {case} | {rate} | {kind} | {s['steps']} | {f(s.get('tokens_p50'))} | "
                         f"{f(s.get('predicted_p50_ms'))} | {f(s.get('period_p50_ms'))} | {f(s.get('gpu_p50_ms'))} | "
                         f"{f(s.get('gap_sum_ms'))} | {f(s.get('predicted_over_period'))} | "
                         f"{f(s.get('predicted_over_gpu'))} |")
    return lines


def plan_of(report: dict[str, Any], model: str, case: str) -> Any:
    """The pinned plan a fidelity report's case ran (its ``plan_yaml``)."""
    from plans.schema import parse_plan

    return parse_plan(report["models"][model]["cases"][case]["plan_yaml"], source=f"{model} {case} plan_yaml")


def coster_of(plan: Any) -> Any:
    """The simulator's coster of ``plan`` on the cost model as it is now."""
    from costmodels.simulator import coster_for, cost_model_for_plan

    return coster_for(plan, cost_model_for_plan(plan))


def in_step_encoder(plan: Any) -> Any:
    """The plan's encoder layout where its images are encoded inside the steps (every placement
    but ``dedicated``; ``costmodels.simulator.vision.in_step_ms``), else None."""
    dims = plan.dims()
    return dims.encoder() if dims.vision and dims.placement != "dedicated" else None


def from_report(report: dict[str, Any], steps: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Every traced (model, case, rate) of a fidelity report costed with the cost model as it is
    now: ``(case, rate, cost_steps rows)``."""
    table = []
    for model, cases in steps.items():
        for case, rates in cases.items():
            plan = plan_of(report, model, case)
            coster, encoder = coster_of(plan), in_step_encoder(plan)
            for frac, records in rates.items():
                table.append((f"{model} {case}", frac, cost_steps(records, coster, encoder)))
    return table


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help=f"a fidelity_2gpu.json run with --trace ({STEPS_FILE} beside it)")
    ap.add_argument("--steps", type=Path, default=None, help="its steps file (default: NAME.steps.json.gz beside NAME.json)")
    ap.add_argument("--decode-detail", action="store_true",
                    help="also the decode steps by batch and by the spread of their contexts (decode_by_batch)")
    ap.add_argument("--image-detail", action="store_true",
                    help="also the image steps split into the tower and the LLM's part (image_split)")
    a = ap.parse_args(argv)
    steps_path = a.steps or steps_beside(a.report)
    try:
        report, steps = json.loads(a.report.read_text()), read_steps(steps_path)
    except (OSError, ValueError, EOFError) as e:
        ap.error(f"cannot read {a.report} and {steps_path.name} beside it ({type(e).__name__}: {e})")
    try:
        table = from_report(report, steps)
    except (KeyError, TypeError) as e:
        ap.error(f"{steps_path.name} names a model or case {a.report.name} does not have, or the report "
                 f"lacks its plan ({type(e).__name__}: {e})")
    print("\n".join(markdown([(case, rate, summarize(rows)) for case, rate, rows in table])))
    if a.decode_detail:
        print("\n" + "\n".join(markdown_decode([(case, rate, decode_by_batch(rows)) for case, rate, rows in table])))
    if a.image_detail:
        print("\n" + "\n".join(markdown_images([(case, rate, image_split(rows)) for case, rate, rows in table])))


if __name__ == "__main__":
    main()
