"""Back up, restore and verify local paths on a Google Drive folder."""

from __future__ import annotations

from sweepsafe.drive._store import BackupResult, DriveStore, VerifyResult

__all__ = ["BackupResult", "DriveStore", "VerifyResult"]
