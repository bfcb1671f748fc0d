"""Backup policy for Optuna: the per-trial callbacks and the end-of-sweep backup.

The callbacks only hand a job to a :class:`~sweepsafe.worker.BackupWorker`; every byte
is moved on the worker's background loop, so a trial never waits for Drive. The
worker alone decides where a job runs: an async backup on its loop, a sync one in a
thread it abandons if it hangs.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from sweepsafe._blocking import run_blocking
from sweepsafe._study_report import StudyBackupReport
from sweepsafe.drive import BackupBackend, BackupResult, VerifyResult, check_database
from sweepsafe.errors import StudyNotFoundError
from sweepsafe.paths import is_drive_path, is_within
from sweepsafe.worker import BackupWorker, get_default_worker

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
    "create_trial_backup_callback",
    "find_study_dir",
    "keep_leases_alive",
    "submit_initial_backup",
    "trial_folder_name",
]

logger = logging.getLogger(__name__)

STUDY_DB_NAME = "study.db"
TRIALS_DIR_NAME = "trials"
_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")

BackupToDrive = BackupBackend | Callable[[Path, bool], Any]
"""Where backups go: a :class:`DriveStore` (any :class:`~sweepsafe.drive.BackupBackend`),
or any ``backup_to_drive(path, is_directory)`` callable, sync or async, returning a
truthy value, ``None`` or a ``BackupResult`` on success."""

OptunaCallback = Callable[["Study", "FrozenTrial"], None]


def trial_folder_name(number: int) -> str:
    """The name of trial ``number``'s folder under ``trials/``: ``trial-00042``."""
    return f"trial-{number:05d}"


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
        """Finished trials that the newest Drive copy of ``study.db`` is known to hold."""
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
        target: Path | Callable[[FrozenTrial], Path],
        job: Callable[[Path, bool], object],
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
            target = self._target if isinstance(self._target, Path) else self._target(trial)
            self._worker.submit(target, self._job, is_directory=self._is_directory)
        except Exception as exc:  # noqa: BLE001 - an exception here would abort study.optimize
            if not self._warned:
                self._warned = True
                logger.warning("Could not schedule a backup after trial %d: %s", trial.number, exc)

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
    worker = worker or get_default_worker()
    keep_leases_alive(backup_to_drive, worker)
    job = backup_job(backup_to_drive, progress)
    return _SubmitBackup(target, job, is_directory, worker, progress)


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
    :class:`DriveStore` each copy is a consistent, integrity-checked snapshot, published
    only after the folders of the trials it newly holds reached Drive.
    """
    return create_incremental_backup_callback(
        storage_path,
        backup_to_drive,
        backup_enabled,
        is_directory=False,
        worker=worker,
        progress=progress,
    )


def create_trial_backup_callback(
    study_dir: str | os.PathLike[str],
    backup_to_drive: BackupToDrive | None,
    backup_enabled: bool = True,
    *,
    worker: BackupWorker | None = None,
) -> OptunaCallback:
    """Make an Optuna callback that backs up the folder of the trial that just ended.

    The folder is ``study_dir/trials/trial-00042`` (see :func:`sweepsafe.trial_dir`);
    a trial that wrote no folder is fine. Only that folder is scanned, so the cost of a
    backup follows the trial's files, not the whole study's.
    """
    if not backup_enabled or backup_to_drive is None:
        return _NoBackup()
    trials = Path(os.path.abspath(study_dir)) / TRIALS_DIR_NAME
    if is_drive_path(trials):
        return _NoBackup()
    worker = worker or get_default_worker()
    keep_leases_alive(backup_to_drive, worker)

    def folder_of(trial: FrozenTrial) -> Path:
        return trials / trial_folder_name(trial.number)

    job = backup_job(backup_to_drive, None, skip_missing=True)
    return _SubmitBackup(folder_of, job, True, worker, None)


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
    worker = worker or get_default_worker()
    keep_leases_alive(backup_to_drive, worker)
    worker.submit(target, backup_job(backup_to_drive, progress, announce=True), is_directory=False)


def keep_leases_alive(backup_to_drive: object, worker: BackupWorker) -> None:
    """Have ``worker`` renew the store's leases on its studies while it runs (idempotent).

    The heartbeat runs on the worker's loop, never on a trial's thread, and goes on
    through trials of any length.
    """
    if isinstance(backup_to_drive, BackupBackend):
        lease_timeout = float(getattr(backup_to_drive, "lease_timeout", 120.0))
        interval = max(0.5, lease_timeout / 4)
        worker.every(("lease", id(backup_to_drive)), interval, backup_to_drive.arenew)


def backup_job(
    backup_to_drive: BackupToDrive,
    progress: BackupProgress | None,
    *,
    announce: bool = False,
    final: bool = False,
    skip_missing: bool = False,
) -> Callable[[Path, bool], object]:
    """The job the worker runs for ``backup_to_drive``: async for a store, else the
    user's callable as it is (the worker runs a sync one in a thread it can abandon)."""
    if not isinstance(backup_to_drive, BackupBackend):
        return backup_to_drive
    store = backup_to_drive

    async def run_backup(path: Path, is_directory: bool) -> BackupResult:
        if skip_missing and not await anyio.to_thread.run_sync(os.path.isdir, path):
            return BackupResult(True, path, None, "skipped", notes=("no files",))
        result = await store.abackup(path, is_directory, final=final)
        if result.ok and progress is not None and result.finished_trials is not None:
            progress._copy_succeeded(result.finished_trials)
        if announce:
            if result.ok:
                logger.info("First backup of %s reached Drive.", path)
            else:
                logger.warning("First backup of %s did not reach Drive: %s", path, result.error)
        return result

    return run_backup


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


def _study_targets(study_dir: Path) -> tuple[list[tuple[Path, bool]], list[str]]:
    """The backup targets of a study folder, ``study.db`` first, and entries left out.

    Each entry is its own target (``trials/`` is one), the same targets the callbacks
    use. The symlink rule of the whole study folder applies here too: a link to a file
    inside the study folder is backed up as that file; any other link is left out and
    named, and never makes the backup incomplete.
    """
    targets: list[tuple[Path, bool]] = [(study_dir / STUDY_DB_NAME, False)]
    skipped: list[str] = []
    real = os.path.realpath(study_dir)
    for entry in sorted(study_dir.iterdir()):
        name = entry.name
        if name == STUDY_DB_NAME or name.startswith(".") or name.endswith(_SIDE_SUFFIXES):
            continue
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        if stat_module.S_ISLNK(info.st_mode):
            target = os.path.realpath(entry)
            if is_within(target, real) and os.path.isfile(target):
                targets.append((entry, False))
            else:
                skipped.append(f"{name} (a link to {target}; its target is not backed up)")
        elif stat_module.S_ISDIR(info.st_mode):
            targets.append((entry, True))
        elif stat_module.S_ISREG(info.st_mode):
            targets.append((entry, False))
        else:
            skipped.append(f"{name} (not a regular file)")
    return targets, skipped


def backup_hpo_study_to_drive(
    backbone_output_dir: str | os.PathLike[str],
    backup_to_drive: BackupToDrive | None,
    *,
    study_dir: str | os.PathLike[str] | None = None,
    worker: BackupWorker | None = None,
    timeout: float | None = None,
    verify: bool = True,
    release: bool = True,
) -> StudyBackupReport:
    """Back up a finished sweep to Drive and wait for it, up to ``timeout`` seconds.

    The end-of-sweep call. It finds the study folder (see :func:`find_study_dir`). If the
    folder is on Drive it only verifies its database. Otherwise it schedules ``study.db``
    (a checked snapshot, which also brings the plain Drive copy up to date) and every
    other entry of the folder (``trials/`` walked whole), waits for them and for every
    earlier per-trial job, then checks the Drive copy. With ``release``, a complete
    wait gives the study's lease back so that the next runtime starts at once. Blocks
    the calling thread; never waits longer than ``timeout`` for Drive.

    Raises:
        StudyNotFoundError: no study folder in ``backbone_output_dir``.
    """
    started = time.monotonic()
    found = find_study_dir(backbone_output_dir, study_dir)
    database = found / STUDY_DB_NAME
    store = backup_to_drive if isinstance(backup_to_drive, BackupBackend) else None
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
    targets, skipped = _study_targets(found)
    for target, is_directory in targets:
        job = backup_job(backup_to_drive, None, final=target == database)
        worker.submit(target, job, is_directory=is_directory)
    logger.info(
        "Waiting %s for the backup of %s to reach Drive.",
        "without a time limit" if timeout is None else f"up to {timeout:g} s",
        found,
    )
    flush = worker.flush(timeout)
    wanted = {target for target, _ in targets}
    reports = tuple(report for report in flush.targets if report.target in wanted)
    for report in reports:
        if isinstance(report.last_result, BackupResult):
            skipped.extend(s for s in report.last_result.skipped if s not in skipped)
    verification: VerifyResult | None = None
    remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
    if verify and store is not None and not flush.timed_out:
        verification = _verify(store, database, remaining)
    if release and store is not None and not flush.timed_out:
        _bounded(store.arelease(found), remaining)
    return StudyBackupReport(
        study_dir=found,
        on_drive=False,
        targets=reports,
        verification=verification,
        timed_out=flush.timed_out,
        duration_s=time.monotonic() - started,
        skipped=tuple(skipped),
    )


def _bounded(awaitable: Awaitable[object], timeout: float | None) -> None:
    async def run() -> None:
        with anyio.move_on_after(timeout):
            await awaitable

    run_blocking(run)


def _verify(store: BackupBackend | None, database: Path, timeout: float | None) -> VerifyResult:
    """Check the Drive copy of ``database`` (or ``database`` itself on Drive), bounded."""

    async def verify_bounded() -> VerifyResult | None:
        with anyio.move_on_after(timeout):
            if store is None:
                return await check_database(database, timeout=timeout or 120.0)
            return await store.averify(database)
        return None

    verification = run_blocking(verify_bounded)
    if verification is None:
        return VerifyResult(
            path=database,
            exists=False,
            error=f"Google Drive did not answer within {timeout:.0f} s while checking the copy",
        )
    return verification
