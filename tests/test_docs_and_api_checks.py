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
    DriveStore,
    ObjectStore,
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


@pytest.mark.parametrize("store_class", [DriveStore, ObjectStore])
def test_the_store_class_instead_of_a_store_is_refused_saying_how_to_make_one(
    drive: DriveSetup, store_class: type[DriveStore]
) -> None:
    with pytest.raises(TypeError) as raised:
        run_sweep(
            objective,
            output_dir=drive.local,
            study_key="k",
            n_trials=1,
            backup_to_drive=store_class,  # type: ignore[arg-type]
        )

    message = str(raised.value)
    assert f"the class {store_class.__name__}" in message
    assert f"{store_class.__name__}(" in message
    assert "lacks" not in message


def _returns_false(path: Path, is_directory: bool) -> bool:
    return False


def _raises(path: Path, is_directory: bool) -> bool:
    raise OSError(5, "Input/output error", str(path))
