"""The errors of a Drive-side step run by a helper process.

A system call that failed in the helper, a step that missed its deadline (the helper was
then abandoned), and a helper that exited or closed its pipes.
"""

from __future__ import annotations

__all__ = ["DriveOSError", "DriveTimeout", "HelperGone"]


class DriveOSError(OSError):
    """A Drive-side system call failed in the helper."""

    place: str | None = None
    """The object store's URL when the helper served one (None: a Drive folder)."""


class DriveTimeout(Exception):
    """A Drive-side step did not finish within its deadline; the helper was abandoned."""

    def __init__(self, op: str, path: str, timeout: float) -> None:
        super().__init__(f"{op} {path} did not finish within {timeout:g} s")
        self.op = op
        self.path = path
        self.timeout = timeout
        self.place: str | None = None


class HelperGone(OSError):
    """The helper process exited or closed its pipes unexpectedly."""

    place: str | None = None
    """The object store's URL when the helper served one (None: a Drive folder)."""
