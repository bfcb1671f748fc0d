"""The public API as the README and docs describe it, and as users misuse it.

Real Optuna studies in real SQLite files, a simulated Drive where one is needed.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from drive_support import DriveSetup
from sweep_support import finished_trials
from sweepsafe import (
    resume_study,
    run_sweep,
    study_dir_for,
)
from sweepsafe.errors import SweepsafeError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


def test_resume_study_given_the_database_file_names_the_folder_to_pass(
    drive: DriveSetup,
) -> None:
    first = run_sweep(
        objective, output_dir=drive.local, study_key="k", n_trials=2, backup_to_drive=drive.store
    )
    database = first.study_dir / "study.db"

    with pytest.raises(SweepsafeError) as raised:
        resume_study(database, drive.store)

    message = str(raised.value)
    assert str(database) in message
    assert f"resume_study({str(first.study_dir)!r}" in message
    assert len(finished_trials(database)) == 2


def test_an_output_folder_under_a_file_is_named_before_drive_is_asked(drive: DriveSetup) -> None:
    (drive.local / "results").write_text("a file where a folder is wanted\n")
    output = drive.local / "results" / "sweeps"

    with pytest.raises(SweepsafeError) as raised:
        run_sweep(
            objective, output_dir=output, study_key="k", n_trials=1, backup_to_drive=drive.store
        )

    message = str(raised.value)
    assert f"{drive.local / 'results'} is a file" in message
    assert "Drive" not in message
    assert not (drive.drive / study_dir_for(output, "k").name).exists()


def _returns_false(path: Path, is_directory: bool) -> bool:
    return False


def _raises(path: Path, is_directory: bool) -> bool:
    raise OSError(5, "Input/output error", str(path))
