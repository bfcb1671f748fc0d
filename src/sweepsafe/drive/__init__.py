"""Back up, restore and verify local studies on a Google Drive folder.

The public names are :class:`DriveStore`, :class:`ObjectStore` (the same store on S3,
GCS or any fsspec URL), the :class:`BackupBackend` protocol they satisfy, and the results
their methods return; the modules behind them are private.
``COPY_CHUNK`` is the size of the pieces a file is copied in (bounding the memory a copy
takes).
"""

from __future__ import annotations

from sweepsafe.drive._backend import BackupBackend
from sweepsafe.drive._files import COPY_CHUNK
from sweepsafe.drive._object_store import ObjectStore
from sweepsafe.drive._reading import check_database, folder_entries, path_kind
from sweepsafe.drive._results import BackupResult, GenerationInfo, StudySummary, VerifyResult
from sweepsafe.drive._store import DriveStore

__all__ = [
    "COPY_CHUNK",
    "BackupBackend",
    "BackupResult",
    "DriveStore",
    "GenerationInfo",
    "ObjectStore",
    "StudySummary",
    "VerifyResult",
    "check_database",
    "folder_entries",
    "path_kind",
]
