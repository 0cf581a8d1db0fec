"""The one error type the command line turns into a clean message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a bad spec, an impossible mesh, an unreadable file.

    The message names what is wrong (field path, YAML line, the arithmetic of a failed
    constraint). ``exit_code`` is what the ``plan`` command exits with (2 by convention).
    """

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def describe(e: BaseException) -> str:
    """An error as a message: a UserError's own text (it names what is wrong), else ``Type: text``."""
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


def first_line(text: str, default: str) -> str:
    """The first line of a message (a one-line report of a longer error), ``default`` when it is empty."""
    return (text.strip().splitlines() or [default])[0]


def read_user_text(path, what: str, *, encoding: str = "utf-8") -> str:
    """The text of a file the user named (a spec, a plan, a trace, a model config).

    A missing file, a folder, an unreadable file, bytes that are not ``encoding`` text and text
    holding NUL bytes (a binary file) are each a UserError that names the file and ``what`` it
    should have been."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        text = p.read_bytes().decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not a {what} file: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read: {e.strerror or e}") from None
    if "\x00" in text:
        raise UserError(f"{p}: not a {what} file: it holds NUL bytes (a binary file?)")
    return text
