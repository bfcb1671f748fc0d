"""Back up, restore and verify local paths on a Google Drive folder.

:class:`DriveStore` maps every path under a local root to the same relative path under
a Drive root. Its copies are atomic (temporary name, fsync, rename), databases go as
consistent integrity-checked snapshots, folders are copied incrementally, and every
Drive-side system call runs in a helper process with a deadline, so a stalled mount
can neither hang the caller nor keep its process from exiting.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Literal, TypeVar

import anyio

from sweepsafe._blocking import run_blocking
from sweepsafe.drive._files import RestoreRefused, fetch_file, ship_path
from sweepsafe.drive._folders import (
    MARKER_NAME,
    STATE_DIR_NAME,
    FolderOutcome,
    Manifest,
    manifest_path,
    restore_folder,
    sync_folder,
)
from sweepsafe.drive._helper_client import DriveTimeout, HelperPool
from sweepsafe.drive._messages import explain_failure, source_problem
from sweepsafe.drive._sqlite import SnapshotError, is_sqlite_file
from sweepsafe.errors import DriveNotMountedError, DrivePathError
from sweepsafe.paths import COLAB_DRIVE_MOUNT, is_drive_path

__all__ = ["BackupResult", "DriveStore", "VerifyResult"]

logger = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]
Kind = Literal["sqlite", "file", "directory", "skipped"]
T = TypeVar("T")


@dataclass(frozen=True)
class BackupResult:
    """The outcome of one backup or restore; truthy when it succeeded.

    For a backup ``source`` is the local path and ``destination`` its Drive copy; for a
    restore ``source`` is the Drive copy and ``destination`` the local path.
    """

    ok: bool
    source: Path
    destination: Path | None
    kind: Kind
    bytes_copied: int = 0
    files_copied: int = 0
    files_unchanged: int = 0
    duration_s: float = 0.0
    error: str | None = None
    """One sentence: what failed, where, and what to do."""
    retryable: bool = False
    """True when trying again may succeed (Drive I/O error, timeout, full, disconnected)."""

    def __bool__(self) -> bool:
        return self.ok


_NO_COUNTS: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True)
class VerifyResult:
    """What the Drive copy of a path looks like; truthy when it exists and is sound."""

    path: Path
    """The file that was checked: the Drive copy, or the Drive path itself."""
    exists: bool
    size: int | None = None
    mtime: float | None = None
    """Seconds since the epoch."""
    is_sqlite: bool = False
    integrity_ok: bool | None = None
    """``PRAGMA integrity_check`` said ok; None when not SQLite or not checked."""
    trial_counts: Mapping[str, int] = field(default_factory=lambda: _NO_COUNTS)
    """Optuna databases only: trial state name (``"COMPLETE"``, ...) -> count."""
    study_names: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The copy exists, could be checked, and (for SQLite) passed integrity_check."""
        return (
            self.exists and self.error is None and (not self.is_sqlite or bool(self.integrity_ok))
        )

    def __bool__(self) -> bool:
        return self.ok


class DriveStore:
    """Copies paths under ``local_root`` to the same place under ``drive_root``, and back.

    Thread-safe and usable from any event loop: the async methods (``abackup``,
    ``arestore``, ``averify``) may run concurrently from several loops and threads; the
    sync ones (``backup``, ``restore``, ``verify``, and calling the store) block the
    calling thread (in a notebook cell too, via a helper thread). Expected failures never
    raise: they come back as a result with ``ok`` false and an ``error`` sentence.

    Args:
        local_root: local folder whose contents are backed up (not on Drive).
        drive_root: Drive folder that receives the copies; created on first backup.
        drive_timeout: seconds each Drive-side step may take before the store gives up
            on it and abandons the helper process doing it.
        mirror: delete from Drive the files of a backed-up folder deleted locally.
        file_concurrency: how many files of a folder are copied at once (each by its
            own helper process), for backups and restores; Drive's latency per file
            (hundreds of ms on a FUSE mount) then overlaps across files.

    Example:
        >>> store = DriveStore.for_colab("/content/out", "my-sweep")  # doctest: +SKIP
        >>> store.backup("/content/out/study-1/study.db")  # doctest: +SKIP
        BackupResult(ok=True, ...)
    """

    def __init__(
        self,
        local_root: StrPath,
        drive_root: StrPath,
        *,
        drive_timeout: float = 120.0,
        mirror: bool = False,
        file_concurrency: int = 4,
        _helper_argv: Sequence[str] | None = None,
    ) -> None:
        self.local_root = Path(os.path.abspath(local_root))
        self.drive_root = Path(os.path.abspath(drive_root))
        if is_drive_path(self.local_root):
            raise DrivePathError(
                f"local_root {self.local_root} is on Google Drive; SQLite on a Drive mount is "
                "slow and unsafe (no reliable locking), so keep the sweep on local disk "
                "(e.g. /content/out) and give the Drive folder as drive_root."
            )
        if file_concurrency < 1:
            raise ValueError(f"file_concurrency must be at least 1, not {file_concurrency}")
        self.drive_timeout = drive_timeout
        self.mirror = mirror
        self.file_concurrency = file_concurrency
        # Folders are created on Drive only below this one, which must exist: with
        # Drive unmounted, its mount point is a plain local folder.
        self._pool = HelperPool(_helper_argv, anchor=str(self.drive_root.parent))
        self._state_dir = self.local_root / STATE_DIR_NAME
        self._finalizer = weakref.finalize(self, self._pool.close)

    @classmethod
    def for_colab(
        cls,
        local_root: StrPath,
        drive_subdir: str = "sweepsafe",
        *,
        mount_point: StrPath = COLAB_DRIVE_MOUNT,
        drive_timeout: float = 120.0,
        mirror: bool = False,
        file_concurrency: int = 4,
    ) -> DriveStore:
        """A store whose Drive root is ``{mount_point}/MyDrive/{drive_subdir}``.

        Raises:
            DriveNotMountedError: ``{mount_point}/MyDrive`` is not a folder.
        """
        my_drive = Path(os.path.abspath(mount_point)) / "MyDrive"
        if not my_drive.is_dir():
            raise DriveNotMountedError(
                f"Google Drive is not mounted: {my_drive} is not a folder. In Colab run "
                f"`from google.colab import drive; drive.mount('{mount_point}')` first."
            )
        store = cls(
            local_root,
            my_drive / drive_subdir,
            drive_timeout=drive_timeout,
            mirror=mirror,
            file_concurrency=file_concurrency,
        )
        store._pool.anchor = str(my_drive)
        return store

    def __repr__(self) -> str:
        return f"DriveStore({str(self.local_root)!r}, {str(self.drive_root)!r})"

    # -- paths --------------------------------------------------------------------------
    def drive_path_for(self, path: StrPath) -> Path:
        """Where the Drive copy of the local ``path`` lives.

        Raises:
            DrivePathError: ``path`` is already on Google Drive.
            ValueError: ``path`` is not under ``local_root``.
        """
        local = Path(os.path.abspath(path))
        if is_drive_path(local) or _is_within(local, self.drive_root):
            raise DrivePathError(
                f"{local} is already on Google Drive, so nothing needs backing up."
            )
        if not _is_within(local, self.local_root):
            raise ValueError(
                f"{local} is not inside the store's local root {self.local_root}; back up "
                "paths under it, or use a DriveStore whose local_root contains it."
            )
        return self.drive_root / local.relative_to(self.local_root)

    # -- backup -------------------------------------------------------------------------
    async def abackup(
        self, path: StrPath, is_directory: bool = False, *, exclude: Sequence[str] = ()
    ) -> BackupResult:
        """Copy ``path`` (a file, or with ``is_directory`` a folder) to Drive.

        A database is copied as a consistent, quick-checked snapshot; a folder only
        for the files changed since its last backup (``exclude``: fnmatch patterns of
        paths relative to the folder). The Drive copy is replaced atomically.
        Cancelling leaves the previous Drive copy in place.
        """
        started = time.monotonic()
        source = Path(os.path.abspath(path))
        kind: Kind = "directory" if is_directory else "file"

        def failed(error: str, *, retryable: bool = False, to: Path | None = None) -> BackupResult:
            return BackupResult(
                ok=False,
                source=source,
                destination=to,
                kind=kind,
                error=error,
                retryable=retryable,
                duration_s=time.monotonic() - started,
            )

        try:
            destination = self.drive_path_for(source)
        except DrivePathError as exc:
            return BackupResult(
                ok=False,
                source=source,
                destination=None,
                kind="skipped",
                error=str(exc),
                duration_s=time.monotonic() - started,
            )
        except ValueError as exc:
            return failed(str(exc))
        problem = await anyio.to_thread.run_sync(source_problem, source, is_directory)
        if problem is not None:
            return failed(problem, to=destination)
        try:
            if is_directory:
                manifest = await anyio.to_thread.run_sync(
                    Manifest.load, self._manifest_path(source)
                )
                outcome = await sync_folder(
                    self._pool,
                    source,
                    destination,
                    manifest,
                    marker=self.drive_root / MARKER_NAME,
                    step_timeout=self.drive_timeout,
                    scratch=self._state_dir / "snapshots",
                    exclude=exclude,
                    mirror=self.mirror,
                    file_concurrency=self.file_concurrency,
                )
                if outcome.failure is not None:
                    error, retryable = self._folder_failure(outcome, source, destination, "writing")
                    return failed(error, retryable=retryable, to=destination)
                if outcome.problems:
                    return failed(
                        f"{len(outcome.problems)} file(s) of {source} could not be copied, "
                        f"first {outcome.problems[0]}; fix them and back up again.",
                        to=destination,
                    )
                result = BackupResult(
                    ok=True,
                    source=source,
                    destination=destination,
                    kind="directory",
                    bytes_copied=outcome.bytes_copied,
                    files_copied=outcome.files_copied,
                    files_unchanged=outcome.files_unchanged,
                    duration_s=time.monotonic() - started,
                )
            else:
                if await anyio.to_thread.run_sync(is_sqlite_file, source):
                    kind = "sqlite"
                async with self._pool.session() as helper:
                    shipped = await ship_path(
                        helper,
                        source,
                        destination,
                        self.drive_timeout,
                        self._state_dir / "snapshots",
                        clean_strays=True,
                    )
                result = BackupResult(
                    ok=True,
                    source=source,
                    destination=destination,
                    kind=kind,
                    bytes_copied=shipped.bytes_copied,
                    files_copied=1,
                    duration_s=time.monotonic() - started,
                )
        except (OSError, DriveTimeout, SnapshotError) as exc:
            error, retryable = explain_failure(exc, source, "writing", destination)
            return failed(error, retryable=retryable, to=destination)
        logger.debug("Backed up %s to %s: %s", source, destination, result)
        return result

    # -- restore ------------------------------------------------------------------------
    async def arestore(self, path: StrPath, is_directory: bool = False) -> BackupResult:
        """Copy the Drive copy of ``path`` back over the local ``path``.

        A database must pass ``PRAGMA integrity_check`` before it replaces anything
        local; each file is replaced atomically. A restored folder is recorded as
        backed up, so the next backup copies nothing.
        """
        started = time.monotonic()
        target = Path(os.path.abspath(path))
        kind: Kind = "directory" if is_directory else "file"

        def failed(
            error: str, *, retryable: bool = False, source: Path | None = None
        ) -> BackupResult:
            return BackupResult(
                ok=False,
                source=source or target,
                destination=target,
                kind=kind,
                error=error,
                retryable=retryable,
                duration_s=time.monotonic() - started,
            )

        try:
            remote = self.drive_path_for(target)
        except DrivePathError as exc:
            return BackupResult(
                ok=False,
                source=target,
                destination=None,
                kind="skipped",
                error=f"{target} is on Google Drive; restore to a local path instead ({exc})",
                duration_s=time.monotonic() - started,
            )
        except ValueError as exc:
            return failed(str(exc))
        missing = (
            f"Google Drive holds no copy of {target} (looked for {remote}); nothing was restored."
        )
        try:
            if is_directory:
                manifest = Manifest(self._manifest_path(target))
                outcome = await restore_folder(
                    self._pool,
                    remote,
                    target,
                    manifest,
                    marker=self.drive_root / MARKER_NAME,
                    step_timeout=self.drive_timeout,
                    file_concurrency=self.file_concurrency,
                )
                if outcome is None:
                    return failed(missing, source=remote)
                if outcome.failure is not None:
                    error, retryable = self._folder_failure(outcome, remote, target, "reading")
                    return failed(error, retryable=retryable, source=remote)
                if outcome.problems:
                    return failed(
                        f"{len(outcome.problems)} file(s) were not restored, first "
                        f"{outcome.problems[0]}; the local copies were left untouched.",
                        source=remote,
                    )
                return BackupResult(
                    ok=True,
                    source=remote,
                    destination=target,
                    kind="directory",
                    bytes_copied=outcome.bytes_copied,
                    files_copied=outcome.files_copied,
                    duration_s=time.monotonic() - started,
                )
            async with self._pool.session() as helper:
                info = await helper.call("stat", str(remote), self.drive_timeout)
                if not info["exists"] or info["is_dir"]:
                    return failed(missing, source=remote)
                nbytes, _ = await fetch_file(helper, remote, target, self.drive_timeout)
            is_db = await anyio.to_thread.run_sync(is_sqlite_file, target)
        except RestoreRefused as exc:
            return failed(
                f"the Drive copy {remote} failed PRAGMA integrity_check ({exc}), so it was not "
                f"restored and {target} was left untouched; restore from another copy.",
                source=remote,
            )
        except (OSError, DriveTimeout) as exc:
            error, retryable = explain_failure(exc, remote, "reading", remote)
            return failed(error, retryable=retryable, source=remote)
        return BackupResult(
            ok=True,
            source=remote,
            destination=target,
            kind="sqlite" if is_db else "file",
            bytes_copied=nbytes,
            files_copied=1,
            duration_s=time.monotonic() - started,
        )

    # -- verify -------------------------------------------------------------------------
    async def averify(self, path: StrPath) -> VerifyResult:
        """Check the Drive copy of ``path`` (or ``path`` itself if it is on Drive).

        Reports existence, size, mtime and, for a database, ``integrity_check`` and the
        Optuna trial counts and study names. A missing copy is ``exists=False`` with no
        error; a Drive that fails or does not answer gives ``error``.
        """
        local = Path(os.path.abspath(path))
        if _is_within(local, self.drive_root) or is_drive_path(local):
            remote = local
        else:
            try:
                remote = self.drive_path_for(local)
            except ValueError as exc:
                return VerifyResult(path=local, exists=False, error=str(exc))
        try:
            async with self._pool.session() as helper:
                info = await helper.call("inspect", str(remote), self.drive_timeout)
        except (OSError, DriveTimeout) as exc:
            message, _ = explain_failure(exc, remote, "checking", remote)
            return VerifyResult(path=remote, exists=False, error=message)
        if not info["exists"]:
            return VerifyResult(path=remote, exists=False)
        error: str | None = None
        if info.get("sqlite_error"):
            error = f"{remote} looks like SQLite but cannot be read: {info['sqlite_error']}"
        elif info.get("is_sqlite") and not info.get("integrity_ok"):
            error = f"{remote} failed PRAGMA integrity_check; do not restore from it"
        return VerifyResult(
            path=remote,
            exists=True,
            size=info.get("size"),
            mtime=info.get("mtime"),
            is_sqlite=bool(info.get("is_sqlite")),
            integrity_ok=info.get("integrity_ok") if info.get("is_sqlite") else None,
            trial_counts=MappingProxyType(dict(info.get("trial_counts", {}))),
            study_names=tuple(info.get("study_names", ())),
            error=error,
        )

    # -- sync faces ---------------------------------------------------------------------
    def backup(
        self, path: StrPath, is_directory: bool = False, *, exclude: Sequence[str] = ()
    ) -> BackupResult:
        """Blocking :meth:`abackup`; also works in a notebook cell (a running event loop)."""
        return _run_blocking(functools.partial(self.abackup, path, is_directory, exclude=exclude))

    def restore(self, path: StrPath, is_directory: bool = False) -> BackupResult:
        """Blocking :meth:`arestore`; also works in a notebook cell (a running event loop)."""
        return _run_blocking(functools.partial(self.arestore, path, is_directory))

    def verify(self, path: StrPath) -> VerifyResult:
        """Blocking :meth:`averify`; also works in a notebook cell (a running event loop)."""
        return _run_blocking(functools.partial(self.averify, path))

    def __call__(self, path: StrPath, is_directory: bool = False) -> BackupResult:
        """Same as :meth:`backup`: a store is a ``backup_to_drive(path, is_directory)``."""
        return self.backup(path, is_directory)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """End idle helper processes (without waiting on them). The store stays usable."""
        self._pool.close()

    async def aclose(self) -> None:
        """Same as :meth:`close`; never blocks."""
        self.close()

    def __enter__(self) -> DriveStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def _folder_failure(
        outcome: FolderOutcome, source: Path, destination: Path, action: str
    ) -> tuple[str, bool]:
        """One sentence for a folder copy that a failed file ended, naming that file."""
        failure = outcome.failure
        assert failure is not None
        if not isinstance(failure, (OSError, DriveTimeout, SnapshotError)):
            raise failure  # a bug, not a Drive or file problem: let it show
        rel = outcome.failed_file
        if rel is None:
            error, retryable = explain_failure(failure, source, action, destination)
        else:
            remote = (destination if action == "writing" else source) / rel
            local = (source if action == "writing" else destination) / rel
            error, retryable = explain_failure(failure, local, action, remote)
        kept = ""
        if outcome.files_copied and action == "writing":
            kept = (
                f" The {outcome.files_copied} other file(s) copied were recorded; the next "
                "backup does not copy them again."
            )
        elif outcome.files_copied:
            kept = f" {outcome.files_copied} other file(s) were restored."
        return f"{error}{kept}", retryable

    def _manifest_path(self, folder: Path) -> Path:
        relative = os.path.relpath(folder, self.local_root)
        return manifest_path(self._state_dir, self.drive_root, relative)


def _run_blocking(func: Callable[[], Awaitable[T]]) -> T:
    """Run ``func()`` to completion: here, or in a helper thread if this thread runs a loop.

    A Jupyter or Colab cell runs inside the kernel's event loop, where ``anyio.run``
    would refuse; a plain script or thread gets the cheaper direct run.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(func)
    return run_blocking(func)


def _is_within(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([path, root]) == str(root)
    except ValueError:
        return False
