"""The per-trial backup callbacks and the jobs they hand to the backup worker.

A callback only submits a target (``study.db``, a trial's folder) to a
:class:`~sweepsafe.worker.BackupWorker` and never waits: the job it hands over moves
every byte on the worker's background loop, and :class:`BackupProgress` counts how far
the Drive copy of ``study.db`` is behind. The study folder's names live here too, since
the callbacks, the first backup and the end-of-sweep backup all copy the same targets.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from sweepsafe.drive import BackupBackend, BackupResult, DriveStore
from sweepsafe.drive._pacing import Pace
from sweepsafe.paths import is_drive_path
from sweepsafe.worker import BackupWorker, get_default_worker, pause

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial

__all__ = [
    "STUDY_DB_NAME",
    "TRIALS_DIR_NAME",
    "BackupProgress",
    "BackupToDrive",
    "OptunaCallback",
    "backup_job",
    "create_incremental_backup_callback",
    "create_study_db_backup_callback",
    "create_trial_backup_callback",
    "keep_leases_alive",
    "submit_initial_backup",
    "trial_folder_name",
]

# The records keep the logger name of the public module users configure.
logger = logging.getLogger("sweepsafe.backup")

STUDY_DB_NAME = "study.db"
TRIALS_DIR_NAME = "trials"

BackupToDrive = BackupBackend | Callable[[Path, bool], Any]
"""Where backups go: a :class:`DriveStore` (any :class:`~sweepsafe.drive.BackupBackend`),
or any ``backup_to_drive(path, is_directory)`` callable, sync or async, returning a
truthy value, ``None`` or a ``BackupResult`` on success."""

OptunaCallback = Callable[["Study", "FrozenTrial"], None]

_FINISHED_STATES = ("COMPLETE", "PRUNED")
"""The trial states counted as finished, in the study and in its Drive copy."""


TRIAL_FOLDER = "trial-{number:05d}"
"""The name of a trial's folder under ``trials/``, to ``str.format`` with its number."""


def trial_folder_name(number: int) -> str:
    """The name of trial ``number``'s folder under ``trials/``: ``trial-00042``."""
    return TRIAL_FOLDER.format(number=number)


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
        refused: Callable[[], str | None] | None = None,
    ) -> None:
        self._target = target
        self._job = job
        self._is_directory = is_directory
        self._worker = worker
        self._progress = progress
        self._refused = refused
        self._warned = False
        self._stopped = False

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        if self._progress is not None and trial.state.name in _FINISHED_STATES:
            # Only these are finished trials in a copy; a FAIL one would stay "behind".
            self._progress._trial_finished()
        try:
            target = self._target if isinstance(self._target, Path) else self._target(trial)
            self._worker.submit(target, self._job, is_directory=self._is_directory)
            reason = None if self._refused is None or self._stopped else self._refused()
            if reason is not None:
                # Another runtime took the study between this sweep's start and its
                # first backup: as if it had been refused at the start.
                self._stopped = True
                logger.error("Stopping the sweep after trial %d: %s", trial.number, reason)
                study.stop()
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
    job = backup_job(backup_to_drive, progress, paced=True)
    refused = None
    if isinstance(backup_to_drive, DriveStore) and not is_directory:
        store, study_dir = backup_to_drive, target.parent

        def refused() -> str | None:
            return store.lease_refused(study_dir)

    return _SubmitBackup(target, job, is_directory, worker, progress, refused)


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

    Raises:
        ValueError: ``storage_path`` is a folder (the study folder, say), not the database.
    """
    if os.path.isdir(storage_path):
        database = os.path.join(os.path.abspath(storage_path), STUDY_DB_NAME)
        raise ValueError(
            f"{storage_path} is a folder; pass the study's database file: "
            f"create_study_db_backup_callback({database!r}, ...)"
        )
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

    Raises:
        ValueError: ``study_dir`` is a file (the study's ``study.db``, say), not its folder.
    """
    if os.path.isfile(study_dir):
        folder = os.path.dirname(os.path.abspath(study_dir))
        raise ValueError(
            f"{study_dir} is a file; pass the study folder that holds trials/: "
            f"create_trial_backup_callback({folder!r}, ...)"
        )
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
        worker.every(("lease", id(backup_to_drive)), interval, _renewal_of(backup_to_drive))


def _renewal_of(store: BackupBackend) -> Callable[[], Awaitable[None]]:
    """``store.arenew``, holding the store weakly: a notebook makes a new store each time
    a cell runs, and a store no sweep uses any more must be free to go (its finalizer
    ends its helper processes; a lease it kept lapses) instead of living on in the
    worker's heartbeat."""
    try:
        method = weakref.WeakMethod(store.arenew)
    except TypeError:  # not a bound method: nothing to hold weakly
        return store.arenew

    async def renew() -> None:
        arenew = method()
        if arenew is not None:
            await arenew()

    return renew


_BACKEND_MEMBERS = (
    *BackupBackend.__annotations__,
    *(name for name, value in vars(BackupBackend).items() if callable(value) and name[0] != "_"),
)


def _check_callable(backup_to_drive: object) -> None:
    """A half-made backend would be called as a plain callable: say what it lacks."""
    if isinstance(backup_to_drive, type) and hasattr(backup_to_drive, "abackup"):
        name = backup_to_drive.__name__
        raise TypeError(
            f"backup_to_drive is the class {name}, not a store: create one, "
            f"backup_to_drive={name}(OUTPUT_DIR, ...), and pass that"
        )
    if hasattr(backup_to_drive, "abackup"):
        missing = [name for name in _BACKEND_MEMBERS if not hasattr(backup_to_drive, name)]
        raise TypeError(
            f"backup_to_drive={type(backup_to_drive).__name__}(...) has abackup but lacks "
            f"{', '.join(missing)}: a backend needs every member of "
            "sweepsafe.drive.BackupBackend (or pass a plain callable(path, is_directory))"
        )
    if not callable(backup_to_drive):
        raise TypeError(
            f"backup_to_drive must be a DriveStore, an ObjectStore, another "
            f"sweepsafe.drive.BackupBackend or a callable(path, is_directory), not "
            f"{type(backup_to_drive).__name__}"
        )


def backup_job(
    backup_to_drive: BackupToDrive,
    progress: BackupProgress | None,
    *,
    announce: bool = False,
    final: bool = False,
    skip_missing: bool = False,
    paced: bool = False,
) -> Callable[[Path, bool], object]:
    """The job the worker runs for ``backup_to_drive``: async for a store, else the
    user's callable as it is (the worker runs a sync one in a thread it can abandon).

    ``paced``: each run waits until the last one's work on this machine (a database's
    snapshot, say) is a small share of the time since it began (see ``_pacing``).
    """
    if not isinstance(backup_to_drive, BackupBackend):
        _check_callable(backup_to_drive)
        return backup_to_drive
    store = backup_to_drive
    pace = Pace() if paced else None

    async def run_backup(path: Path, is_directory: bool) -> BackupResult:
        if skip_missing and not await anyio.to_thread.run_sync(os.path.isdir, path):
            return BackupResult(True, path, None, "skipped", notes=("no files",))
        if pace is not None:
            await pace.take_turn(pause)
        result = await store.abackup(path, is_directory, final=final)
        if pace is not None:
            pace.work = result.local_s
        if result.ok and progress is not None and result.finished_trials is not None:
            progress._copy_succeeded(result.finished_trials)
        if announce:
            if result.ok:
                logger.info("First backup of %s reached Drive.", path)
            else:
                logger.warning("First backup of %s did not reach Drive: %s", path, result.error)
        return result

    return run_backup
