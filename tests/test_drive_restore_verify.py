"""Restores are checked before they replace anything; verify describes the Drive copy."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest

from drive_support import corrupt_database, make_study, simulated_drive, write_bytes
from sweepsafe.drive import DriveStore
from sweepsafe.testing import FaultPlan


def test_restore_of_a_corrupt_drive_database_refuses_and_leaves_local_untouched(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        make_study(database, n_trials=20)
        assert setup.store.backup(database).ok
        # Every whole copy of it on Drive is damaged: the plain one and the kept base.
        copies = [setup.drive / "study-1" / "study.db"]
        history = setup.drive / "study-1" / ".sweepsafe" / "history"
        copies += [p for p in history.rglob("*.db") if p.is_file()]
        assert len(copies) == 2
        for copy in copies:
            corrupt_database(copy)
        local_before = database.read_bytes()

        kept = setup.store.restore(database)
        assert database.read_bytes() == local_before  # the local study is never replaced
        assert sorted(p.name for p in database.parent.iterdir()) == ["study.db"]

        database.unlink()  # now a new runtime, with nothing local, asks for it
        result = setup.store.restore(database)

        assert not result.ok
        assert not result.retryable
        assert "damaged" in (result.error or "") or "integrity" in (result.error or "")
        assert str(setup.drive / "study-1") in (result.error or "")
        assert not database.exists()
    assert kept.ok or "nothing local was replaced" in (kept.error or "")


def test_restore_refuses_damage_only_the_full_integrity_check_sees(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        # A copy put on Drive by hand (no history beside it) whose header miscounts its
        # free pages: every trial still reads back, only PRAGMA integrity_check objects.
        made = tmp_path / "made" / "study.db"
        make_study(made, n_trials=20)
        on_drive = setup.drive / "study-1" / "study.db"
        on_drive.parent.mkdir(parents=True)
        on_drive.write_bytes(made.read_bytes())
        with open(on_drive, "r+b") as file:
            file.seek(36)  # the header's count of free pages
            file.write((3).to_bytes(4, "big"))
        reader = sqlite3.connect(f"file:{on_drive}?mode=ro", uri=True)
        try:
            assert reader.execute("SELECT COUNT(*) FROM trials").fetchone() == (20,)
        finally:
            reader.close()
        database = setup.local / "study-1" / "study.db"

        result = setup.store.restore(database)

        assert not result.ok
        assert "failed its check" in (result.error or "")
        assert "integrity_check" in (result.error or "")
        assert str(on_drive) in (result.error or "")
        assert not database.exists()


def test_restore_brings_a_lost_study_back_and_optuna_resumes_it(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        make_study(database, n_trials=7, wal=True)
        assert setup.store.backup(database).ok
        for leftover in database.parent.iterdir():
            leftover.unlink()  # the runtime died and its disk is gone

        result = setup.store.restore(database)

        assert result.ok, result.error
        assert (result.kind, result.destination) == ("sqlite", database)
        assert result.source == setup.drive / "study-1" / "study.db"
        study = optuna.load_study(study_name="study", storage=f"sqlite:///{database}")
        assert len(study.trials) == 7


def test_restore_without_a_drive_copy_says_so(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        result = setup.store.restore(setup.local / "study.db")
        folder = setup.store.restore(setup.local / "trials", is_directory=True)
    for failed in (result, folder):
        assert not failed.ok
        assert "holds no copy" in (failed.error or "")


def test_verify_reports_trials_and_studies_of_a_sound_optuna_copy(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study.db"
        url = make_study(database, n_trials=4)
        study = optuna.load_study(study_name="study", storage=url)
        study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
        assert setup.store.backup(database).ok

        result = setup.store.verify(database)

        assert result.ok
        assert result.path == setup.drive / "study.db"
        assert result.is_sqlite
        assert result.integrity_ok is True
        assert dict(result.trial_counts) == {"COMPLETE": 4, "PRUNED": 1}
        assert result.study_names == ("study",)
        assert result.size == (setup.drive / "study.db").stat().st_size
        assert result.mtime == pytest.approx((setup.drive / "study.db").stat().st_mtime)
        # A Drive path is checked in place.
        assert setup.store.verify(setup.drive / "study.db") == result


def test_verify_of_corrupt_plain_and_missing_copies(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study.db"
        make_study(database, n_trials=20)
        assert setup.store.backup(database).ok
        corrupt_database(setup.drive / "study.db")
        write_bytes(setup.local / "notes.txt", b"hello")
        assert setup.store.backup(setup.local / "notes.txt").ok

        corrupt = setup.store.verify(database)
        plain = setup.store.verify(setup.local / "notes.txt")
        missing = setup.store.verify(setup.local / "never-backed-up.db")

    assert corrupt.exists
    assert corrupt.is_sqlite
    assert not corrupt.ok
    assert corrupt.integrity_ok is False
    assert corrupt.error
    assert plain.ok
    assert (plain.is_sqlite, plain.integrity_ok, plain.size) == (False, None, 5)
    assert not missing.exists
    assert not missing.ok
    assert missing.error is None


def test_verify_reports_a_disconnected_drive_as_an_error(tmp_path: Path) -> None:
    with simulated_drive(tmp_path, FaultPlan(disconnected=True)) as setup:
        result = setup.store.verify(setup.local / "study.db")
    assert not result.ok
    assert "not connected" in (result.error or "")


def test_restored_database_replaces_stale_wal_files_of_the_old_one(tmp_path: Path) -> None:
    with DriveStore(tmp_path / "local", tmp_path / "drive") as store:
        database = tmp_path / "local" / "study.db"
        make_study(database, n_trials=3)
        assert store.backup(database).ok
        database.unlink()  # the database was lost, but a stale WAL of it stayed behind
        stale_wal = tmp_path / "local" / "study.db-wal"
        write_bytes(stale_wal, b"a WAL that belongs to another database")

        assert store.restore(database).ok

        assert not stale_wal.exists()
        connection = sqlite3.connect(database)
        assert connection.execute("SELECT COUNT(*) FROM trials").fetchone() == (3,)
        connection.close()
