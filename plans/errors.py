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
