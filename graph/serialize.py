"""OpGraph <-> plain JSON-able dict (no torch, no transformers).

Layout: ``{"format", "tracer_version", "config_sha256", "trace_seconds", "info", "blocks",
"ops", "edges"}``. Each Affine is stored as ``[const, tokens, pairs, kv, seqs]``; ops are listed
in graph insertion order (execution order) and edges as ``[src, dst]`` name pairs.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import networkx as nx

from graph.opgraph import Affine, Block, ModelInfo, OpGraph, OpNode

FORMAT = "shiftplan.opgraph/1"
_AFFINES = ("flops", "act_read", "act_written", "kv_read", "kv_written")


def _aff(a: Affine) -> list[float]:
    return [a.const, a.tokens, a.pairs, a.kv, a.seqs]


def _unaff(v: list[float]) -> Affine:
    return Affine(*v)


def to_dict(g: OpGraph, tracer_version: int) -> dict[str, Any]:
    ops = []
    for name in g.graph.nodes:
        o: OpNode = g.graph.nodes[name]["op"]
        d: dict[str, Any] = {"name": o.name, "kind": o.kind, "module": o.module, "block": o.block,
                             "params": o.params, "weight_elems": o.weight_elems, "shard": o.shard, "shape": o.shape}
        for f in _AFFINES:
            d[f] = _aff(getattr(o, f))
        ops.append(d)
    return {
        "format": FORMAT,
        "tracer_version": tracer_version,
        "config_sha256": g.config_sha256,
        "trace_seconds": g.trace_seconds,
        "info": asdict(g.info),
        "blocks": [asdict(b) for b in g.blocks],
        "ops": ops,
        "edges": [[u, v] for u, v in g.graph.edges],
    }


def from_dict(d: dict[str, Any]) -> OpGraph:
    if d.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} document")
    g = nx.DiGraph()
    for o in d["ops"]:
        kw = dict(o)
        for f in _AFFINES:
            kw[f] = _unaff(kw[f])
        g.add_node(o["name"], op=OpNode(**kw))
    g.add_edges_from((u, v) for u, v in d["edges"])
    return OpGraph(info=ModelInfo(**d["info"]), graph=g, blocks=[Block(**b) for b in d["blocks"]],
                   config_sha256=d["config_sha256"], trace_seconds=d["trace_seconds"])
