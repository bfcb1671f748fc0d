"""The exceptions sweepsafe raises: one base class and the few cases a caller tells apart."""

from __future__ import annotations

__all__ = [
    "BackupFailed",
    "DriveNotMountedError",
    "DrivePathError",
    "LeaseHeldError",
    "StorageError",
    "StudyConflictError",
    "StudyNotFoundError",
    "SweepsafeError",
]


class SweepsafeError(Exception):
    """Base class of every error sweepsafe raises on purpose."""


class DrivePathError(SweepsafeError, ValueError):
    """A path is on a Google Drive mount where a local path is needed (or the reverse)."""


class DriveNotMountedError(SweepsafeError):
    """Google Drive is not mounted where sweepsafe was told to find it."""


class StudyNotFoundError(SweepsafeError, FileNotFoundError):
    """No study folder (``study-*`` with a ``study.db``) where one was expected."""


class BackupFailed(SweepsafeError):
    """Some backups did not reach Drive; the message names every failed or pending target."""


class LeaseHeldError(SweepsafeError):
    """Another runtime owns the study's Drive copy; the message names it and how to take over."""


class StudyConflictError(SweepsafeError):
    """The local study and its Drive copy disagree, so neither replaced the other.

    The Drive copy has finished trials the local study lacks (a stale or second runtime
    wrote it), or the two have diverged. The message says which trials and what to do.
    """


class StorageError(SweepsafeError):
    """A database server given as a shared study's storage cannot be used: a URL of an
    unsupported kind, a driver not installed, a server that cannot be reached."""
