"""The one error type the CZI reader raises for unreadable slides."""

from __future__ import annotations

from pathlib import Path

from mk_hspc.errors import UserError


class CziSlideError(UserError, RuntimeError):
    """A CZI file could not be opened or read.

    The message always names the file and the reason, so a failing run over a folder of slides
    points at the culprit without a traceback dig.

    Attributes:
        path: The offending file.
        reason: Why it failed, in words.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple:
        # Default exception pickling passes the formatted message as the only argument; keep both fields.
        return (type(self), (self.path, self.reason))
