"""The backup callbacks and the end-of-sweep backup, with real studies and a simulated Drive."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest

from drive_support import DriveSetup, simulated_drive
from sweep_support import finished_trials, integrity, own_worker
from sweepsafe import SweepResult, run_sweep, study_dir_for, trial_dir
from sweepsafe.backup import (
    BackupProgress,
    backup_hpo_study_to_drive,
    create_incremental_backup_callback,
    create_study_db_backup_callback,
    find_study_dir,
)
from sweepsafe.errors import BackupFailed, StudyNotFoundError
from sweepsafe.testing import FaultPlan
from sweepsafe.worker import BackupWorker

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_study(study_dir: Path, n_trials: int) -> optuna.Study:
    study_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=f"sqlite:///{study_dir / 'study.db'}", study_name=study_dir.name
    )
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=n_trials)
    return study


class GatedDrive:
    """A backup callable that blocks until released, recording each call."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[Path, bool]] = []
        self.started = threading.Event()

    def __call__(self, path: Path, is_directory: bool) -> bool:
        self.calls.append((path, is_directory))
        self.started.set()
        self.release.wait(30)
        return True


def test_disabled_or_missing_backup_gives_a_callback_that_does_nothing(tmp_path: Path) -> None:
    with own_worker() as worker:
        study = make_study(tmp_path / "study-a", 1)
        trial = study.trials[0]
        drive = GatedDrive()
        for callback in (
            create_incremental_backup_callback(
                tmp_path, drive, backup_enabled=False, worker=worker
            ),
            create_study_db_backup_callback(tmp_path / "study.db", None, worker=worker),
        ):
            callback(study, trial)
        assert worker.flush(timeout=5).ok
        assert drive.calls == []
        assert worker.stats().submitted == 0


def test_callback_for_a_drive_path_logs_once_and_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SWEEPSAFE_DRIVE_ROOTS", str(tmp_path / "drive"))
    study = make_study(tmp_path / "study-a", 1)
    drive = GatedDrive()
    with own_worker() as worker, caplog.at_level(logging.INFO, logger="sweepsafe"):
        callback = create_study_db_backup_callback(
            tmp_path / "drive" / "study.db", drive, worker=worker
        )
        for _ in range(3):
            callback(study, study.trials[0])
        assert worker.stats().submitted == 0
    assert caplog.text.count("already on Google Drive") == 1
    assert drive.calls == []


def test_callback_only_hands_over_while_drive_hangs(tmp_path: Path) -> None:
    """A trial's callback returns at once even though every copy blocks."""
    study = make_study(tmp_path / "study-a", 1)
    drive = GatedDrive()
    with own_worker() as worker:
        callback = create_incremental_backup_callback(
            tmp_path / "study-a" / "trials", drive, is_directory=True, worker=worker
        )
        callback(study, study.trials[0])
        assert drive.started.wait(10)
        durations = []
        for _ in range(200):
            started = time.perf_counter()
            callback(study, study.trials[0])
            durations.append(time.perf_counter() - started)
        stats = worker.stats()
        assert stats.submitted == 201
        assert stats.started == 1  # one copy running, one waiting, the rest coalesced
        assert stats.coalesced == 199
        drive.release.set()
        assert worker.flush(timeout=10).ok
        assert drive.calls[0] == (tmp_path / "study-a" / "trials", True)
        assert len(drive.calls) == 2  # exactly one rerun after the running copy
        # No copy ran on the trial's thread: the callback never waited on the gate.
        assert max(durations) < 5


def test_callback_never_raises_into_optuna(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study = make_study(tmp_path / "study-a", 1)

    class BrokenWorker:
        def submit(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("worker is gone")

    callback = create_study_db_backup_callback(
        tmp_path / "study-a" / "study.db",
        GatedDrive(),
        worker=BrokenWorker(),  # type: ignore[arg-type]
    )
    with caplog.at_level(logging.WARNING, logger="sweepsafe"):
        callback(study, study.trials[0])
        callback(study, study.trials[0])
    assert caplog.text.count("worker is gone") == 1


def test_failing_user_callable_never_reaches_optuna(tmp_path: Path) -> None:
    def broken(path: Path, is_directory: bool) -> bool:
        raise OSError(5, "Input/output error", str(path))

    database = tmp_path / "study-a" / "study.db"
    with own_worker(max_attempts=2) as worker:
        study = optuna.create_study(
            storage=f"sqlite:///{_mkparent(database)}", study_name="study-a"
        )
        callback = create_study_db_backup_callback(database, broken, worker=worker)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5, callbacks=[callback])
        report = worker.flush(timeout=10)
    assert len(study.trials) == 5
    assert not report.ok
    assert "Input/output error" in str(report)


def test_progress_tracks_how_far_drive_is_behind(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    progress = BackupProgress()
    database = drive.local / "study-a" / "study.db"
    study = optuna.create_study(storage=f"sqlite:///{_mkparent(database)}", study_name="study-a")
    callback = create_study_db_backup_callback(
        database, drive.store, worker=private_worker, progress=progress
    )
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=6, callbacks=[callback])
    assert private_worker.flush(timeout=20).ok
    assert progress.trials_finished == 6
    assert progress.trials_backed_up == 6
    assert progress.lag == 0


def test_find_study_dir_picks_the_only_or_the_newest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(StudyNotFoundError, match="No study folder"):
        find_study_dir(tmp_path)
    make_study(tmp_path / "study-old", 1)
    assert find_study_dir(tmp_path) == tmp_path / "study-old"
    make_study(tmp_path / "study-new", 1)
    old = tmp_path / "study-old" / "study.db"
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    with caplog.at_level(logging.INFO, logger="sweepsafe"):
        assert find_study_dir(tmp_path) == tmp_path / "study-new"
    assert "changed last" in caplog.text
    assert find_study_dir(tmp_path, tmp_path / "study-old") == tmp_path / "study-old"
    with pytest.raises(StudyNotFoundError, match=r"holds no study\.db"):
        find_study_dir(tmp_path, tmp_path / "nothing-here")


def test_end_of_sweep_backup_copies_database_and_folders(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    study_dir = drive.local / "out" / "study-x"
    make_study(study_dir, 7)
    (study_dir / "trials" / "trial-00000").mkdir(parents=True)
    (study_dir / "trials" / "trial-00000" / "model.bin").write_bytes(os.urandom(5000))
    (study_dir / "notes.txt").write_text("baseline run\n")
    report = backup_hpo_study_to_drive(
        drive.local / "out", drive.store, worker=private_worker, timeout=30
    )
    assert report.ok, str(report)
    assert report.trial_counts == {"COMPLETE": 7}
    drive_db = drive.store.drive_path_for(study_dir / "study.db")
    assert integrity(drive_db) == "ok"
    assert finished_trials(drive_db) == finished_trials(study_dir / "study.db")
    for name in ("trials/trial-00000/model.bin", "notes.txt"):
        assert (
            drive.store.drive_path_for(study_dir / name).read_bytes()
            == (study_dir / name).read_bytes()
        )
    assert {t.target for t in report.targets} == {
        study_dir / "study.db",
        study_dir / "trials",
        study_dir / "notes.txt",
    }
    assert "Drive copy complete" in str(report)
    assert "7 trials" in str(report)
    # A second call copies no folder file again.
    again = backup_hpo_study_to_drive(
        drive.local / "out", drive.store, worker=private_worker, timeout=30
    )
    trials_report = next(t for t in again.targets if t.target == study_dir / "trials")
    assert trials_report.last_result is not None
    assert trials_report.last_result.files_copied == 0  # type: ignore[attr-defined]


def test_end_of_sweep_backup_on_a_drive_study_only_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drive = tmp_path / "drive"
    monkeypatch.setenv("SWEEPSAFE_DRIVE_ROOTS", str(drive))
    make_study(drive / "out" / "study-y", 2)
    before = sorted(p.relative_to(drive) for p in drive.rglob("*"))
    drive_calls = GatedDrive()
    drive_calls.release.set()
    with own_worker() as worker:
        report = backup_hpo_study_to_drive(drive / "out", drive_calls, worker=worker, timeout=30)
        assert worker.stats().submitted == 0
    assert report.on_drive
    assert report.ok, str(report)
    assert report.trial_counts == {"COMPLETE": 2}
    assert drive_calls.calls == []
    assert sorted(p.relative_to(drive) for p in drive.rglob("*")) == before


def test_end_of_sweep_backup_reports_a_failing_drive_by_name(tmp_path: Path) -> None:
    plan = FaultPlan(enospc=True)
    with simulated_drive(tmp_path, plan) as drive, own_worker() as worker:
        study_dir = drive.local / "out" / "study-z"
        make_study(study_dir, 2)
        report = backup_hpo_study_to_drive(
            drive.local / "out", drive.store, worker=worker, timeout=30
        )
        assert not report.ok
        assert "study.db" in str(report)
        assert "space" in str(report).lower()
        with pytest.raises(BackupFailed, match=r"study\.db"):
            report.raise_for_failures()


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class HalfMadeBackend:
    """A user's own backend that forgot most of the protocol."""

    local_root = Path("/tmp")

    async def abackup(self, path: Path, is_directory: bool = False) -> None:
        raise AssertionError("never called: it is refused when the callback is made")


def test_a_backend_lacking_part_of_the_protocol_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(TypeError) as refused:
        create_incremental_backup_callback(tmp_path, HalfMadeBackend())  # type: ignore[arg-type]
    message = str(refused.value)
    assert "HalfMadeBackend(...) has abackup but lacks" in message
    assert "arestore, averify, ahistory, aacquire, aholds, arenew, arelease" in message
    with pytest.raises(TypeError, match="backup_to_drive must be a DriveStore"):
        create_incremental_backup_callback(tmp_path, "/content/drive")  # type: ignore[arg-type]


def sweep_on(
    setup: DriveSetup,
    key: str,
    n_trials: int,
    objective: Callable[[optuna.Trial], float] = lambda trial: 1.0,
    **kwargs: Any,
) -> SweepResult:
    """``run_sweep`` of study ``key`` on the simulated Drive, its report awaited for 60 s."""
    return run_sweep(
        objective,
        output_dir=setup.local,
        study_key=key,
        n_trials=n_trials,
        backup_to_drive=setup.store,
        flush_timeout=60,
        **kwargs,
    )


def test_a_wal_database_in_the_study_folder_reaches_drive_with_rows_written_since_its_last_backup(
    tmp_path: Path,
) -> None:
    # A logger keeps its WAL-mode database open across two sweeps of one notebook kernel:
    # the rows of the second sweep sit in the -wal file, the main file is unchanged.
    with simulated_drive(tmp_path) as setup:
        study_dir = study_dir_for(setup.local, "wal")
        (study_dir / "logs").mkdir(parents=True)
        metrics = sqlite3.connect(study_dir / "logs" / "metrics.db", check_same_thread=False)
        try:
            metrics.execute("PRAGMA journal_mode=WAL").fetchall()
            metrics.execute("CREATE TABLE m (trial INTEGER)")
            metrics.commit()

            def objective(trial: optuna.Trial) -> float:
                metrics.execute("INSERT INTO m VALUES (?)", (trial.number,))
                metrics.commit()
                return 1.0

            for n_trials in (2, 4):
                result = sweep_on(setup, "wal", n_trials, objective)
                assert result.backup_ok, result.backup_report
            copy = sqlite3.connect(setup.drive / study_dir.name / "logs" / "metrics.db")
            try:
                on_drive = copy.execute("SELECT count(*) FROM m").fetchone()[0]
            finally:
                copy.close()
            # The report said complete: Drive must hold the 4 rows the local database holds.
            assert on_drive == 4
        finally:
            metrics.close()


@pytest.mark.parametrize("name", [".hydra/config.yaml", "run-journal/notes.txt", "train.log-wal"])
def test_every_entry_of_the_study_folder_reaches_drive_or_is_named(
    tmp_path: Path, name: str
) -> None:
    # Only sweepsafe's own folder and the side files of a database beside them may be
    # left out silently; a user's dot folder or a name ending in -journal is their data.
    with simulated_drive(tmp_path) as setup:
        study_dir = study_dir_for(setup.local, "names")
        entry = study_dir / name
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text("the user's own file")
        result = sweep_on(setup, "names", 1)
        report = result.backup_report
        assert report is not None
        copied = (setup.drive / study_dir.name / name).is_file()
        named = any(name.split("/")[0] in line for line in (*report.skipped, str(report)))
        assert copied or (named and not report.ok), str(report)


def test_a_failed_trial_leaves_no_lag_once_the_drive_copy_is_complete(tmp_path: Path) -> None:
    # A trial returning NaN is FAIL: it never counts as finished in the Drive copy, so it
    # must not count as finished locally either, or the progress says "1 behind" forever.
    progress = BackupProgress()
    with simulated_drive(tmp_path) as setup:
        result = sweep_on(
            setup,
            "fail",
            3,
            lambda trial: float("nan") if trial.number == 1 else 1.0,
            progress=progress,
        )
    assert result.backup_ok, result.backup_report
    assert progress.trials_backed_up == 2
    assert progress.lag == 0, (progress.trials_finished, progress.trials_backed_up)


def test_a_sweep_on_a_closed_worker_is_not_reported_complete(tmp_path: Path) -> None:
    # A worker of the user's own, closed after a first sweep (a `with BackupWorker()`
    # cell), drops every backup of the second: its report must not say complete.
    with simulated_drive(tmp_path) as setup:
        worker = BackupWorker()
        first = sweep_on(setup, "closed", 2, worker=worker)
        assert first.backup_ok, first.backup_report
        worker.close()
        second = sweep_on(setup, "closed", 5, worker=worker)
        copy = sqlite3.connect(setup.drive / second.study_dir.name / "study.db")
        try:
            on_drive = copy.execute("SELECT count(*) FROM trials").fetchone()[0]
        finally:
            copy.close()
        assert on_drive == 5 or not second.backup_ok, str(second.backup_report)


def test_a_check_cut_short_by_the_flush_timeout_says_the_backups_used_it(tmp_path: Path) -> None:
    # The backups finished just before the end-of-sweep timeout: the check of the copy that
    # follows had nearly nothing left, and must say so rather than blame Drive for "0 s".
    from sweepsafe.backup import _verify

    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study" / "study.db"
        make_study(database.parent, 2)
        assert setup.store.backup(database)
        error = _verify(setup.store, database, 0.0, of=300.0).error
    assert error == (
        "Google Drive did not answer in the 0.0 s the backups left of the 300 s timeout "
        "while checking the copy"
    )


def test_files_deleted_on_drive_are_copied_again_by_the_end_of_the_next_sweep(
    tmp_path: Path,
) -> None:
    # A hand, or a cleanup rule, removed files from the Drive copy after they were backed
    # up. The end of the next sweep, which says whether the Drive copy is complete, must
    # not trust its own records of what it copied.
    with simulated_drive(tmp_path) as setup:
        study_dir = study_dir_for(setup.local, "gone")

        def objective(trial: optuna.Trial) -> float:
            (trial_dir(study_dir, trial) / "weights.bin").write_bytes(b"w" * 1000)
            return 1.0

        study_dir.mkdir(parents=True)
        (study_dir / "config.yaml").write_text("lr: 0.1\n")
        assert sweep_on(setup, "gone", 2, objective).backup_ok
        on_drive = setup.drive / study_dir.name
        weights = on_drive / "trials" / "trial-00001" / "weights.bin"
        weights.unlink()
        (on_drive / "config.yaml").unlink()

        again = sweep_on(setup, "gone", 2, objective)  # nothing left to run: the end only

        assert again.backup_ok, again.backup_report
        assert weights.read_bytes() == b"w" * 1000
        assert (on_drive / "config.yaml").read_text() == "lr: 0.1\n"
