"""sweepsafe: keep an Optuna sweep backed up to Google Drive and resume it on a new runtime.

Everything a user needs is importable from here. Further names live in their modules:
the exceptions in :mod:`sweepsafe.errors`, the worker's details in
:mod:`sweepsafe.worker`, results in :mod:`sweepsafe.drive`, and a simulated slow or
failing Drive for your own tests in :mod:`sweepsafe.testing`.
"""

from __future__ import annotations

from sweepsafe.backup import (
    StudyBackupReport,
    backup_hpo_study_to_drive,
    create_incremental_backup_callback,
    create_study_db_backup_callback,
    create_trial_backup_callback,
)
from sweepsafe.drive import BackupResult, DriveStore, VerifyResult
from sweepsafe.errors import SweepsafeError
from sweepsafe.paths import is_drive_path
from sweepsafe.sweep import (
    SweepResult,
    remaining_trials,
    resume_study,
    run_sweep,
    study_dir_for,
    trial_dir,
)
from sweepsafe.worker import BackupWorker, FlushReport

__all__ = [
    "BackupResult",
    "BackupWorker",
    "DriveStore",
    "FlushReport",
    "StudyBackupReport",
    "SweepResult",
    "SweepsafeError",
    "VerifyResult",
    "backup_hpo_study_to_drive",
    "create_incremental_backup_callback",
    "create_study_db_backup_callback",
    "create_trial_backup_callback",
    "is_drive_path",
    "remaining_trials",
    "resume_study",
    "run_sweep",
    "study_dir_for",
    "trial_dir",
]
