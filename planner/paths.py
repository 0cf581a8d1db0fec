"""Checks on the files a command writes, made before the work starts (a compile or a simulation
should not run for a minute and then fail on its output path).

    writable(path, "-o")        -> path    UserError: a folder, a missing folder, a read-only folder
    plot_path(path)             -> path    also: a suffix matplotlib cannot write
"""

from __future__ import annotations

import os
from pathlib import Path

from plans.errors import UserError


def writable(path: Path, option: str) -> Path:
    """``path`` if a file can be written there; UserError naming ``option`` otherwise."""
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name")
    parent = path.parent
    if not parent.exists():
        raise UserError(f"{option} {path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{option} {path}: not writable")
    return path


def plot_path(path: Path, option: str = "--plot") -> Path:
    """A figure path matplotlib can write: a file in an existing folder with a known suffix."""
    writable(path, option)
    from matplotlib.figure import Figure

    kinds = Figure().canvas.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in kinds:
        raise UserError(f"{option} {path}: "
                        + (f"cannot write '.{suffix}' figures" if suffix else "no suffix to pick the figure format")
                        + f"; use one of {', '.join('.' + k for k in sorted(kinds))}")
    return path


def write_text(path: Path, text: str, option: str) -> None:
    """Write ``text``; an OS error (disk full, a race with the checks above) is a UserError."""
    try:
        path.write_text(text)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write: {e.strerror or e}") from None
