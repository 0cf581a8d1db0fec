"""Semantic plan diff: what changed between two plans, in words a reviewer reads.

    stage 1: layers 40-79 -> 38-79
    shift threshold 256 -> 384 tokens
    predicted TTFT p90 412 -> 388 ms

Known fields get a sentence; any other field that differs is still reported (as
``path: old -> new``), so "no changes" means the two plans are the same data (except
``provenance.spec``, the spec's path relative to the plan file, which says where a copy sits). Values are
compared after canonical rounding (``plans.schema.dump_plan``'s), so two plans that write the
same file compare equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from plans.schema import Plan, _canonical

Format = Literal["text", "markdown"]


@dataclass(frozen=True)
class Change:
    what: str  # short name of the thing, e.g. "stage 1", "shift threshold"
    old: str
    new: str
    unit: str = ""

    def text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.what.startswith("stage "):  # "stage 1: layers 40-79 -> 38-79"
            head, _, rest = self.what.partition(" ")
            idx, _, sub = rest.partition(" ")
            return f"{head} {idx}: {sub + ' ' if sub else ''}{self.old} -> {self.new}{unit}"
        return f"{self.what} {self.old} -> {self.new}{unit}"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _layers(st: dict[str, Any] | None) -> str:
    if st is None:
        return "(none)"
    extra = [n for n in ("embedding", "lm_head", "vision") if st.get(n)]
    return f"layers {st['first_layer']}-{st['last_layer']}" + (f" (+{', '.join(extra)})" if extra else "")


_PREDICTED = [
    ("ttft_ms.p50", "predicted TTFT p50", "ms"), ("ttft_ms.p90", "predicted TTFT p90", "ms"),
    ("ttft_ms.p99", "predicted TTFT p99", "ms"), ("tpot_ms.p50", "predicted TPOT p50", "ms"),
    ("tpot_ms.p90", "predicted TPOT p90", "ms"), ("tpot_ms.p99", "predicted TPOT p99", "ms"),
    ("output_tok_s", "predicted output throughput", "tok/s"),
    ("combined_tok_s", "predicted combined throughput", "tok/s"),
    ("goodput_rps", "predicted goodput", "req/s"), ("shift_tp_fraction", "share of steps in shifted TP mode", ""),
    ("meets_slo", "meets SLO", ""), ("source", "predicted by", ""),
]
_MEMORY = [("weights", "weights"), ("shift_copy", "shift copy"), ("kv", "KV cache"),
           ("activations", "activations"), ("total", "total"), ("capacity", "capacity")]


def diff_plans(a: Plan, b: Plan) -> list[Change]:
    """Every difference between plans ``a`` (old) and ``b`` (new), known fields first."""
    da = _canonical(a.model_dump(mode="json"))
    db = _canonical(b.model_dump(mode="json"))
    fa, fb = _flat(da), _flat(db)
    seen: set[str] = set()
    out: list[Change] = []

    def take(prefix: str) -> None:
        seen.update(k for k in list(fa) + list(fb) if k == prefix or k.startswith(prefix + ".")
                    or k.startswith(prefix + "["))

    def field(path: str, what: str, unit: str = "") -> None:
        seen.add(path)
        if fa.get(path) != fb.get(path):
            out.append(Change(what, _fmt(fa.get(path)), _fmt(fb.get(path)), unit))

    if a.mesh.label() != b.mesh.label():
        out.append(Change("mesh", a.mesh.label(), b.mesh.label()))
    for ax in ("dp", "pp", "tp", "sp"):
        seen.add(f"mesh.{ax}")
    field("mesh.axis_order", "rank order")
    take("stages")
    for i in range(max(len(a.stages), len(b.stages))):
        sa = da["stages"][i] if i < len(a.stages) else None
        sb = db["stages"][i] if i < len(b.stages) else None
        if _layers(sa) != _layers(sb):
            new = _layers(sb)
            if sa and sb:  # "layers 40-79 -> 38-79"
                new = new.removeprefix("layers ")
            out.append(Change(f"stage {i}", _layers(sa), new))
        if sa and sb:
            for k in sorted(set(sa) - {"index", "first_layer", "last_layer", "embedding", "lm_head", "vision"}):
                if sa.get(k) != sb.get(k):
                    unit = "ms" if k.endswith("_ms") else ("tokens" if k.endswith("_tokens") else "")
                    what = k.removesuffix("_ms").removesuffix("_tokens").replace("_", " ")
                    out.append(Change(f"stage {i} {what}", _fmt(sa.get(k)),
                                      _fmt(sb.get(k)), unit))
    field("vision.placement", "vision placement")
    field("vision.dedicated_gpus", "dedicated vision GPUs")
    field("shift.enabled", "shift")
    field("shift.threshold_tokens", "shift threshold", "tokens")
    take("shift.curves")
    ca = {c["tokens"]: c for c in da["shift"]["curves"]}
    cb = {c["tokens"]: c for c in db["shift"]["curves"]}
    for t in sorted(set(ca) | set(cb)):
        x, y = ca.get(t), cb.get(t)
        if x != y:
            fmt = lambda c: "-" if c is None else f"{c['sp_tp_ms']:g}/{c['tp_ms']:g}"  # noqa: E731
            out.append(Change(f"shift curve at {t} tokens (sp x tp / tp)", fmt(x), fmt(y), "ms"))
    for k, what in _MEMORY:
        field(f"memory_gb.{k}", f"memory per GPU, {what}", "GB")
    field("memory_gb.kv_tokens", "KV capacity", "tokens")
    for k, what, unit in _PREDICTED:
        field(f"predicted.{k}", what, unit)
    take("runners_up")
    ra = [f"{r['mesh']}/{r['vision']}" for r in da["runners_up"]]
    rb = [f"{r['mesh']}/{r['vision']}" for r in db["runners_up"]]
    if ra != rb:
        out.append(Change("runners-up", ", ".join(ra) or "(none)", ", ".join(rb) or "(none)"))
    old_by = {f"{r['mesh']}/{r['vision']}": r for r in da["runners_up"]}
    for r in db["runners_up"]:
        k = f"{r['mesh']}/{r['vision']}"
        o = old_by.get(k)
        if o is not None and o != r:
            if o.get("score") != r.get("score"):
                out.append(Change(f"runner-up {k} score", _fmt(o.get("score")), _fmt(r.get("score"))))
            if o.get("reason") != r.get("reason"):
                out.append(Change(f"runner-up {k} reason", repr(o.get("reason")), repr(r.get("reason"))))
    seen.add("provenance.spec")  # where the spec sits relative to the plan file: not part of the plan
    field("provenance.spec_sha256", "spec sha256")
    field("provenance.model_config_sha256", "model config sha256")
    field("provenance.cost_profile", "cost profile")
    field("provenance.shiftplan_version", "shiftplan version")
    take("notes")
    if da["notes"] != db["notes"]:
        out.append(Change("notes", f"{len(a.notes)} lines", f"{len(b.notes)} lines (changed)"))
    for k in sorted(set(fa) | set(fb)):
        if k not in seen and fa.get(k) != fb.get(k):
            out.append(Change(k, _fmt(fa.get(k)), _fmt(fb.get(k))))
    return out


def render(changes: list[Change], fmt: Format = "text", a_name: str = "a", b_name: str = "b") -> str:
    """Text (one change per line) or a markdown table for a review comment."""
    if fmt == "markdown":
        if not changes:
            return f"**Plan unchanged** (`{a_name}` = `{b_name}`)\n"
        lines = [f"**Plan changes** `{a_name}` -> `{b_name}`", "", "| what | old | new |", "|---|---|---|"]
        for c in changes:
            unit = f" {c.unit}" if c.unit else ""
            lines.append(f"| {c.what} | {c.old}{unit if c.old != '-' else ''} | {c.new}{unit if c.new != '-' else ''} |")
        return "\n".join(lines) + "\n"
    if not changes:
        return "plans are equal\n"
    return "".join(c.text() + "\n" for c in changes)
