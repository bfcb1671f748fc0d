"""The public API as the README and docs describe it, and as users misuse it.

Real Optuna studies in real SQLite files, a simulated Drive where one is needed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from drive_support import DriveSetup
from sweep_support import finished_trials
from sweepsafe import (
    DriveStore,
    ObjectStore,
    backup_hpo_study_to_drive,
    create_study_db_backup_callback,
    create_trial_backup_callback,
    resume_study,
    run_sweep,
    study_dir_for,
)
from sweepsafe.errors import SweepsafeError
from sweepsafe.testing import helper_argv
from sweepsafe.worker import BackupWorker, RetryPolicy

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


@pytest.mark.parametrize(
    ("backup", "said"),
    [(_returns_false, "returned a false result"), (_raises, "Input/output error")],
)
def test_a_backup_callable_still_failing_when_the_wait_ends_is_named_with_its_error(
    tmp_path: Path, backup: Callable[[Path, bool], bool], said: str
) -> None:
    # A retry far in the future: the targets are still pending when the sweep's wait ends.
    worker = BackupWorker(retry=RetryPolicy(initial_delay=60.0, max_attempts=2))
    try:
        started = time.monotonic()
        result = run_sweep(
            objective,
            output_dir=tmp_path,
            study_key="k",
            n_trials=2,
            backup_to_drive=backup,
            worker=worker,
            flush_timeout=1.0,
        )
        assert time.monotonic() - started < 30
    finally:
        worker.close(timeout=0.5)

    assert result.backup_report is not None
    lines = str(result.backup_report).splitlines()
    (database_line,) = [
        line
        for line in lines
        if line.strip().startswith(str(result.study_dir)) and "study.db" in line
    ]
    assert "still pending" in database_line
    assert said in database_line


def test_a_hung_backup_callable_never_holds_the_sweep_past_its_flush_timeout(
    tmp_path: Path,
) -> None:
    release = threading.Event()

    def hangs(path: Path, is_directory: bool) -> bool:
        release.wait(60)
        return True

    try:
        started = time.monotonic()
        result = run_sweep(
            objective,
            output_dir=tmp_path,
            study_key="k",
            n_trials=3,
            backup_to_drive=hangs,
            flush_timeout=2.0,
        )
        elapsed = time.monotonic() - started
    finally:
        release.set()

    assert elapsed < 20
    assert len(finished_trials(result.study_dir / "study.db")) == 3
    assert result.backup_report is not None
    assert not result.backup_ok
    assert result.backup_report.timed_out


@pytest.mark.parametrize("key", [{1: "a", "b": 2}, {"layers": {64, 128}}])
def test_a_study_key_that_cannot_be_written_as_json_is_one_type_error_naming_it(
    tmp_path: Path, key: dict[object, object]
) -> None:
    with pytest.raises(TypeError, match="study_key must be JSON-able"):
        study_dir_for(tmp_path, key)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_bounded_by_time_alone_backs_up_every_trial_it_ran(drive: DriveSetup) -> None:
    result = run_sweep(
        objective,
        output_dir=drive.local,
        study_key="timed",
        n_trials=None,
        timeout=1.0,
        backup_to_drive=drive.store,
    )

    local = finished_trials(result.study_dir / "study.db")
    assert local
    assert result.backup_ok
    copy = drive.drive / result.study_dir.name / "study.db"
    assert finished_trials(copy) == local


def test_relative_paths_name_the_same_study_for_the_store_and_the_sweep(
    drive: DriveSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(drive.local.parent)
    store = DriveStore("local", "drive", helper_command=helper_argv(drive.plan_path))
    try:
        study_dir = "local/study-resnet"
        study = resume_study(study_dir, store, study_name="resnet", direction="minimize")
        study.optimize(objective, n_trials=2)
        report = backup_hpo_study_to_drive("local", store, study_dir=study_dir, timeout=60)
    finally:
        store.close()

    assert report.ok, str(report)
    assert len(finished_trials(drive.drive / "study-resnet" / "study.db")) == 2


def test_the_drive_records_hold_the_fields_the_layout_page_names(drive: DriveSetup) -> None:
    result = run_sweep(
        objective, output_dir=drive.local, study_key="k", n_trials=2, backup_to_drive=drive.store
    )
    records = drive.drive / result.study_dir.name / ".sweepsafe"

    identity = json.loads((records / "identity.json").read_text())
    lease = json.loads((records / "lease.json").read_text())

    assert {"format", "id", "created", "by"} <= identity.keys()
    assert len(identity["id"]) == 32
    assert {"format", "owner", "acquired", "heartbeat", "released"} <= lease.keys()
    assert {"host", "pid", "boot_id", "started"} <= lease["owner"].keys()
    assert lease["released"] is True
    names = sorted(path.name for path in (records / "history" / "study.db").iterdir())
    tag = identity["by"]["id"]
    assert f"00000001-{tag}.json" in names
    assert f"00000001-{tag}.db" in names
    assert f"00000002-{tag}.patch" in names


def test_a_study_resumed_with_the_other_direction_is_refused_naming_the_one_it_has(
    drive: DriveSetup,
) -> None:
    first = run_sweep(
        objective,
        output_dir=drive.local,
        study_key="k",
        n_trials=2,
        direction="minimize",
        backup_to_drive=drive.store,
    )

    with pytest.raises(SweepsafeError) as raised:
        run_sweep(
            objective,
            output_dir=drive.local,
            study_key="k",
            n_trials=4,
            direction="maximize",
            backup_to_drive=drive.store,
        )

    message = str(raised.value)
    assert "minimize" in message
    assert "direction='minimize'" in message
    assert len(finished_trials(first.study_dir / "study.db")) == 2


def test_the_final_backup_with_a_store_that_does_not_hold_the_study_is_one_clear_error(
    drive: DriveSetup, tmp_path: Path
) -> None:
    result = run_sweep(
        objective, output_dir=drive.local, study_key="k", n_trials=1, backup_to_drive=drive.store
    )
    other = DriveStore(tmp_path / "elsewhere", tmp_path / "drive2")
    try:
        with pytest.raises(ValueError, match="is not inside") as raised:
            backup_hpo_study_to_drive(drive.local, other, study_dir=result.study_dir, timeout=10)
    finally:
        other.close()

    assert str(result.study_dir) in str(raised.value)
    assert not (tmp_path / "drive2").exists()


def test_a_study_resumed_without_a_direction_keeps_its_own(drive: DriveSetup) -> None:
    run_sweep(
        objective,
        output_dir=drive.local,
        study_key="k",
        n_trials=1,
        direction="maximize",
        backup_to_drive=drive.store,
    )

    again = run_sweep(
        objective, output_dir=drive.local, study_key="k", n_trials=2, backup_to_drive=drive.store
    )

    assert again.study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert len(finished_trials(again.study_dir / "study.db")) == 2


def test_callbacks_given_the_folder_and_the_database_swapped_say_which_to_pass(
    drive: DriveSetup,
) -> None:
    result = run_sweep(
        objective, output_dir=drive.local, study_key="k", n_trials=1, backup_to_drive=drive.store
    )
    database = result.study_dir / "study.db"

    with pytest.raises(ValueError, match="is a file") as trial_error:
        create_trial_backup_callback(database, drive.store)
    with pytest.raises(ValueError, match="is a folder") as database_error:
        create_study_db_backup_callback(result.study_dir, drive.store)

    assert f"create_trial_backup_callback({str(result.study_dir)!r}" in str(trial_error.value)
    assert f"create_study_db_backup_callback({str(database)!r}" in str(database_error.value)
