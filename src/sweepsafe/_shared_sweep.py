"""The optimize loop of one worker of a shared study, with this worker's backups.

The study is already open in the database server (see :mod:`sweepsafe._shared`): this
worker takes a shared lease on the study's Drive folder, backs up its own trials'
folders, exports the study to Drive while it holds the study's lease, and ends with its
final backup whatever stops the loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from sweepsafe._blocking import run_blocking
from sweepsafe._resume import _FINISHED
from sweepsafe._shared import (
    Exporter,
    SharedSettings,
    final_shared_backup,
    shared_backup_callbacks,
)
from sweepsafe.drive import BackupBackend
from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.worker import BackupWorker, get_default_worker

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import Trial

    from sweepsafe._callbacks import BackupProgress, BackupToDrive, OptunaCallback
    from sweepsafe._study_report import StudyBackupReport

logger = logging.getLogger("sweepsafe.sweep")


def _shared_sweep(
    study: Study,
    objective: Callable[[Trial], Any],
    shared: SharedSettings,
    storage: optuna.storages.RDBStorage,
    *,
    study_dir: Path,
    n_trials: int | None,
    timeout: float | None,
    n_jobs: int,
    callbacks: Sequence[OptunaCallback],
    backup_to_drive: BackupToDrive | None,
    flush_timeout: float,
    worker: BackupWorker | None,
    progress: BackupProgress | None,
) -> tuple[StudyBackupReport | None, int]:
    """Optimize the opened shared study with its backups; its final report and resumed count."""
    store = backup_to_drive if isinstance(backup_to_drive, BackupBackend) else None
    study_dir.mkdir(parents=True, exist_ok=True)
    exporter: Exporter | None = None
    backup_callbacks: list[OptunaCallback] = []
    if store is not None:
        worker = worker or get_default_worker()
        try:
            run_blocking(lambda: store.aacquire(study_dir, shared=True))
        except (OSError, DriveTimeout) as exc:
            # Nothing is restored in a shared study: the trials run, and the exports
            # take the lease once Drive answers.
            logger.warning("Could not take the lease on the Drive copy of %s: %s", study_dir, exc)
        exporter = Exporter(store, shared, storage, study.study_name, study_dir, worker, progress)
        backup_callbacks = shared_backup_callbacks(
            study_dir, store, exporter, worker, shared.export_interval
        )
    finished = len(study.get_trials(deepcopy=False, states=_FINISHED))
    report: StudyBackupReport | None = None
    sweep_pid = os.getpid()
    try:
        if n_trials is None or finished < n_trials:
            all_callbacks: list[OptunaCallback] = [*callbacks, *backup_callbacks]
            if n_trials is not None:
                # Every worker stops once the study holds n_trials finished trials.
                all_callbacks.insert(0, optuna.study.MaxTrialsCallback(n_trials, states=_FINISHED))
            study.optimize(
                objective,
                n_trials=None if n_trials is None else n_trials - finished,
                timeout=timeout,
                n_jobs=n_jobs,
                callbacks=all_callbacks,
            )
    finally:
        # A process the objective forked unwinds this frame too when it leaves by
        # sys.exit(); the final export is the sweep's own process's, never a child's.
        in_sweep_process = os.getpid() == sweep_pid
        if in_sweep_process and store is not None and exporter is not None and worker is not None:
            report = final_shared_backup(store, exporter, study_dir, worker, flush_timeout)
            (logger.info if report.ok else logger.warning)(
                "%s", report, extra={"sweepsafe_report": True}
            )
    return report, finished
