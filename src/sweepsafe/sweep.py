"""run_sweep and resume_study: an Optuna sweep backed up to Drive and resumed from it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from sweepsafe._resume import (
    _FINISHED,
    Direction,
    _open_study,
    resume_study,
)
from sweepsafe._shared import SharedSettings, open_shared_study
from sweepsafe._shared_sweep import _shared_sweep
from sweepsafe.backup import (
    STUDY_DB_NAME,
    TRIALS_DIR_NAME,
    BackupProgress,
    BackupToDrive,
    OptunaCallback,
    StudyBackupReport,
    backup_hpo_study_to_drive,
    create_study_db_backup_callback,
    create_trial_backup_callback,
    refuse_study_outside_store,
    trial_folder_name,
)
from sweepsafe.drive import DriveStore
from sweepsafe.errors import LeaseHeldError, SweepsafeError
from sweepsafe.paths import is_drive_path
from sweepsafe.worker import BackupWorker, get_default_worker

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler
    from optuna.study import Study
    from optuna.trial import FrozenTrial, Trial

__all__ = [
    "SweepResult",
    "remaining_trials",
    "resume_study",
    "run_sweep",
    "study_dir_for",
    "trial_dir",
]

logger = logging.getLogger(__name__)

# The study folders run_sweep is sweeping in this process (see _one_sweep_in_process).
_SWEEPING: set[Path] = set()
_SWEEPING_LOCK = threading.Lock()


def study_dir_for(output_dir: str | os.PathLike[str], study_key: str | Mapping[str, Any]) -> Path:
    """Return the study folder for ``study_key``: ``OUTPUT_DIR/study-<16 hex digits>``.

    The digest is taken over the canonical JSON of ``study_key`` (keys sorted), so the
    same configuration finds the same folder on every runtime.

    Raises:
        TypeError: ``study_key`` is not a string or a JSON-able mapping.
    """
    if not isinstance(study_key, (str, Mapping)):
        raise TypeError(
            f"study_key must be a string or a JSON-able mapping, not {type(study_key).__name__}"
        )
    try:
        canonical = json.dumps(study_key, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"study_key must be JSON-able (strings, numbers, lists, dicts): {exc}"
        ) from exc
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
    return Path(os.path.abspath(output_dir)) / f"study-{digest}"


def trial_dir(study_dir: str | os.PathLike[str], trial: Trial | FrozenTrial | int) -> Path:
    """Return (and create) the folder for one trial's files: ``trials/trial-00042``.

    The per-trial backup copies this folder after the trial ends, and a database copy
    listing the trial as finished reaches Drive only after it.
    """
    number = trial if isinstance(trial, int) else trial.number
    path = Path(study_dir) / TRIALS_DIR_NAME / trial_folder_name(number)
    path.mkdir(parents=True, exist_ok=True)
    return path


def remaining_trials(study: Study, n_trials: int) -> int:
    """How many more trials to run so that ``study`` has ``n_trials`` finished ones.

    Use it as ``study.optimize(..., n_trials=remaining_trials(study, 100))`` so that
    running the same cell again finishes the sweep instead of adding 100 trials.
    """
    finished = len(study.get_trials(deepcopy=False, states=_FINISHED))
    return max(0, n_trials - finished)


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` leaves: the study, its folder and the final backup report."""

    study: Study
    study_dir: Path
    backup_report: StudyBackupReport | None
    """The end-of-sweep backup; None when backups were off."""
    resumed_trials: int = 0
    """Finished trials the study already had when this run started (0 for a new study)."""
    restored_from_drive: bool = False

    @property
    def backup_ok(self) -> bool:
        """True when the final Drive copy is complete (or backups were off)."""
        return self.backup_report is None or self.backup_report.ok


def run_sweep(
    objective: Callable[[Trial], Any],
    *,
    output_dir: str | os.PathLike[str],
    study_key: str | Mapping[str, Any],
    study_name: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    direction: Direction | None = None,
    directions: Sequence[Direction] | None = None,
    sampler: BaseSampler | None = None,
    pruner: BasePruner | None = None,
    n_jobs: int = 1,
    callbacks: Sequence[OptunaCallback] = (),
    backup_to_drive: BackupToDrive | None = None,
    backup_enabled: bool = True,
    restore: bool = True,
    takeover: bool = False,
    flush_timeout: float = 300.0,
    worker: BackupWorker | None = None,
    progress: BackupProgress | None = None,
    storage: str | None = None,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    max_retry: int = 3,
    export_interval: float = 300.0,
) -> SweepResult:
    """Run an Optuna sweep on local disk, backed up to Drive, resuming where it stopped.

    The study lives in ``study_dir_for(output_dir, study_key)`` as ``study.db`` plus a
    ``trials/`` folder for the objective's files (see :func:`trial_dir`). In order:

    1. This runtime checks the study's lease on Drive (another live runtime makes it
       refuse; ``takeover=True`` if that runtime is gone). Only a takeover, or trials
       left RUNNING to fail, waits for the lease to be written; else the first backup
       writes it, and should another runtime take the study first, the sweep stops
       after the trial running then and raises ``LeaseHeldError``.
    2. If the local study is missing or older than the Drive copy, it is restored
       (checked), and trials left RUNNING by the dead runtime are marked FAIL.
    3. The study is created or loaded, and ``study.db`` is backed up at once.
    4. ``study.optimize`` runs with your ``callbacks`` followed by the backup callbacks,
       which only schedule copies: the trials never wait for Drive.
    5. Whatever happens (an exception, Ctrl-C), the study is backed up at the end, the
       lease given back, and the report returned (or logged, while the exception
       propagates).

    ``n_trials`` is the number of *finished* trials (COMPLETE and PRUNED) the study
    should have when the sweep ends, not a number to add: running the same cell again
    after a crash finishes the sweep instead of starting ``n_trials`` more. Trials that
    fail do not count, but do use up this run's budget; run again to fill the gap.

    With ``storage`` (a database URL, ``postgresql://user@host/db``), this runs one
    worker of a sweep shared by several runtimes: the study lives in the server, a trial
    whose worker died is found by Optuna's heartbeat (``heartbeat_interval``,
    ``grace_period``) and retried up to ``max_retry`` times, ``n_trials`` counts the
    finished trials of every worker (each worker stops at it; they may overshoot by one
    trial each), each worker backs up its own trial folders, and the worker holding the
    study's lease exports the study to Drive as ``study.db`` every ``export_interval``
    seconds and at its end. A worker that ends while another holds the lease waits,
    within ``flush_timeout``, for an export holding its own trials (or for the lease, and
    exports itself); its report is complete only then.

    Raises:
        LeaseHeldError: another runtime is backing this study up.
        ValueError: the study folder is not inside the ``local_root`` of the store
            given as ``backup_to_drive``.
        StudyConflictError: the local study and its Drive copy diverged.
        SweepsafeError: Drive holds a copy of this study but it could not be restored
            (a new study would be refused by it anyway), the local ``study.db`` is
            not an Optuna study or is to be optimized in another direction than the one
            given, or this process is still sweeping the study (another
            thread, or a cell still running).
    """
    study_dir = study_dir_for(output_dir, study_key)
    storage_path = study_dir / STUDY_DB_NAME
    if not backup_enabled:
        backup_to_drive = None
    if storage is not None:
        refuse_study_outside_store(study_dir, backup_to_drive)
        shared = SharedSettings(
            storage, heartbeat_interval, grace_period, max_retry, export_interval
        )
        return _run_shared(
            objective,
            shared,
            study_dir=study_dir,
            study_name=study_name or study_dir.name,
            n_trials=n_trials,
            timeout=timeout,
            direction=direction,
            directions=directions,
            sampler=sampler,
            pruner=pruner,
            n_jobs=n_jobs,
            callbacks=callbacks,
            backup_to_drive=backup_to_drive,
            flush_timeout=flush_timeout,
            worker=worker,
            progress=progress,
        )
    if is_drive_path(study_dir):
        logger.warning(
            "%s is on Google Drive: SQLite on a Drive mount is slow and can corrupt the "
            "study. Keep output_dir on local disk (e.g. /content/sweeps) and pass "
            "backup_to_drive=DriveStore.for_colab(...). Running without backups.",
            study_dir,
        )
        backup_to_drive = None
    if backup_to_drive is not None:
        worker = worker or get_default_worker()
    progress = progress if progress is not None else BackupProgress()
    sweep_pid = os.getpid()
    with _one_sweep_in_process(study_dir):
        opened = _open_study(
            study_dir,
            backup_to_drive,
            study_name=study_name,
            direction=direction,
            directions=directions,
            sampler=sampler,
            pruner=pruner,
            restore=restore,
            takeover=takeover,
            worker=worker,
            progress=progress,
        )
        study = opened.study
        backup_callbacks: list[OptunaCallback] = []
        if backup_to_drive is not None:
            backup_callbacks = [
                create_trial_backup_callback(study_dir, backup_to_drive, worker=worker),
                create_study_db_backup_callback(
                    storage_path, backup_to_drive, worker=worker, progress=progress
                ),
            ]
        remaining = None if n_trials is None else n_trials - opened.resumed
        report: StudyBackupReport | None = None
        failure: BaseException | None = None
        try:
            if remaining is None or remaining > 0:
                all_callbacks: list[OptunaCallback] = [*callbacks, *backup_callbacks]
                if n_trials is not None:
                    enough = optuna.study.MaxTrialsCallback(n_trials, states=_FINISHED)
                    all_callbacks.insert(0, enough)
                study.optimize(
                    objective,
                    n_trials=remaining,
                    timeout=timeout,
                    n_jobs=n_jobs,
                    callbacks=all_callbacks,
                )
                refused = _lease_refused(backup_to_drive, study_dir)
                if refused is not None:
                    raise LeaseHeldError(refused)
            else:
                logger.info(
                    "Study %s already has %d finished trials; nothing to run.",
                    study.study_name,
                    opened.resumed,
                )
        except BaseException as exc:
            failure = exc
            raise
        finally:
            # A process the objective forked unwinds these frames too when it leaves by
            # sys.exit(); the final backup is the sweep's own process's, never a child's.
            in_sweep_process = os.getpid() == sweep_pid
            if in_sweep_process and (backup_to_drive is not None or is_drive_path(study_dir)):
                report = _final_backup(
                    output_dir, backup_to_drive, study_dir, worker, flush_timeout, failure, progress
                )
        return SweepResult(
            study=study,
            study_dir=study_dir,
            backup_report=report,
            resumed_trials=opened.resumed,
            restored_from_drive=opened.restored,
        )


def _run_shared(
    objective: Callable[[Trial], Any],
    shared: SharedSettings,
    *,
    study_dir: Path,
    study_name: str,
    n_trials: int | None,
    timeout: float | None,
    direction: Direction | None,
    directions: Sequence[Direction] | None,
    sampler: BaseSampler | None,
    pruner: BasePruner | None,
    n_jobs: int,
    callbacks: Sequence[OptunaCallback],
    backup_to_drive: BackupToDrive | None,
    flush_timeout: float,
    worker: BackupWorker | None,
    progress: BackupProgress | None,
) -> SweepResult:
    """One worker of a shared study (see :func:`run_sweep`'s ``storage``)."""
    study, storage = open_shared_study(
        shared,
        study_name=study_name,
        direction=direction,
        directions=directions,
        sampler=sampler,
        pruner=pruner,
    )
    try:
        report, finished = _shared_sweep(
            study,
            objective,
            shared,
            storage,
            study_dir=study_dir,
            n_trials=n_trials,
            timeout=timeout,
            n_jobs=n_jobs,
            callbacks=callbacks,
            backup_to_drive=backup_to_drive,
            flush_timeout=flush_timeout,
            worker=worker,
            progress=progress,
        )
    finally:
        # The returned study stays usable: the engine opens new connections on demand.
        storage.engine.dispose()
    return SweepResult(
        study=study, study_dir=study_dir, backup_report=report, resumed_trials=finished
    )


@contextmanager
def _one_sweep_in_process(study_dir: Path) -> Iterator[None]:
    """Refuse a second sweep of ``study_dir`` while this process still runs one.

    The lease tells runtimes apart, not sweeps of one process: a cell run again while a
    sweep of the same study still runs in another thread would take the running trials
    for a dead runtime's and fail them under it.
    """
    with _SWEEPING_LOCK:
        if study_dir in _SWEEPING:
            raise SweepsafeError(
                f"{study_dir} is already being swept in this process (in another thread, "
                "or a cell still running); wait for that sweep to end, or stop it, and run "
                "again."
            )
        _SWEEPING.add(study_dir)
    try:
        yield
    finally:
        with _SWEEPING_LOCK:
            _SWEEPING.discard(study_dir)


def _lease_refused(backup_to_drive: BackupToDrive | None, study_dir: Path) -> str | None:
    """Why the sweep's first backup found the study taken by another runtime, if it did."""
    if isinstance(backup_to_drive, DriveStore):
        return backup_to_drive.lease_refused(study_dir)
    return None


def _final_backup(
    output_dir: str | os.PathLike[str],
    backup_to_drive: BackupToDrive | None,
    study_dir: Path,
    worker: BackupWorker | None,
    flush_timeout: float,
    failure: BaseException | None,
    progress: BackupProgress | None = None,
) -> StudyBackupReport | None:
    """The end-of-sweep backup, logged; never masks the sweep's own ``failure``."""
    try:
        report = backup_hpo_study_to_drive(
            output_dir,
            backup_to_drive,
            study_dir=study_dir,
            worker=worker,
            timeout=flush_timeout,
            progress=progress,
        )
    except SweepsafeError as exc:
        if failure is None:
            raise
        logger.error("The final backup of %s failed: %s", study_dir, exc)
        return None
    # Tagged, so that a caller printing the report itself can drop this record.
    if report.ok:
        logger.info("%s", report, extra={"sweepsafe_report": True})
    else:
        logger.warning("%s", report, extra={"sweepsafe_report": True})
    return report
