"""What a folder copy works on and what it comes to.

A :class:`FolderJob` says where one copy runs (a study folder, locally and on Drive, with
its manifest); a :class:`FolderOutcome` says what a backup or restore of a folder did,
naming each :class:`EntryProblem` on the way.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import anyio

    from sweepsafe.drive._helper_client import HelperPool
    from sweepsafe.drive._local_state import Manifest, Signature
    from sweepsafe.drive._spares import Spares

__all__ = ["EntryProblem", "FolderJob", "FolderOutcome", "PublishDatabase", "folder_prefix"]


def folder_prefix(root: Path, folder: Path) -> str:
    """``folder`` as the prefix of the paths under it, relative to ``root`` (a study
    folder, locally or on Drive): ``""`` for ``root`` itself, else ``"trials/"``."""
    rel = os.path.relpath(folder, root).replace(os.sep, "/")
    return "" if rel == "." else rel + "/"


@dataclass(frozen=True)
class EntryProblem:
    """One entry that did not reach Drive (or was not restored), and why."""

    rel: str
    """Relative to the study folder."""
    reason: str
    retryable: bool
    error: BaseException | None = field(default=None, compare=False, repr=False)
    """What was raised, when one exception says it all."""

    def __str__(self) -> str:
        return f"{self.rel} ({self.reason})"


@dataclass(frozen=True)
class FolderOutcome:
    """What a folder backup or restore did."""

    files_copied: int = 0
    bytes_copied: int = 0
    files_unchanged: int = 0
    problems: tuple[EntryProblem, ...] = ()
    skipped: tuple[str, ...] = ()
    """Entries left out by rule (links that lead elsewhere, FIFOs), named once each."""
    kept_local: tuple[str, ...] = ()
    """Restore only: local files changed since their last backup, left as they were."""
    strays: tuple[str, ...] = ()
    """Restore only: temporaries of killed copies seen on Drive (relative to the study)."""
    stopped: BaseException | None = None
    """A failure of Drive as a whole that ended the copy early."""


PublishDatabase = Callable[[Path], Awaitable["EntryProblem | None"]]
"""Backs up an Optuna database met inside a folder the way a database target is."""


@dataclass(frozen=True)
class FolderJob:
    """Where a folder copy runs: one study folder, locally and on Drive."""

    pool: HelperPool
    unit_local: Path
    unit_drive: Path
    manifest: Manifest
    timeout: float
    scratch: Path
    concurrency: int
    publish_database: PublishDatabase | None = None
    file_lock: Callable[[str], anyio.Lock] | None = None
    """One lock per file of the study: two jobs never copy the same file at once."""
    landing: dict[str, Signature] | None = None
    """Files of the study on Drive whose folder is not yet synced, shared by its jobs."""
    spares: Spares | None = None
    """Next versions of the study's large files, captured while the one before ships."""
    check_drive: bool = False
    """Look on Drive for the files the manifest calls copied (the end of a sweep): one
    missing there, deleted by hand or by a cleanup rule, is copied again."""
