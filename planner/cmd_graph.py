"""`plan graph SPEC`: trace a spec's model into its op graph and print the blocks.

SPEC is a model.yaml, a preset name (``llama-3.1-70b``), or an HF ``config.json`` / checkpoint
directory. The graph comes from the on-disk cache when the config was traced before (no torch
or transformers import then). ``--json`` prints one JSON object instead of the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer


def _resolve_config(spec: str) -> tuple[str, dict[str, Any]]:
    """(display name, HF config dict) for a spec path, preset name or config path."""
    from graph.hf_config import load_config, preset_names
    from plans.errors import UserError

    p = Path(spec)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        from planner.spec import load_spec

        s = load_spec(p)
        if s.model.preset:
            return s.name, load_config(preset=s.model.preset)
        return s.name, load_config(config=s.resolve(s.model.config or ""))
    if p.is_dir() or (p.is_file() and p.suffix == ".json"):
        return str(p), load_config(config=p)
    if spec in preset_names():
        return spec, load_config(preset=spec)
    if p.suffix in (".yaml", ".yml", ".json"):
        raise UserError(f"file not found: {spec}")
    load_config(preset=spec)  # raises: unknown preset, with the nearest name
    raise UserError(f"cannot read model from '{spec}'")


def _summary(name: str, g: Any, cached: bool, seconds: float) -> dict[str, Any]:
    kinds: dict[str, dict[str, Any]] = {}
    for b in g.blocks:
        ops = g.block_ops(b)
        fpt = sum(o.flops.tokens + o.flops.seqs for o in ops)  # one token of one sequence
        pairs = sum(o.flops.pairs for o in ops)
        k = kinds.setdefault(b.kind, {"kind": b.kind, "tower": b.tower, "count": 0, "params_each": b.params,
                                      "params_total": 0, "flops_per_token": fpt, "flops_per_pair": pairs})
        k["count"] += 1
        k["params_total"] += b.params
    info = g.info
    return {
        "name": name,
        "architecture": info.architecture,
        "total_params": int(g.total_params),
        "vision_params": int(sum(b.params for b in g.blocks if b.tower == "vision")),
        "flops_per_token": float(sum(k["flops_per_token"] * k["count"] for k in kinds.values()
                                     if k["tower"] == "text")),
        "layers": info.layers,
        "ops": g.graph.number_of_nodes(),
        "kinds": list(kinds.values()),
        "blocks": [{"name": b.name, "kind": b.kind, "tower": b.tower, "params": int(b.params)} for b in g.blocks],
        "trace_seconds": round(seconds, 4),
        "first_trace_seconds": g.trace_seconds,
        "cached": cached,
        "config_sha256": g.config_sha256,
    }


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _print_table(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"{s['name']} ({s['architecture']})"))
    for col in ("block kind", "tower", "count", "params each", "params total", "FLOP/token"):
        t.add_column(col, justify="left" if col in ("block kind", "tower") else "right", no_wrap=True)
    for k in s["kinds"]:
        t.add_row(k["kind"], k["tower"], str(k["count"]), f"{k['params_each']:,}", f"{k['params_total']:,}",
                  _fmt(k["flops_per_token"]))
    t.add_row("total", "", str(len(s["blocks"])), "", f"{s['total_params']:,}", _fmt(s["flops_per_token"]),
              style="bold")
    con = Console()
    if con.width < 100:  # pipes and CI logs default to 80 columns: too narrow for exact counts
        con = Console(width=100)
    con.print(t)
    src = "cache" if s["cached"] else "trace"
    con.print(f"{s['total_params']:,} parameters ({s['vision_params']:,} vision), {s['ops']} ops. "
              "FLOP/token: per block, one token of one sequence, without attention "
              "(which adds 4*heads*head_dim per attention pair).", highlight=False)
    con.print(f"graph from {src} in {s['trace_seconds']:.2f} s", highlight=False)


def _block_ops(g: Any, block: str) -> list[dict[str, Any]]:
    """Per-op rows of one block: kind, shard, params, shape and per-token costs (elements)."""
    from graph.hf_config import nearest
    from plans.errors import UserError

    names = [b.name for b in g.blocks]
    if block not in names:
        raise UserError(f"no block '{block}' in this model{nearest(block, names)}; blocks: "
                        f"{names[0]} ... {names[-1]}")
    rows = []
    for o in g.block_ops(next(b for b in g.blocks if b.name == block)):
        rows.append({"name": o.name, "kind": o.kind, "module": o.module, "shard": o.shard, "params": o.params,
                     "shape": o.shape, "flops_per_token": o.flops.tokens + o.flops.seqs,
                     "flops_per_pair": o.flops.pairs, "read_per_token": o.act_read.tokens + o.act_read.seqs,
                     "written_per_token": o.act_written.tokens + o.act_written.seqs,
                     "kv_read_per_kv_token": o.kv_read.kv, "kv_written_per_token": o.kv_written.tokens,
                     "preds": list(g.graph.predecessors(o.name))})
    return rows


def _print_ops(block: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"ops of {block} (elements per token; attention also per pair / per cached token)"))
    for col in ("op", "kind", "shard", "params", "FLOP/token", "FLOP/pair", "read/token", "written/token"):
        t.add_column(col, justify="left" if col in ("op", "kind", "shard") else "right", no_wrap=True)
    for r in rows:
        t.add_row(r["name"], r["kind"], r["shard"], f"{r['params']:,}", _fmt(r["flops_per_token"]),
                  _fmt(r["flops_per_pair"]), _fmt(r["read_per_token"]), _fmt(r["written_per_token"]))
    con = Console()
    if con.width < 150:
        con = Console(width=150)
    con.print(t)


def graph_cmd(
    spec: str = typer.Argument(..., help="model.yaml, preset name, or HF config.json / checkpoint directory"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    block: Optional[str] = typer.Option(None, "--block",
                                        help="list the ops of one block (e.g. layers.0, visual.blocks.7)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="trace again even if the graph is cached"),
) -> None:
    """Trace the model into its op graph and print its blocks (params, FLOPs/token)."""
    from graph.cache import load_or_trace

    name, cfg = _resolve_config(spec)
    r = load_or_trace(cfg, use_cache=not no_cache)
    s = _summary(name, r.graph, r.cached, r.seconds)
    if block is not None:  # `--block ''` names no block: an error, not the whole table
        s["block"] = block
        s["block_ops"] = _block_ops(r.graph, block)
    if as_json:
        typer.echo(json.dumps(s))
    elif block is not None:
        _print_ops(block, s["block_ops"])
    else:
        _print_table(s)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `plan` app."""
    app.command("graph")(graph_cmd)
