"""Back up, restore and verify local studies on a Google Drive folder.

The public names are :class:`DriveStore`, the :class:`BackupBackend` protocol it
satisfies, and the results its methods return; the modules behind them are private.
"""

from __future__ import annotations

from sweepsafe.drive._backend import BackupBackend
from sweepsafe.drive._reading import check_database, folder_entries, path_kind
from sweepsafe.drive._results import BackupResult, GenerationInfo, StudySummary, VerifyResult
from sweepsafe.drive._store import DriveStore

__all__ = [
    "BackupBackend",
    "BackupResult",
    "DriveStore",
    "GenerationInfo",
    "StudySummary",
    "VerifyResult",
    "check_database",
    "folder_entries",
    "path_kind",
]
