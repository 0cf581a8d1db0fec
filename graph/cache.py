"""On-disk cache of traced op graphs: ``get_graph(cfg)`` traces once per config content.

Key: ``config_sha256(cfg)`` plus the tracer version (a tracer change invalidates old entries).
Directory: ``$SHIFTPLAN_CACHE`` if set, else ``~/.cache/shiftplan/graphs``. Entries are JSON
(``graph.serialize``) written atomically (temp file + rename), so concurrent runs never see a
half-written entry. A hit imports neither torch nor transformers; an unreadable or stale entry
is traced again and overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graph.hf_config import config_sha256
from graph.opgraph import OpGraph
from graph.serialize import from_dict, to_dict
from graph.trace import TRACER_VERSION, trace_config  # imports neither torch nor transformers



@dataclass
class CachedGraph:
    """A graph and how it was obtained: ``cached`` (read from disk) and ``seconds`` (this call)."""

    graph: OpGraph
    cached: bool
    seconds: float
    path: Path


def cache_dir() -> Path:
    env = os.environ.get("SHIFTPLAN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "shiftplan" / "graphs"


def cache_path(cfg: dict[str, Any]) -> Path:
    return cache_dir() / f"{config_sha256(cfg)}-t{TRACER_VERSION}.json"


def load_or_trace(cfg: dict[str, Any], *, use_cache: bool = True) -> CachedGraph:
    """The op graph of ``cfg``, from the cache when present, else traced (and stored)."""
    t0 = time.perf_counter()
    path = cache_path(cfg)
    if use_cache and path.is_file():
        try:
            g = from_dict(json.loads(path.read_text()))
            return CachedGraph(g, True, time.perf_counter() - t0, path)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or stale: trace again
    g = trace_config(cfg)  # refuses unsupported architectures before importing torch
    if use_cache:
        _store(path, to_dict(g, TRACER_VERSION))
    return CachedGraph(g, False, time.perf_counter() - t0, path)


def get_graph(cfg: dict[str, Any]) -> OpGraph:
    """The op graph of an HF config dict (cached on disk by content)."""
    return load_or_trace(cfg).graph


def _store(path: Path, doc: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache directory only costs a re-trace next time
