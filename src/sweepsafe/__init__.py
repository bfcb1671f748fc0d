"""sweepsafe: keep an Optuna sweep backed up to Google Drive and resume it on a new runtime."""

from __future__ import annotations

from sweepsafe.errors import (
    BackupFailed,
    DriveNotMountedError,
    DrivePathError,
    StudyNotFoundError,
    SweepsafeError,
)

__all__ = [
    "BackupFailed",
    "DriveNotMountedError",
    "DrivePathError",
    "StudyNotFoundError",
    "SweepsafeError",
]
