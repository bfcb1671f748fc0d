"""run_sweep: an Optuna sweep whose study is backed up to Drive and resumed from it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import optuna
from optuna.trial import TrialState

from sweepsafe.backup import (
    STUDY_DB_NAME,
    TRIALS_DIR_NAME,
    BackupProgress,
    BackupToDrive,
    OptunaCallback,
    StudyBackupReport,
    backup_hpo_study_to_drive,
    create_incremental_backup_callback,
    create_study_db_backup_callback,
    submit_initial_backup,
)
from sweepsafe.drive import DriveStore
from sweepsafe.errors import SweepsafeError
from sweepsafe.paths import is_drive_path

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler
    from optuna.study import Study, StudyDirection
    from optuna.trial import FrozenTrial, Trial

    from sweepsafe.worker import BackupWorker

__all__ = ["SweepResult", "run_sweep", "study_dir_for", "trial_dir"]

logger = logging.getLogger(__name__)

Direction = Union[Literal["minimize", "maximize"], "StudyDirection"]

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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
    """Return (and create) the folder for one trial's files: ``trials/trial-00042``."""
    number = trial if isinstance(trial, int) else trial.number
    path = Path(study_dir) / TRIALS_DIR_NAME / f"trial-{number:05d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    flush_timeout: float = 300.0,
    worker: BackupWorker | None = None,
    progress: BackupProgress | None = None,
) -> SweepResult:
    """Run an Optuna sweep on local disk, backed up to Drive, resuming where it stopped.

    The study lives in ``study_dir_for(output_dir, study_key)`` as ``study.db`` plus a
    ``trials/`` folder for the objective's files (see :func:`trial_dir`). In order:

    1. If the local ``study.db`` is missing and ``backup_to_drive`` is a
       :class:`DriveStore` holding a copy, the study folder is restored from Drive and
       trials left RUNNING by the dead runtime are marked FAIL.
    2. The study is created or loaded, and ``study.db`` is backed up at once (not
       waited on).
    3. ``study.optimize`` runs with your ``callbacks`` followed by the backup callbacks,
       which only schedule copies: the trials never wait for Drive.
    4. Whatever happens (an exception, Ctrl-C), the study is backed up at the end and
       the report returned (or logged, while the exception propagates).

    ``n_trials`` is the number of *finished* trials (COMPLETE and PRUNED) the study
    should have when the sweep ends, not a number to add: running the same cell again
    after a crash finishes the sweep instead of starting ``n_trials`` more. Trials that
    fail do not count, but do use up this run's budget; run again to fill the gap.
    ``run_sweep`` assumes it is the only process working on this study.

    Raises:
        SweepsafeError: Drive holds a copy of this study but it could not be restored
            (a new study would later overwrite it).
    """
    study_dir = study_dir_for(output_dir, study_key)
    storage_path = study_dir / STUDY_DB_NAME
    name = study_name or study_dir.name
    if is_drive_path(study_dir):
        logger.warning(
            "%s is on Google Drive: SQLite on a Drive mount is slow and can corrupt the "
            "study. Keep output_dir on local disk (e.g. /content/sweeps) and pass "
            "backup_to_drive=DriveStore.for_colab(...). Running without backups.",
            study_dir,
        )
        backup_to_drive = None
    if not backup_enabled:
        backup_to_drive = None

    restored = False
    if restore and backup_to_drive is not None and not storage_path.exists():
        restored = _restore_from_drive(backup_to_drive, study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / TRIALS_DIR_NAME).mkdir(exist_ok=True)

    storage = optuna.storages.RDBStorage(f"sqlite:///{storage_path}")
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=direction,
        directions=directions,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    stale = _fail_stale_trials(storage, study)
    finished = len(study.get_trials(deepcopy=False, states=_FINISHED))
    if finished or stale:
        logger.info(
            "Resuming study %s with %d finished trials%s%s.",
            name,
            finished,
            " restored from Drive" if restored else "",
            f"; {stale} trials left RUNNING by a dead runtime marked FAIL" if stale else "",
        )

    progress = progress if progress is not None else BackupProgress()
    # A restored database holds every trial it had; a local one may be ahead of Drive.
    progress._start(trials_finished=finished, trials_backed_up=finished if restored else 0)
    backup_callbacks: list[OptunaCallback] = []
    if backup_to_drive is not None:
        submit_initial_backup(storage_path, backup_to_drive, worker=worker, progress=progress)
        backup_callbacks = [
            create_study_db_backup_callback(
                storage_path, backup_to_drive, worker=worker, progress=progress
            ),
            create_incremental_backup_callback(
                study_dir / TRIALS_DIR_NAME, backup_to_drive, is_directory=True, worker=worker
            ),
        ]

    remaining = None if n_trials is None else n_trials - finished
    report: StudyBackupReport | None = None
    failure: BaseException | None = None
    try:
        if remaining is None or remaining > 0:
            all_callbacks: list[OptunaCallback] = [*callbacks, *backup_callbacks]
            if n_trials is not None:
                all_callbacks.insert(0, optuna.study.MaxTrialsCallback(n_trials, states=_FINISHED))
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=timeout,
                n_jobs=n_jobs,
                callbacks=all_callbacks,
            )
        else:
            logger.info("Study %s already has %d finished trials; nothing to run.", name, finished)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if backup_to_drive is not None or is_drive_path(study_dir):
            report = _final_backup(
                output_dir, backup_to_drive, study_dir, worker, flush_timeout, failure
            )
    return SweepResult(
        study=study,
        study_dir=study_dir,
        backup_report=report,
        resumed_trials=finished,
        restored_from_drive=restored,
    )


def _restore_from_drive(backup_to_drive: BackupToDrive, study_dir: Path) -> bool:
    """Bring the study folder back from Drive if Drive holds it; True if it did."""
    if not isinstance(backup_to_drive, DriveStore):
        logger.info(
            "No local %s and backup_to_drive is not a DriveStore, so nothing can be "
            "restored; starting a new study.",
            study_dir / STUDY_DB_NAME,
        )
        return False
    store = backup_to_drive
    database = study_dir / STUDY_DB_NAME
    remote = store.verify(database)
    if not remote.exists and remote.error is None:
        return False
    if remote.error is not None and not remote.exists:
        raise SweepsafeError(
            f"Could not tell whether Google Drive holds a copy of {database}: "
            f"{remote.error.rstrip('.')}. Fix the Drive mount and run again; pass "
            "restore=False only to start a new study that will overwrite the Drive copy."
        )
    result = store.restore(database)
    if not result.ok:
        raise SweepsafeError(
            f"Google Drive holds a copy of {database} ({remote.path}) but it could not be "
            f"restored: {(result.error or 'unknown error').rstrip('.')}. Fix the cause and run "
            "again; pass restore=False only to start a new study that will overwrite the "
            "Drive copy."
        )
    trials = store.restore(study_dir / TRIALS_DIR_NAME, is_directory=True)
    if not trials.ok:
        logger.warning(
            "The study database was restored, but its trial folders were not: %s",
            trials.error,
        )
    logger.info(
        "Restored %s from Google Drive (%d files, %.1f MB).",
        study_dir,
        1 + trials.files_copied,
        (result.bytes_copied + trials.bytes_copied) / 1e6,
    )
    return True


def _fail_stale_trials(storage: optuna.storages.RDBStorage, study: Study) -> int:
    """Mark trials left RUNNING by a runtime that died as FAIL; return how many."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not stale:
        return 0
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return len(stale)


def _final_backup(
    output_dir: str | os.PathLike[str],
    backup_to_drive: BackupToDrive | None,
    study_dir: Path,
    worker: BackupWorker | None,
    flush_timeout: float,
    failure: BaseException | None,
) -> StudyBackupReport | None:
    """The end-of-sweep backup, logged; never masks the sweep's own ``failure``."""
    try:
        report = backup_hpo_study_to_drive(
            output_dir, backup_to_drive, study_dir=study_dir, worker=worker, timeout=flush_timeout
        )
    except SweepsafeError as exc:
        if failure is None:
            raise
        logger.error("The final backup of %s failed: %s", study_dir, exc)
        return None
    if report.ok:
        logger.info("%s", report)
    else:
        logger.warning("%s", report)
    return report
