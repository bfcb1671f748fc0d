"""The exit statuses of the ``sweepsafe`` command and the error that carries one."""

from __future__ import annotations

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_UNSOUND", "CommandError"]

EXIT_OK = 0
"""Done, and everything checked is sound."""
EXIT_UNSOUND = 1
"""Something checked is not sound: a corrupt database, an incomplete Drive copy, a crash."""
EXIT_BAD_INPUT = 2
"""The command could not start: bad options, a missing file, an objective that won't import."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C, as shells report SIGINT."""


class CommandError(Exception):
    """A problem the command explains in one line on stderr before exiting ``exit_status``."""

    def __init__(self, message: str, exit_status: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_status = exit_status
