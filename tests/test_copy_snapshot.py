"""Databases go to Drive as consistent, integrity-checked snapshots, even while in use."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest

from drive_support import (
    complete_trial_numbers,
    corrupt_database,
    make_study,
    simulated_drive,
    temp_files,
    trials_running,
)


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_snapshot_taken_while_trials_run_opens_in_optuna_with_every_finished_trial(
    tmp_path: Path, wal: bool
) -> None:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        url = make_study(database, n_trials=5, wal=wal)
        with trials_running(url) as first_done:
            assert first_done.wait(timeout=60)
            finished_before = complete_trial_numbers(database)
            if wal:
                # The newest trials are still only in the WAL, not the main file.
                assert database.with_name("study.db-wal").stat().st_size > 0
            result = setup.store.backup(database)
        assert result.ok, result.error
        assert result.kind == "sqlite"
        copy = setup.store.drive_path_for(database)
        assert copy == setup.drive / "study-1" / "study.db"
        connection = sqlite3.connect(copy)
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        connection.close()
        study = optuna.load_study(study_name="study", storage=f"sqlite:///{copy}")
        finished_in_copy = {
            t.number for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        }
        assert finished_before <= finished_in_copy
        assert len(finished_before) > 5
        # The Drive copy stands alone: no WAL or shared-memory file beside it (only
        # sweepsafe's own hidden folder of the study's identity, lease and history).
        assert sorted(p.name for p in copy.parent.iterdir()) == [".sweepsafe", "study.db"]


def test_database_named_anything_is_recognised_by_its_header(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "results.bin"
        make_study(database, n_trials=2)
        not_a_database = setup.local / "notes.db"
        not_a_database.write_text("plain text, named like a database")
        assert setup.store.backup(database).kind == "sqlite"
        plain = setup.store.backup(not_a_database)
        assert plain.ok, plain.error
        assert plain.kind == "file"
        assert (setup.drive / "notes.db").read_bytes() == not_a_database.read_bytes()


def test_corrupt_database_is_never_shipped_and_drive_keeps_the_previous_copy(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study.db"
        make_study(database, n_trials=20)
        assert setup.store.backup(database).ok
        good_copy = (setup.drive / "study.db").read_bytes()

        corrupt_database(database)
        result = setup.store.backup(database)

        assert not result.ok
        assert not result.retryable
        assert str(database) in (result.error or "")
        assert "corrupt" in (result.error or "")
        assert (setup.drive / "study.db").read_bytes() == good_copy
        assert temp_files(setup.drive) == []
        assert list((setup.local / ".sweepsafe" / "scratch").iterdir()) == []
