"""Backup policy for Optuna: the per-trial callbacks and the end-of-sweep backup.

The callbacks only hand a job to a :class:`~sweepsafe.worker.BackupWorker`; every byte
is moved on the worker's background loop, so a trial never waits for Drive.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from sweepsafe._blocking import run_blocking
from sweepsafe.drive import DriveStore, VerifyResult
from sweepsafe.errors import BackupFailed, StudyNotFoundError
from sweepsafe.paths import is_drive_path
from sweepsafe.worker import BackupWorker, TargetReport, get_default_worker

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial

__all__ = [
    "STUDY_DB_NAME",
    "TRIALS_DIR_NAME",
    "BackupProgress",
    "StudyBackupReport",
    "backup_hpo_study_to_drive",
    "create_incremental_backup_callback",
    "create_study_db_backup_callback",
    "find_study_dir",
    "submit_initial_backup",
]

logger = logging.getLogger(__name__)

STUDY_DB_NAME = "study.db"
TRIALS_DIR_NAME = "trials"

BackupToDrive = Callable[[Path, bool], Any]
"""``backup_to_drive(path, is_directory)``: returns a truthy value, ``None`` or a
``BackupResult`` on success; sync or async. A :class:`DriveStore` is one."""

OptunaCallback = Callable[["Study", "FrozenTrial"], None]

# SQLite's companions of a database; a snapshot of the database already holds their content.
_SQLITE_SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")


class BackupProgress:
    """How far the Drive copy of ``study.db`` is behind the local study.

    Thread-safe: the callbacks update it from trial threads, the worker's loop from its
    own thread, and a progress display may read it at any time.
    """

    def __init__(self, trials_finished: int = 0) -> None:
        self._lock = threading.Lock()
        self._finished = trials_finished
        self._backed_up = 0

    @property
    def trials_finished(self) -> int:
        """Trials the callbacks have seen finish (plus those the study had at the start)."""
        with self._lock:
            return self._finished

    @property
    def trials_backed_up(self) -> int:
        """Trials that the newest Drive copy of ``study.db`` is known to hold, at least."""
        with self._lock:
            return self._backed_up

    @property
    def lag(self) -> int:
        """Finished trials not yet known to be in the Drive copy."""
        with self._lock:
            return max(0, self._finished - self._backed_up)

    def _start(self, *, trials_finished: int, trials_backed_up: int) -> None:
        with self._lock:
            self._finished = trials_finished
            self._backed_up = trials_backed_up

    def _trial_finished(self) -> None:
        with self._lock:
            self._finished += 1

    def _copy_succeeded(self, trials_in_copy: int) -> None:
        with self._lock:
            self._backed_up = max(self._backed_up, trials_in_copy)


class _NoBackup:
    """The callback used when backups are off: it does nothing."""

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        return None

    def __repr__(self) -> str:
        return "<sweepsafe callback: backups off>"


class _SubmitBackup:
    """An Optuna callback that hands ``target`` to the worker: no I/O, never raises."""

    def __init__(
        self,
        target: Path,
        job: Callable[[Path, bool], Awaitable[object]],
        is_directory: bool,
        worker: BackupWorker,
        progress: BackupProgress | None,
    ) -> None:
        self._target = target
        self._job = job
        self._is_directory = is_directory
        self._worker = worker
        self._progress = progress
        self._warned = False

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        if self._progress is not None:
            self._progress._trial_finished()
        try:
            self._worker.submit(self._target, self._job, is_directory=self._is_directory)
        except Exception as exc:  # noqa: BLE001 - an exception here would abort study.optimize
            if not self._warned:
                self._warned = True
                logger.warning("Could not schedule a backup of %s: %s", self._target, exc)

    def __repr__(self) -> str:
        return f"<sweepsafe callback: back up {self._target}>"


def create_incremental_backup_callback(
    target_path: str | os.PathLike[str],
    backup_to_drive: BackupToDrive | None,
    backup_enabled: bool = True,
    is_directory: bool = False,
    *,
    worker: BackupWorker | None = None,
    progress: BackupProgress | None = None,
) -> OptunaCallback:
    """Make an Optuna callback that schedules a backup of ``target_path`` after each trial.

    The callback only submits the target to the worker (the process-wide default
    worker unless one is given): it does no I/O on the trial's thread and never raises
    into Optuna. Submits that arrive while a copy of the same target is waiting are
    coalesced, so a slow Drive gets one copy per copy-time, not one per trial.

    Args:
        target_path: the local file or folder to back up.
        backup_to_drive: ``(path, is_directory) -> bool`` (sync or async), such as a
            :class:`DriveStore`; ``None`` turns backups off.
        backup_enabled: False turns backups off.
        is_directory: back up a folder (incrementally, with a ``DriveStore``).
        worker: the worker that runs the copies.
        progress: updated with the trials seen and the trials known to be on Drive.

    Example:
        >>> store = DriveStore("/content/out", "/content/drive/MyDrive/out")  # doctest: +SKIP
        >>> cb = create_incremental_backup_callback("/content/out/trials", store,
        ...                                          is_directory=True)  # doctest: +SKIP
        >>> study.optimize(objective, n_trials=100, callbacks=[cb])  # doctest: +SKIP
    """
    if not backup_enabled or backup_to_drive is None:
        return _NoBackup()
    target = Path(os.path.abspath(target_path))
    if is_drive_path(target):
        logger.info(
            "%s is already on Google Drive, so there is nothing to back up; "
            "its per-trial backup is off.",
            target,
        )
        return _NoBackup()
    job = _backup_job(backup_to_drive, target, progress)
    return _SubmitBackup(target, job, is_directory, worker or get_default_worker(), progress)


def create_study_db_backup_callback(
    storage_path: str | os.PathLike[str],
    backup_to_drive: BackupToDrive | None,
    backup_enabled: bool = True,
    *,
    worker: BackupWorker | None = None,
    progress: BackupProgress | None = None,
) -> OptunaCallback:
    """Make an Optuna callback that schedules a backup of the study's SQLite database.

    The same as :func:`create_incremental_backup_callback` for ``study.db``; with a
    :class:`DriveStore` each copy is a consistent, integrity-checked snapshot.
    """
    return create_incremental_backup_callback(
        storage_path,
        backup_to_drive,
        backup_enabled,
        is_directory=False,
        worker=worker,
        progress=progress,
    )


def submit_initial_backup(
    storage_path: str | os.PathLike[str],
    backup_to_drive: BackupToDrive,
    *,
    worker: BackupWorker | None = None,
    progress: BackupProgress | None = None,
) -> None:
    """Schedule a backup of ``study.db`` right away, without waiting for it.

    Called as soon as the study exists, so that a runtime dying during the first trial
    still leaves a Drive copy. The outcome is logged when the copy completes.
    """
    target = Path(os.path.abspath(storage_path))
    if is_drive_path(target):
        return
    job = _backup_job(backup_to_drive, target, progress, announce=True)
    (worker or get_default_worker()).submit(target, job, is_directory=False)


def _backup_job(
    backup_to_drive: BackupToDrive,
    target: Path,
    progress: BackupProgress | None,
    *,
    announce: bool = False,
) -> Callable[[Path, bool], Awaitable[object]]:
    """Wrap ``backup_to_drive`` into the async job the worker runs on its loop."""
    if isinstance(backup_to_drive, DriveStore):
        # The store's async face runs on the worker's loop without taking a thread.
        call: BackupToDrive = backup_to_drive.abackup
    else:
        call = backup_to_drive

    async def run_backup(path: Path, is_directory: bool) -> object:
        trials_at_start = progress.trials_finished if progress is not None else 0
        result = await _call_backup(call, path, is_directory)
        succeeded = result is None or bool(result)
        if succeeded and progress is not None and path == target:
            progress._copy_succeeded(trials_at_start)
        if announce:
            if succeeded:
                logger.info("First backup of %s reached Drive.", path)
            else:
                logger.warning(
                    "First backup of %s did not reach Drive: %s",
                    path,
                    getattr(result, "error", None) or "the backup callable returned False",
                )
        return result

    return run_backup


async def _call_backup(call: BackupToDrive, path: Path, is_directory: bool) -> object:
    if inspect.iscoroutinefunction(call):
        return await call(path, is_directory)
    result = await anyio.to_thread.run_sync(call, path, is_directory)
    if inspect.isawaitable(result):
        return await result
    return result


@dataclass(frozen=True)
class StudyBackupReport:
    """What the end-of-sweep backup did and what the Drive copy holds."""

    study_dir: Path
    """The study folder that was backed up (or verified, when it lives on Drive)."""
    on_drive: bool
    """True when the study lives on Drive itself: it was only verified, nothing copied."""
    targets: tuple[TargetReport, ...] = ()
    """One entry per local target copied (``study.db``, ``trials/``, ...)."""
    verification: VerifyResult | None = None
    """The Drive copy of ``study.db`` (or the Drive ``study.db`` itself), when checked."""
    timed_out: bool = False
    duration_s: float = 0.0
    error: str | None = None
    """Why the backup could not even start (no Drive store, a Drive mount not answering)."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when every target reached Drive and the Drive database is sound."""
        if self.error is not None or self.timed_out:
            return False
        if any(not target.ok for target in self.targets):
            return False
        return self.verification is None or self.verification.ok

    @property
    def trial_counts(self) -> Mapping[str, int]:
        """Trials per state in the Drive copy of the database (empty if not verified)."""
        return self.verification.trial_counts if self.verification is not None else {}

    @property
    def failed(self) -> tuple[TargetReport, ...]:
        """The targets whose latest backup failed or had not finished in time."""
        return tuple(target for target in self.targets if not target.ok)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        lines: list[str] = []
        if self.error is not None:
            lines.append(f"Backup of {self.study_dir} failed: {self.error}")
        if self.on_drive:
            lines.append(f"{self.study_dir} lives on Google Drive; verified only, nothing copied.")
        for target in self.targets:
            lines.append(_describe_target(target))
        if self.timed_out:
            lines.append(f"The backup did not finish within {self.duration_s:.0f} s.")
        if self.verification is not None:
            lines.append(_describe_verification(self.verification))
        lines.extend(self.notes)
        verdict = "Drive copy complete" if self.ok else "Drive copy INCOMPLETE"
        return f"{verdict} ({self.duration_s:.1f} s)\n" + "\n".join(f"  {line}" for line in lines)

    def raise_for_failures(self) -> None:
        """Raise :class:`BackupFailed` naming what is not on Drive, if anything."""
        if not self.ok:
            raise BackupFailed(str(self))


def _describe_target(target: TargetReport) -> str:
    if target.ok:
        result = target.last_result
        copied = getattr(result, "bytes_copied", None)
        files = getattr(result, "files_copied", None)
        detail = ""
        if copied is not None:
            detail = f": {copied / 1e6:.1f} MB"
            if target.is_directory and files is not None:
                detail += f" in {files} changed files"
        return f"{target.target} backed up{detail}"
    if target.pending:
        return f"{target.target} NOT backed up: still pending when the wait ended"
    return f"{target.target} NOT backed up: {target.last_error or 'the backup failed'}"


def _describe_verification(verification: VerifyResult) -> str:
    if not verification.exists:
        return f"Drive copy {verification.path} does not exist"
    if verification.error is not None:
        return f"Drive copy {verification.path}: {verification.error}"
    counts = ", ".join(
        f"{count} {state}" for state, count in sorted(verification.trial_counts.items())
    )
    integrity = "integrity ok" if verification.integrity_ok else "FAILED integrity check"
    trials = (
        f"{sum(verification.trial_counts.values())} trials ({counts})" if counts else "no trials"
    )
    return f"Drive copy {verification.path}: {trials}, {integrity}"


def find_study_dir(
    backbone_output_dir: str | os.PathLike[str], study_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Find the canonical study folder under ``backbone_output_dir``.

    The ``study_dir`` given wins; else the only ``study-*`` folder holding a
    ``study.db``; else, of several, the one whose ``study.db`` changed last (logged).

    Raises:
        StudyNotFoundError: no study folder is there.
    """
    if study_dir is not None:
        found = Path(os.path.abspath(study_dir))
        if not (found / STUDY_DB_NAME).is_file():
            raise StudyNotFoundError(
                f"{found} holds no {STUDY_DB_NAME}; pass the folder that run_sweep created "
                "(OUTPUT_DIR/study-<hash>)."
            )
        return found
    root = Path(os.path.abspath(backbone_output_dir))
    candidates = sorted(
        (path for path in root.glob("study-*") if (path / STUDY_DB_NAME).is_file()),
        key=lambda path: (path / STUDY_DB_NAME).stat().st_mtime_ns,
    )
    if not candidates:
        raise StudyNotFoundError(
            f"No study folder (study-*/{STUDY_DB_NAME}) in {root}; "
            "check the output folder, or run the sweep first."
        )
    if len(candidates) > 1:
        logger.info(
            "%d study folders in %s; backing up %s, whose %s changed last.",
            len(candidates),
            root,
            candidates[-1].name,
            STUDY_DB_NAME,
        )
    return candidates[-1]


def _study_targets(study_dir: Path) -> list[tuple[Path, bool]]:
    """The backup targets of a study folder: ``study.db`` first, then every other entry.

    Each entry is its own target (``trials/`` is one), the same targets the per-trial
    callbacks use, so the worker coalesces them and folder manifests line up.
    """
    targets: list[tuple[Path, bool]] = [(study_dir / STUDY_DB_NAME, False)]
    for entry in sorted(study_dir.iterdir()):
        if entry.name == STUDY_DB_NAME or entry.name.startswith("."):
            continue
        if entry.name.endswith(_SQLITE_SIDECAR_SUFFIXES):
            continue
        targets.append((entry, entry.is_dir() and not entry.is_symlink()))
    return targets


def backup_hpo_study_to_drive(
    backbone_output_dir: str | os.PathLike[str],
    backup_to_drive: BackupToDrive | None,
    *,
    study_dir: str | os.PathLike[str] | None = None,
    worker: BackupWorker | None = None,
    timeout: float | None = None,
    verify: bool = True,
) -> StudyBackupReport:
    """Back up a finished sweep to Drive and wait for it, up to ``timeout`` seconds.

    The end-of-sweep call. It finds the study folder (see :func:`find_study_dir`). If the
    folder is on Drive it only verifies its database. Otherwise it schedules ``study.db``
    (a consistent snapshot) and every other entry of the folder (``trials/``,
    incrementally), waits for them and for every earlier per-trial job, then checks the
    Drive copy of the database: it opens, passes the integrity check, and its trials are
    counted. Blocks the calling thread; never waits longer than ``timeout`` for Drive.

    Raises:
        StudyNotFoundError: no study folder in ``backbone_output_dir``.
    """
    started = time.monotonic()
    found = find_study_dir(backbone_output_dir, study_dir)
    database = found / STUDY_DB_NAME
    store = backup_to_drive if isinstance(backup_to_drive, DriveStore) else None
    if is_drive_path(found):
        return StudyBackupReport(
            study_dir=found,
            on_drive=True,
            verification=_verify(store, database, timeout),
            duration_s=time.monotonic() - started,
        )
    if backup_to_drive is None:
        return StudyBackupReport(
            study_dir=found,
            on_drive=False,
            error="no backup_to_drive was given, so nothing was copied to Drive",
            duration_s=time.monotonic() - started,
        )
    worker = worker or get_default_worker()
    targets = _study_targets(found)
    for target, is_directory in targets:
        worker.submit(target, _backup_job(backup_to_drive, target, None), is_directory=is_directory)
    flush = worker.flush(timeout)
    wanted = {target for target, _ in targets}
    reports = tuple(report for report in flush.targets if report.target in wanted)
    verification: VerifyResult | None = None
    if verify and store is not None and not flush.timed_out:
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        verification = _verify(store, database, remaining)
    return StudyBackupReport(
        study_dir=found,
        on_drive=False,
        targets=reports,
        verification=verification,
        timed_out=flush.timed_out,
        duration_s=time.monotonic() - started,
    )


def _verify(store: DriveStore | None, database: Path, timeout: float | None) -> VerifyResult:
    """Check the Drive copy of ``database`` (or ``database`` itself on Drive), bounded."""
    # Only a database already on Drive comes without a store: check it in place.
    checker = store if store is not None else DriveStore(tempfile.gettempdir(), database.parent)

    async def verify_bounded() -> VerifyResult | None:
        with anyio.move_on_after(timeout):
            return await checker.averify(database)
        return None

    try:
        verification = run_blocking(verify_bounded)
    finally:
        if store is None:
            checker.close()
    if verification is None:
        return VerifyResult(
            path=database if is_drive_path(database) else checker.drive_path_for(database),
            exists=False,
            error=f"Google Drive did not answer within {timeout:.0f} s while checking the copy",
        )
    return verification
