"""The exceptions sweepsafe raises: one base class and the few cases a caller tells apart."""

from __future__ import annotations

__all__ = [
    "BackupFailed",
    "DriveNotMountedError",
    "DrivePathError",
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
