"""Resolve a model to its HF-format config dict: a built-in preset or a file/dir on disk.

No hub access ever. Presets are ``graph/presets/<name>/config.json``, copied from the
published configs. Pure JSON: importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

from plans.errors import UserError, read_user_text

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.name for p in PRESET_DIR.iterdir() if (p / "config.json").is_file())


def nearest(name: str, choices: list[str]) -> str:
    """' (did you mean X?)' or ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def preset_path(name: str) -> Path:
    names = preset_names()
    if name not in names:
        raise UserError(f"unknown model preset '{name}'{nearest(name, names)}; presets: {', '.join(names)}")
    return PRESET_DIR / name / "config.json"


def config_file(path: str | Path) -> Path:
    """A config.json path from a file or a checkpoint directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"model config not found: {p}")
    return p


def read_config(path: str | Path) -> dict[str, Any]:
    p = config_file(path)
    try:
        cfg = json.loads(read_user_text(p, "model config"))
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise UserError(f"{p}: JSON nested too deeply") from None
    if not isinstance(cfg, dict) or not (cfg.get("architectures") or cfg.get("model_type")):
        raise UserError(f"{p}: not an HF model config (no 'architectures' or 'model_type' key)")
    return cfg


def load_config(preset: str | None = None, config: str | Path | None = None) -> dict[str, Any]:
    """The HF config dict of a preset name or a config path (exactly one given)."""
    if (preset is None) == (config is None):
        raise UserError("give exactly one of model.preset or model.config")
    return read_config(preset_path(preset) if preset else config)


def config_sha256(cfg: dict[str, Any]) -> str:
    """Content hash of a config (canonical JSON), the key of the graph cache."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    return archs[0] if archs else str(cfg.get("model_type"))


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (VL configs nest it under ``text_config``)."""
    tc = cfg.get("text_config")
    if isinstance(tc, dict):
        merged = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
        merged.update(tc)
        return merged
    return cfg
