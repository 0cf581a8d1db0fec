"""Where weights come from: a local HF safetensors checkpoint (each rank reads only its
slices), an in-memory state dict, or seeded random tensors.

All sources answer ``rows(name, runs, dim)``: the concatenation along ``dim`` of the index
ranges ``runs`` of the full tensor ``name``. Names are the checkpoint names of HF's published
files (``model.layers.0.self_attn.q_proj.weight``, ``visual.blocks.0.attn.qkv.weight``); newer
in-memory names (``model.language_model.*``, ``model.visual.*``) are accepted as aliases.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Container
from pathlib import Path
from typing import Protocol

import torch

from plans.errors import UserError

Runs = list[tuple[int, int]]


def aliases(name: str) -> list[str]:
    """Spellings of one checkpoint name across transformers versions."""
    out = [name]
    if name.startswith("model.") and not name.startswith("model.language_model."):
        out.append("model.language_model." + name[len("model."):])
    if name.startswith("visual."):
        out.append("model." + name)
    return out


class WeightSource(Protocol):
    def shape(self, name: str) -> tuple[int, ...]: ...

    def rows(self, name: str, runs: Runs | None = None, dim: int = 0) -> torch.Tensor: ...

    def has(self, name: str) -> bool: ...


def find_alias(name: str, keys: Container[str]) -> str | None:
    """The first of ``name``'s checkpoint aliases present in ``keys`` (None when none is)."""
    return next((a for a in aliases(name) if a in keys), None)


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class SafetensorsSource:
    """A directory with ``model.safetensors`` or ``model.safetensors.index.json`` + shards."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.dir = Path(path)
        idx = self.dir / "model.safetensors.index.json"
        if idx.is_file():
            files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"weights: no *.safetensors files in {self.dir}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for f in files:
            h = safe_open(str(self.dir / f), framework="pt")
            self._handles[f] = h
            for k in h.keys():
                self._where[k] = f

    def _key(self, name: str) -> str:
        k = find_alias(name, self._where)
        if k is None:
            raise UserError(f"weights in {self.dir}: tensor '{name}' not found")
        return k

    def has(self, name: str) -> bool:
        return find_alias(name, self._where) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        k = self._key(name)
        return tuple(self._handles[self._where[k]].get_slice(k).get_shape())

    def rows(self, name: str, runs: Runs | None = None, dim: int = 0) -> torch.Tensor:
        k = self._key(name)
        sl = self._handles[self._where[k]].get_slice(k)
        if runs is None:
            return sl[:]
        idx = [slice(None)] * dim
        return _cat([sl[tuple(idx + [slice(s, e)])] for s, e in runs], dim)


class StateDictSource:
    """Tensors already in memory (e.g. an HF model's ``state_dict()``); slices are views when
    a single run is asked for, so a single-GPU engine shares storage with the source."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd = sd

    def _key(self, name: str) -> str:
        k = find_alias(name, self.sd)
        if k is None:
            raise UserError(f"weights: tensor '{name}' not found in the state dict")
        return k

    def has(self, name: str) -> bool:
        return find_alias(name, self.sd) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.sd[self._key(name)].shape)

    def rows(self, name: str, runs: Runs | None = None, dim: int = 0) -> torch.Tensor:
        t = self.sd[self._key(name)]
        if runs is None:
            return t
        return _cat([t.narrow(dim, s, e - s) for s, e in runs], dim)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The seeded random fp32 tensor of one checkpoint name (same on every rank and process).

    Norm weights ``1 + 0.1 N(0,1)``; biases ``0.1 N(0,1)``; matrices ``N(0,1) / sqrt(fan_in)``
    (embeddings ``N(0,1)``), so activations stay O(1) and greedy decoding has clear winners.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    base = name.rsplit(".", 1)[0]
    if name.endswith("bias"):
        return x * 0.1
    if "norm" in base or base.endswith("ln_q"):
        return 1.0 + 0.1 * x
    if "embed_tokens" in name:
        return x
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return x / max(1, fan_in) ** 0.5


class RandomSource:
    """Seeded random weights with the shapes of an expected-shapes table."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0):
        self.shapes = shapes
        self.seed = seed
        self._cache: dict[str, torch.Tensor] = {}

    def has(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise UserError(f"random weights: no tensor '{name}'")
        return self.shapes[name]

    def rows(self, name: str, runs: Runs | None = None, dim: int = 0) -> torch.Tensor:
        if name not in self._cache:  # a rank asks for several slices of one tensor in a row
            self._cache = {name: random_tensor(name, self.shape(name), self.seed)}
        return StateDictSource(self._cache).rows(name, runs, dim)


def open_weights(path: str | Path) -> SafetensorsSource:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"weights directory not found: {p}")
    return SafetensorsSource(p)
