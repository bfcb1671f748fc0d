"""DriveStore: back up, restore and verify the studies under a local folder on a Drive folder.

Every path under ``local_root`` maps to the same relative path under ``drive_root``. Each
folder directly under ``local_root`` (a ``study-<hash>`` folder of ``run_sweep``) is one
study on Drive, with its own identity, lease and database history; the files directly
in ``local_root`` form one more. Every Drive-side system call runs in a helper process
with a deadline, so a stalled mount can neither hang the caller nor keep its process
from exiting.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import anyio

from sweepsafe.drive._helper_client import HelperPool
from sweepsafe.drive._messages import explain_failure, source_problem
from sweepsafe.drive._operations import (
    _EXPECTED,
    backup_database,
    backup_files,
    combined_result,
    restore_path,
    with_duration,
)
from sweepsafe.drive._reading import generations_of, verify_database
from sweepsafe.drive._reserved_names import STATE_DIR_NAME
from sweepsafe.drive._results import BackupResult, GenerationInfo, Kind, VerifyResult
from sweepsafe.drive._sqlite_inspect import is_sqlite_file
from sweepsafe.drive._store_config import _check_roots, check_drive_mounted, check_options
from sweepsafe.drive._store_sync import BlockingFaces
from sweepsafe.drive._store_units import (
    StudyFolders,
    claim_lease,
    release_leases,
    renew_leases,
    take_lease,
    try_lease,
)
from sweepsafe.drive._unit import StoreSettings, StudyUnit
from sweepsafe.errors import DrivePathError
from sweepsafe.paths import COLAB_DRIVE_MOUNT, is_drive_path, is_within

__all__ = ["DriveStore"]

logger = logging.getLogger("sweepsafe.drive")

StrPath = str | os.PathLike[str]


class DriveStore(StudyFolders, BlockingFaces):
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
        check_options(file_concurrency, keep_generations)
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
        check_drive_mounted(my_drive, mount_point, timeout)
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
        copy on Drive up to date, and waits for a file being rewritten to ship its newest
        version. Cancelling leaves the previous Drive copy in place.
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
                    unit, source, destination, is_directory, exclude, self.mirror, final
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
        return combined_result(results, self.local_root, self.drive_root)

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
        database = generation is not None or before is not None
        unit = await anyio.to_thread.run_sync(self._unit_to_restore, target, is_directory, database)
        result = await restore_path(
            unit, self._pool, self.drive_timeout, remote, target, is_directory, generation, before
        )
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
        unit = self._study_unit(study_dir)
        await take_lease(unit, self._pool, takeover=takeover, shared=shared)

    async def aclaim(self, study_dir: StrPath) -> None:
        """Check that no other runtime holds the study's lease; the first backup takes it.

        What a sweep does as it starts, so that it never waits for a Drive write: the
        check only reads. Should another runtime take the study before this runtime's
        first backup lands, that backup fails and :meth:`lease_refused` says why; the
        sweep's callbacks then stop the sweep.

        Raises:
            LeaseHeldError: another runtime holds a live lease.
            OSError, DriveTimeout: Drive failed or did not answer.
        """
        unit = self._study_unit(study_dir)
        await claim_lease(unit, self._pool)

    def lease_refused(self, study_dir: StrPath) -> str | None:
        """Why the study's first backup could not take the lease :meth:`aclaim` found
        free (another runtime took the study first), else None. Does no I/O."""
        try:
            unit = self._known_unit(study_dir)
        except ValueError:
            return None  # not a folder of this store
        return None if unit is None else unit.refused

    async def aholds(self, study_dir: StrPath, *, take: bool = False) -> bool:
        """Whether this runtime holds the study's lease; with ``take``, try to take it first.

        Never raises for a lease another runtime holds; Drive failing is logged and read
        as not holding it.
        """
        unit = self._study_unit(study_dir)
        if take and not await try_lease(unit, self._pool):
            return False
        return unit.holds_lease

    async def arenew(self) -> None:
        """Renew every lease this store holds; called periodically by the backup worker.

        A lease another runtime took over is marked lost: that study's backups stop with
        a sentence naming the other runtime. Never raises.
        """
        await renew_leases(list(self._units.values()), self._pool)

    async def arelease(self, study_dir: StrPath | None = None) -> None:
        """Give back this runtime's lease on a study (or on every study), so that the next
        runtime may start at once. Never raises; a Drive that fails is logged."""
        units = (
            list(self._units.values())
            if study_dir is None
            else [self._unit_for(Path(os.path.abspath(study_dir)), True, study=True)]
        )
        await release_leases(units, self._pool)

    def study_folder_of(self, path: StrPath, is_directory: bool = False) -> Path:
        """The study folder ``path`` belongs to: the one whose identity and lease it shares."""
        return self._unit_for(Path(os.path.abspath(path)), is_directory).local

    # -- sync faces: the store as a callable (the others come from BlockingFaces) -----------
    def __call__(self, path: StrPath, is_directory: bool = False) -> BackupResult:
        """Same as :meth:`backup`: a store is a ``backup_to_drive(path, is_directory)``."""
        return self.backup(path, is_directory)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """End idle helper processes (without waiting on them), and remove the spare
        versions of large files kept on the local disk. The store stays usable."""
        self._pool.close()
        with self._units_lock:
            units = list(self._units.values())
        for unit in units:
            unit.spares.drop_all()

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
