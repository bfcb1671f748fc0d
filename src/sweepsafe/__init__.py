"""sweepsafe: keep an Optuna sweep backed up to Google Drive and resume it on a new runtime.

Everything a user needs is importable from here; the modules behind it are documented in
their own docstrings.
"""

from __future__ import annotations

from sweepsafe.backup import (
    BackupProgress,
    StudyBackupReport,
    backup_hpo_study_to_drive,
    create_incremental_backup_callback,
    create_study_db_backup_callback,
    find_study_dir,
    submit_initial_backup,
)
from sweepsafe.drive import BackupResult, DriveStore, VerifyResult
from sweepsafe.errors import (
    BackupFailed,
    DriveNotMountedError,
    DrivePathError,
    StudyNotFoundError,
    SweepsafeError,
)
from sweepsafe.paths import is_drive_path
from sweepsafe.sweep import SweepResult, run_sweep, study_dir_for, trial_dir
from sweepsafe.worker import (
    BackupCallable,
    BackupOutcome,
    BackupWorker,
    FlushReport,
    RetryPolicy,
    TargetReport,
    TargetState,
    WorkerStats,
    get_default_worker,
    set_exit_timeout,
)

__all__ = [
    "BackupCallable",
    "BackupFailed",
    "BackupOutcome",
    "BackupProgress",
    "BackupResult",
    "BackupWorker",
    "DriveNotMountedError",
    "DrivePathError",
    "DriveStore",
    "FlushReport",
    "RetryPolicy",
    "StudyBackupReport",
    "StudyNotFoundError",
    "SweepResult",
    "SweepsafeError",
    "TargetReport",
    "TargetState",
    "VerifyResult",
    "WorkerStats",
    "backup_hpo_study_to_drive",
    "create_incremental_backup_callback",
    "create_study_db_backup_callback",
    "find_study_dir",
    "get_default_worker",
    "is_drive_path",
    "run_sweep",
    "set_exit_timeout",
    "study_dir_for",
    "submit_initial_backup",
    "trial_dir",
]
