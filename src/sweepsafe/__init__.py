"""sweepsafe: keep an Optuna sweep backed up to Google Drive and resume it on a new runtime.

Everything a user needs is importable from here. Further names live in their modules:
the exceptions in :mod:`sweepsafe.errors`, the worker's details in
:mod:`sweepsafe.worker`, results in :mod:`sweepsafe.drive`, and a simulated slow or
failing Drive for your own tests in :mod:`sweepsafe.testing`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sweepsafe.backup import (
        StudyBackupReport,
        backup_hpo_study_to_drive,
        create_incremental_backup_callback,
        create_study_db_backup_callback,
        create_trial_backup_callback,
    )
    from sweepsafe.drive import BackupResult, DriveStore, ObjectStore, VerifyResult
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

# Imported on first use, so that the command (and anything importing one submodule)
# does not pay for Optuna and SQLAlchemy before it needs them.
_HOMES = {
    "StudyBackupReport": "sweepsafe.backup",
    "backup_hpo_study_to_drive": "sweepsafe.backup",
    "create_incremental_backup_callback": "sweepsafe.backup",
    "create_study_db_backup_callback": "sweepsafe.backup",
    "create_trial_backup_callback": "sweepsafe.backup",
    "BackupResult": "sweepsafe.drive",
    "DriveStore": "sweepsafe.drive",
    "ObjectStore": "sweepsafe.drive",
    "VerifyResult": "sweepsafe.drive",
    "SweepsafeError": "sweepsafe.errors",
    "is_drive_path": "sweepsafe.paths",
    "SweepResult": "sweepsafe.sweep",
    "remaining_trials": "sweepsafe.sweep",
    "resume_study": "sweepsafe.sweep",
    "run_sweep": "sweepsafe.sweep",
    "study_dir_for": "sweepsafe.sweep",
    "trial_dir": "sweepsafe.sweep",
    "BackupWorker": "sweepsafe.worker",
    "FlushReport": "sweepsafe.worker",
}

__all__ = [
    "BackupResult",
    "BackupWorker",
    "DriveStore",
    "FlushReport",
    "ObjectStore",
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


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'sweepsafe' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the ones not imported yet included."""
    return sorted({*globals(), *_HOMES})
