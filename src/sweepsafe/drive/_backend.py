"""The backend protocol: what the Optuna integration needs from a place that keeps studies."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sweepsafe.drive._results import BackupResult, GenerationInfo, VerifyResult

__all__ = ["BackupBackend"]

StrPath = str | os.PathLike[str]


@runtime_checkable
class BackupBackend(Protocol):
    """Backs up, restores and verifies the studies under ``local_root`` somewhere durable.

    :class:`~sweepsafe.DriveStore` is one (mypy checks it below); anything with these
    methods can stand in for it wherever sweepsafe takes a ``backup_to_drive``. The
    async methods never raise for expected failures: they return a falsy result.
    """

    local_root: Path

    async def abackup(
        self,
        path: StrPath,
        is_directory: bool = False,
        *,
        exclude: Sequence[str] = (),
        final: bool = False,
    ) -> BackupResult:
        """Copy ``path`` to the backend; ``final`` at the end of a sweep."""

    async def arestore(
        self,
        path: StrPath,
        is_directory: bool = False,
        *,
        generation: int | None = None,
        before: float | None = None,
    ) -> BackupResult:
        """Bring ``path`` back, checked, never over newer local work."""

    async def averify(self, path: StrPath) -> VerifyResult:
        """What the backend's copy of ``path`` holds."""

    async def ahistory(self, path: StrPath) -> list[GenerationInfo]:
        """The kept generations of a database, newest first."""

    async def aacquire(
        self, study_dir: StrPath, *, takeover: bool = False, shared: bool = False
    ) -> None:
        """Become the one writer of a study's copy, or raise LeaseHeldError."""

    async def aholds(self, study_dir: StrPath, *, take: bool = False) -> bool:
        """Whether this runtime holds the study's lease (trying to take it with ``take``)."""

    async def arenew(self) -> None:
        """Renew the leases held; never raises."""

    async def arelease(self, study_dir: StrPath | None = None) -> None:
        """Give leases back; never raises."""


if TYPE_CHECKING:
    from sweepsafe.drive._store import DriveStore

    def _drive_store_is_a_backend(store: DriveStore) -> BackupBackend:
        return store
