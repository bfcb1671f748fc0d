"""DriveStore: back up, restore and verify the studies under a local folder on a Drive folder.

Every path under ``local_root`` maps to the same relative path under ``drive_root``. Each
folder directly under ``local_root`` (a ``study-<hash>`` folder of ``run_sweep``) is one
study on Drive, with its own identity, lease and database history; the files directly
in ``local_root`` form one more. Every Drive-side system call runs in a helper process
with a deadline, so a stalled mount can neither hang the caller nor keep its process
from exiting.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio

from sweepsafe._blocking import run_blocking
from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.drive._helper_client import HelperPool
from sweepsafe.drive._messages import explain_failure, source_problem
from sweepsafe.drive._operations import (
    adopt_drive_identity,
    backup_database,
    backup_files,
    restore_database_result,
    restore_file_result,
    restore_folder_result,
    with_duration,
)
from sweepsafe.drive._reading import generations_of, path_kind, verify_database
from sweepsafe.drive._reserved_names import STATE_DIR_NAME
from sweepsafe.drive._restore import RestoreRefused
from sweepsafe.drive._results import BackupResult, GenerationInfo, Kind, VerifyResult
from sweepsafe.drive._sqlite import SnapshotError
from sweepsafe.drive._sqlite_inspect import is_sqlite_file
from sweepsafe.drive._unit import StoreSettings, StudyUnit, TrialFilesHeldBack
from sweepsafe.errors import (
    DriveNotMountedError,
    DrivePathError,
    LeaseHeldError,
    StudyConflictError,
)
from sweepsafe.paths import COLAB_DRIVE_MOUNT, is_drive_path, is_within

__all__ = ["DriveStore"]

logger = logging.getLogger("sweepsafe.drive")

StrPath = str | os.PathLike[str]
T = TypeVar("T")
STUDY_DB_NAME = "study.db"
_EXPECTED = (
    OSError,
    DriveTimeout,
    SnapshotError,
    LeaseHeldError,
    StudyConflictError,
    TrialFilesHeldBack,
)


class DriveStore:
    """Copies the studies under ``local_root`` to the same place under ``drive_root``, and back.

    Thread-safe and usable from any event loop: the async methods may run concurrently
    from several loops and threads; the sync ones (``backup``, ``restore``, ``verify``,
    and calling the store) block the calling thread, in a notebook cell too. Expected
    failures never raise: they come back as a result with ``ok`` false and an ``error``
    sentence.

    Args:
        local_root: local folder whose contents are backed up (not on Drive).
        drive_root: Drive folder that receives the copies; created on first backup.
        drive_timeout: seconds each Drive-side step may take before the store gives up
            on it and abandons the helper process doing it.
        mirror: delete from Drive the files of a backed-up folder deleted locally.
        file_concurrency: how many files are copied at once (each by its own helper
            process); Drive's latency per file then overlaps across files.
        lease_timeout: seconds after its last heartbeat when another runtime's lease on a
            study may be taken over without ``takeover``.
        keep_generations: whole database snapshots kept on Drive, thinned by age.
        compact_fraction: a new whole base is written once the patches since the last
            one add up to this fraction of the database (and at the end of each sweep).
        trial_folder: where a trial's files live, relative to its database's folder; a
            database is published only after its new trials' folders reached Drive.
        helper_command: the command that starts a helper process; a stand-in Drive for
            tests comes from :mod:`sweepsafe.testing`.
        clock: wall-clock time, for leases and history (tests pass their own).

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
        file_concurrency: int = 16,
        lease_timeout: float = 120.0,
        keep_generations: int = 10,
        compact_fraction: float = 1.0,
        trial_folder: str = "trials/trial-{number:05d}",
        helper_command: Sequence[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.local_root = Path(os.path.abspath(local_root))
        self.drive_root = Path(os.path.abspath(drive_root))
        _check_roots(self.local_root, self.drive_root)
        if file_concurrency < 1:
            raise ValueError(f"file_concurrency must be at least 1, not {file_concurrency}")
        if keep_generations < 1:
            raise ValueError(f"keep_generations must be at least 1, not {keep_generations}")
        self.drive_timeout = drive_timeout
        self.lease_timeout = lease_timeout
        self.mirror = mirror
        self.file_concurrency = file_concurrency
        # Folders are created on Drive only below this one, which must exist: with
        # Drive unmounted, its mount point is a plain local folder.
        self._pool = HelperPool(helper_command, anchor=str(self.drive_root.parent))
        self._settings = StoreSettings(
            pool=self._pool,
            local_root=self.local_root,
            drive_root=self.drive_root,
            timeout=drive_timeout,
            file_concurrency=file_concurrency,
            lease_timeout=lease_timeout,
            keep_generations=keep_generations,
            compact_fraction=compact_fraction,
            trial_folder=trial_folder,
            clock=clock,
        )
        self._units: dict[str, StudyUnit] = {}
        self._units_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, self._pool.close)

    @classmethod
    def for_colab(
        cls,
        local_root: StrPath,
        drive_subdir: str = "sweepsafe",
        *,
        mount_point: StrPath = COLAB_DRIVE_MOUNT,
        **options: object,
    ) -> DriveStore:
        """A store whose Drive root is ``{mount_point}/MyDrive/{drive_subdir}``.

        ``options`` are those of the constructor.

        Raises:
            DriveNotMountedError: ``{mount_point}/MyDrive`` is not a folder.
        """
        my_drive = Path(os.path.abspath(mount_point)) / "MyDrive"
        timeout = float(options.get("drive_timeout", 120.0))  # type: ignore[arg-type]
        try:
            # Asked of a helper: a stalled mount must not hang the notebook cell.
            kind = run_blocking(lambda: path_kind(my_drive, timeout=min(timeout, 30.0)))
        except DriveTimeout as exc:
            raise DriveNotMountedError(
                f"Google Drive does not answer: {my_drive} could not be read within "
                f"{exc.timeout:g} s. Remount it with drive.mount('{mount_point}', "
                "force_remount=True)."
            ) from None
        if kind != "dir":
            raise DriveNotMountedError(
                f"Google Drive is not mounted: {my_drive} is not a folder. In Colab run "
                f"`from google.colab import drive; drive.mount('{mount_point}')` first."
            )
        store = cls(local_root, my_drive / drive_subdir, **options)  # type: ignore[arg-type]
        store._pool.anchor = str(my_drive)
        return store

    def __repr__(self) -> str:
        return f"DriveStore({str(self.local_root)!r}, {str(self.drive_root)!r})"

    # -- paths ------------------------------------------------------------------------------
    def drive_path_for(self, path: StrPath) -> Path:
        """Where the Drive copy of the local ``path`` lives.

        Raises:
            DrivePathError: ``path`` is already on Google Drive.
            ValueError: ``path`` is not under ``local_root``.
        """
        local = Path(os.path.abspath(path))
        if is_within(local, self.drive_root) or is_drive_path(local):
            raise DrivePathError(
                f"{local} is already on Google Drive, so nothing needs backing up."
            )
        if not is_within(local, self.local_root):
            raise ValueError(
                f"{local} is not inside the store's local root {self.local_root}; back up "
                "paths under it, or use a DriveStore whose local_root contains it."
            )
        return self.drive_root / local.relative_to(self.local_root)

    def _unit_for(self, path: Path, is_directory: bool, *, study: bool = False) -> StudyUnit:
        """The study folder ``path`` belongs to (``study``: ``path`` is one).

        A study folder is one this store was told of (a lease taken on it, a database
        backed up or restored in it), else the nearest folder holding a ``study.db``, else
        the folder directly under the local root (the root itself for files in it).
        Blocking: it may ``stat`` a few local folders.
        """
        if study:
            return self._unit(path.relative_to(self.local_root).as_posix())
        with self._units_lock:
            known = [rel for rel in self._units if self._units[rel].registered]
        start = path if is_directory else path.parent
        for folder in (start, *start.parents):
            if not is_within(folder, self.local_root):
                break
            rel = folder.relative_to(self.local_root).as_posix()
            rel = "" if rel == "." else rel
            if rel in known or (folder / STUDY_DB_NAME).is_file():
                return self._unit(rel)
            if folder == self.local_root:
                break
        parts = path.relative_to(self.local_root).parts
        return self._unit(parts[0] if len(parts) > 1 or (parts and is_directory) else "")

    def _unit(self, rel: str, *, register: bool = False) -> StudyUnit:
        rel = "" if rel == "." else rel
        with self._units_lock:
            unit = self._units.get(rel)
            if unit is None:
                unit = self._units[rel] = StudyUnit(self._settings, rel)
            unit.registered = unit.registered or register
            return unit

    # -- backup -----------------------------------------------------------------------------
    async def abackup(
        self,
        path: StrPath,
        is_directory: bool = False,
        *,
        exclude: Sequence[str] = (),
        final: bool = False,
    ) -> BackupResult:
        """Copy ``path`` (a file, or with ``is_directory`` a folder) to Drive.

        A study database goes as a checked snapshot that never replaces a Drive copy
        holding finished trials it lacks, after the files of its new trials; a folder
        only for the files changed since its last backup (``exclude``: fnmatch patterns
        relative to it). ``final`` (the end of a sweep) also brings the plain database
        copy on Drive up to date. Cancelling leaves the previous Drive copy in place.
        """
        started = time.monotonic()
        source = Path(os.path.abspath(path))
        kind: Kind = "directory" if is_directory else "file"
        try:
            destination = self.drive_path_for(source)
        except DrivePathError as exc:
            return BackupResult(False, source, None, "skipped", error=str(exc))
        except ValueError as exc:
            return BackupResult(False, source, None, kind, error=str(exc))
        problem = await anyio.to_thread.run_sync(source_problem, source, is_directory)
        if problem is not None:
            return BackupResult(False, source, destination, kind, error=problem)
        if source.name == STATE_DIR_NAME or source == self.local_root / STATE_DIR_NAME:
            return BackupResult(
                True, source, destination, "skipped", notes=("sweepsafe's own records",)
            )
        is_database = not is_directory and await anyio.to_thread.run_sync(
            is_sqlite_file, str(source)
        )
        if is_database:
            unit = self._unit(source.parent.relative_to(self.local_root).as_posix(), register=True)
        else:
            unit = await anyio.to_thread.run_sync(self._unit_for, source, is_directory)
        try:
            if is_database:
                kind = "sqlite"
                result = await backup_database(unit, source, destination, final)
            elif is_directory and source == self.local_root:
                result = await self._backup_root(exclude, final)
            else:
                result = await backup_files(
                    unit, source, destination, is_directory, exclude, self.mirror
                )
        except _EXPECTED as exc:
            error, retryable = explain_failure(exc, source, "writing", destination)
            result = BackupResult(
                False, source, destination, kind, error=error, retryable=retryable
            )
        result = with_duration(result, time.monotonic() - started)
        logger.debug("Backed up %s to %s: %s", source, destination, result)
        return result

    async def _backup_root(self, exclude: Sequence[str], final: bool) -> BackupResult:
        """The whole local root: each study folder, and the files beside them."""
        results: list[BackupResult] = []
        entries = await anyio.to_thread.run_sync(lambda: sorted(self.local_root.iterdir()))
        for entry in entries:
            if entry.name == STATE_DIR_NAME:
                continue
            results.append(await self.abackup(entry, entry.is_dir(), exclude=exclude, final=final))
        failed = [r for r in results if not r.ok and r.kind != "skipped"]
        return BackupResult(
            not failed,
            self.local_root,
            self.drive_root,
            "directory",
            bytes_copied=sum(r.bytes_copied for r in results),
            files_copied=sum(r.files_copied for r in results),
            files_unchanged=sum(r.files_unchanged for r in results),
            error="; ".join(r.error or "" for r in failed) or None,
            retryable=any(r.retryable for r in failed),
            problems=tuple(p for r in results for p in r.problems),
            skipped=tuple(s for r in results for s in r.skipped),
        )

    # -- restore ----------------------------------------------------------------------------
    async def arestore(
        self,
        path: StrPath,
        is_directory: bool = False,
        *,
        generation: int | None = None,
        before: float | None = None,
    ) -> BackupResult:
        """Bring the Drive copy of ``path`` back over the local ``path``, checked.

        A database is restored only if it is a sound Optuna study holding every finished
        trial the local one holds (``generation`` or ``before``, seconds since the epoch,
        pick an older generation on purpose: the local database is then set aside).
        An older generation brought back becomes Drive's newest again, as a new
        generation (the later ones stay in the history), so calling this before
        :func:`~sweepsafe.run_sweep` resumes the sweep from that generation; it needs the
        study's lease, so no other runtime may be backing the study up.
        A folder's files replace only local files still as last backed up; local files
        changed since are kept and named.
        """
        started = time.monotonic()
        target = Path(os.path.abspath(path))
        kind: Kind = "directory" if is_directory else "file"
        try:
            remote = self.drive_path_for(target)
        except DrivePathError as exc:
            return BackupResult(
                False, target, None, "skipped", error=f"{exc} Restore to a local path."
            )
        except ValueError as exc:
            return BackupResult(False, target, target, kind, error=str(exc))
        unit = await anyio.to_thread.run_sync(self._unit_for, target, is_directory)
        try:
            await unit.load()
            async with self._pool.session() as helper:
                await adopt_drive_identity(unit, helper)
                info = await helper.stat(remote, self.drive_timeout)
            if is_directory:
                result = await restore_folder_result(unit, remote, target)
            elif (
                generation is not None
                or before is not None
                or not info["exists"]
                or (info.get("kind") == "file" and remote.suffix in (".db", ".sqlite", ".sqlite3"))
            ):
                result = await restore_database_result(unit, remote, target, generation, before)
            else:
                result = await restore_file_result(unit, remote, target)
        except RestoreRefused as exc:
            result = BackupResult(
                False,
                remote,
                target,
                kind,
                error=f"{exc}; nothing local was replaced.",
                reason="diverged" if exc.diverged else "refused",
            )
        except _EXPECTED as exc:
            error, retryable = explain_failure(exc, target, "reading", remote)
            result = BackupResult(False, remote, target, kind, error=error, retryable=retryable)
        return with_duration(result, time.monotonic() - started)

    # -- verify, history --------------------------------------------------------------------
    async def averify(self, path: StrPath) -> VerifyResult:
        """Check the Drive copy of ``path`` (or ``path`` itself if it is on Drive).

        Reports existence, size and mtime; for a database its integrity, its Optuna
        studies, the generation the plain copy holds and the newest one, and finished
        trials whose files are not on Drive. A missing copy is ``exists=False`` with no
        error; a Drive that fails or does not answer gives ``error``.
        """
        local = Path(os.path.abspath(path))
        if is_within(local, self.drive_root) or is_drive_path(local):
            remote = local
        else:
            try:
                remote = self.drive_path_for(local)
            except ValueError as exc:
                return VerifyResult(path=local, exists=False, error=str(exc))
        return await verify_database(self._pool, remote, self.drive_timeout)

    async def ahistory(self, path: StrPath) -> list[GenerationInfo]:
        """The generations of a database kept on Drive, newest first.

        Raises:
            OSError, DriveTimeout: Drive failed or did not answer.
        """
        local = Path(os.path.abspath(path))
        remote = local if is_within(local, self.drive_root) else self.drive_path_for(local)
        return await generations_of(self._pool, remote, self.drive_timeout)

    # -- the lease --------------------------------------------------------------------------
    async def aacquire(
        self, study_dir: StrPath, *, takeover: bool = False, shared: bool = False
    ) -> None:
        """Make this runtime the one writer of a study's Drive copy (see ``lease_timeout``).

        ``shared``: the study is shared by several workers through a database server.
        Each copies its own trials' files without the lease; the lease only says who
        exports the database. Taking it is then tried, and a live holder is not an error.

        Raises:
            LeaseHeldError: another runtime holds a live lease (not ``shared``, not
                ``takeover``).
            OSError, DriveTimeout: Drive failed or did not answer.
        """
        unit = self._unit(
            Path(os.path.abspath(study_dir)).relative_to(self.local_root).as_posix(), register=True
        )
        unit.shared = unit.shared or shared
        await unit.load()
        async with self._pool.session() as helper:
            try:
                await unit.ensure_lease(helper, takeover=takeover)
            except LeaseHeldError:
                if not shared:
                    raise

    async def aholds(self, study_dir: StrPath, *, take: bool = False) -> bool:
        """Whether this runtime holds the study's lease; with ``take``, try to take it first.

        Never raises for a lease another runtime holds; Drive failing is logged and read
        as not holding it.
        """
        unit = self._unit(
            Path(os.path.abspath(study_dir)).relative_to(self.local_root).as_posix(), register=True
        )
        if take:
            await unit.load()
            try:
                async with self._pool.session() as helper:
                    await unit.ensure_lease(helper)
            except LeaseHeldError:
                return False
            except (OSError, DriveTimeout) as exc:
                logger.warning("Could not take the lease on %s: %s", unit.drive, exc)
                return False
        return unit.holds_lease

    async def arenew(self) -> None:
        """Renew every lease this store holds; called periodically by the backup worker.

        A lease another runtime took over is marked lost: that study's backups stop with
        a sentence naming the other runtime. Never raises.
        """
        for unit in list(self._units.values()):
            if not unit.holds_lease:
                continue
            try:
                async with self._pool.session() as helper:
                    await unit.ensure_lease(helper)
            except LeaseHeldError as exc:
                # Expected in a shared study (another worker exports now); said once
                # where a single runtime was taken over.
                (logger.info if unit.shared else logger.warning)(
                    "Could not renew the lease on %s: %s", unit.drive, exc
                )
            except (OSError, DriveTimeout) as exc:
                logger.warning("Could not renew the lease on %s: %s", unit.drive, exc)

    async def arelease(self, study_dir: StrPath | None = None) -> None:
        """Give back this runtime's lease on a study (or on every study), so that the next
        runtime may start at once. Never raises; a Drive that fails is logged."""
        units = (
            list(self._units.values())
            if study_dir is None
            else [self._unit_for(Path(os.path.abspath(study_dir)), True, study=True)]
        )
        for unit in units:
            try:
                async with self._pool.session() as helper:
                    await unit.release(helper)
            except (OSError, DriveTimeout) as exc:
                logger.warning("Could not release the lease on %s: %s", unit.drive, exc)

    def study_folder_of(self, path: StrPath, is_directory: bool = False) -> Path:
        """The study folder ``path`` belongs to: the one whose identity and lease it shares."""
        return self._unit_for(Path(os.path.abspath(path)), is_directory).local

    # -- sync faces -------------------------------------------------------------------------
    def acquire(self, study_dir: StrPath, *, takeover: bool = False) -> None:
        """Blocking :meth:`aacquire`."""
        _run(functools.partial(self.aacquire, study_dir, takeover=takeover))

    def release(self, study_dir: StrPath | None = None) -> None:
        """Blocking :meth:`arelease`."""
        _run(functools.partial(self.arelease, study_dir))

    def backup(
        self,
        path: StrPath,
        is_directory: bool = False,
        *,
        exclude: Sequence[str] = (),
        final: bool = False,
    ) -> BackupResult:
        """Blocking :meth:`abackup`; also works in a notebook cell (a running event loop)."""
        return _run(
            functools.partial(self.abackup, path, is_directory, exclude=exclude, final=final)
        )

    def restore(
        self,
        path: StrPath,
        is_directory: bool = False,
        *,
        generation: int | None = None,
        before: float | None = None,
    ) -> BackupResult:
        """Blocking :meth:`arestore`; also works in a notebook cell (a running event loop)."""
        return _run(
            functools.partial(
                self.arestore, path, is_directory, generation=generation, before=before
            )
        )

    def verify(self, path: StrPath) -> VerifyResult:
        """Blocking :meth:`averify`; also works in a notebook cell (a running event loop)."""
        return _run(functools.partial(self.averify, path))

    def history(self, path: StrPath) -> list[GenerationInfo]:
        """Blocking :meth:`ahistory`."""
        return _run(functools.partial(self.ahistory, path))

    def __call__(self, path: StrPath, is_directory: bool = False) -> BackupResult:
        """Same as :meth:`backup`: a store is a ``backup_to_drive(path, is_directory)``."""
        return self.backup(path, is_directory)

    # -- lifetime ---------------------------------------------------------------------------
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


def _run(func: Callable[[], Awaitable[T]]) -> T:
    return run_blocking(func)


def _check_roots(local_root: Path, drive_root: Path) -> None:
    if is_drive_path(local_root):
        raise DrivePathError(
            f"local_root {local_root} is on Google Drive; SQLite on a Drive mount is slow and "
            "unsafe (no reliable locking), so keep the sweep on local disk (e.g. /content/out) "
            "and give the Drive folder as drive_root."
        )
    if is_within(drive_root, local_root) or is_within(local_root, drive_root):
        raise DrivePathError(
            f"the Drive folder {drive_root} and the local folder {local_root} overlap; the "
            "Drive copy must be outside the folder it backs up, and the other way round."
        )
