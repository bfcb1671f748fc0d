"""Attacks on the backup side: entries or versions the end-of-sweep report calls complete
while Drive lacks them. Real Optuna studies in real SQLite files; only Drive is a stand-in."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest

from drive_support import simulated_drive
from sweepsafe import run_sweep, study_dir_for

optuna.logging.set_verbosity(optuna.logging.WARNING)


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
                result = run_sweep(
                    objective,
                    output_dir=setup.local,
                    study_key="wal",
                    n_trials=n_trials,
                    backup_to_drive=setup.store,
                    flush_timeout=60,
                )
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
        result = run_sweep(
            lambda trial: 1.0,
            output_dir=setup.local,
            study_key="names",
            n_trials=1,
            backup_to_drive=setup.store,
            flush_timeout=60,
        )
        report = result.backup_report
        assert report is not None
        copied = (setup.drive / study_dir.name / name).is_file()
        named = any(name.split("/")[0] in line for line in (*report.skipped, str(report)))
        assert copied or (named and not report.ok), str(report)


def test_a_failed_trial_leaves_no_lag_once_the_drive_copy_is_complete(tmp_path: Path) -> None:
    # A trial returning NaN is FAIL: it never counts as finished in the Drive copy, so it
    # must not count as finished locally either, or the progress says "1 behind" forever.
    from sweepsafe.backup import BackupProgress

    progress = BackupProgress()
    with simulated_drive(tmp_path) as setup:
        result = run_sweep(
            lambda trial: float("nan") if trial.number == 1 else 1.0,
            output_dir=setup.local,
            study_key="fail",
            n_trials=3,
            backup_to_drive=setup.store,
            flush_timeout=60,
            progress=progress,
        )
    assert result.backup_ok, result.backup_report
    assert progress.trials_backed_up == 2
    assert progress.lag == 0, (progress.trials_finished, progress.trials_backed_up)


def test_a_sweep_on_a_closed_worker_is_not_reported_complete(tmp_path: Path) -> None:
    # A worker of the user's own, closed after a first sweep (a `with BackupWorker()`
    # cell), drops every backup of the second: its report must not say complete.
    from sweepsafe.worker import BackupWorker

    with simulated_drive(tmp_path) as setup:
        worker = BackupWorker()
        first = run_sweep(
            lambda trial: 1.0,
            output_dir=setup.local,
            study_key="closed",
            n_trials=2,
            backup_to_drive=setup.store,
            flush_timeout=60,
            worker=worker,
        )
        assert first.backup_ok, first.backup_report
        worker.close()
        second = run_sweep(
            lambda trial: 1.0,
            output_dir=setup.local,
            study_key="closed",
            n_trials=5,
            backup_to_drive=setup.store,
            flush_timeout=60,
            worker=worker,
        )
        copy = sqlite3.connect(setup.drive / second.study_dir.name / "study.db")
        try:
            on_drive = copy.execute("SELECT count(*) FROM trials").fetchone()[0]
        finally:
            copy.close()
        assert on_drive == 5 or not second.backup_ok, str(second.backup_report)


def test_the_progress_callback_costs_no_more_after_many_trials(tmp_path: Path) -> None:
    # `sweepsafe run` calls its progress bar at every trial, on the trial's thread; the
    # worker keeps one target per trial folder. The call must not grow with the trials
    # already run (it did: a snapshot of every target, under the lock submit() takes).
    import statistics
    import time

    from sweepsafe.backup import BackupProgress
    from sweepsafe.cli._progress import SweepProgressBar
    from sweepsafe.worker import BackupWorker

    study = optuna.create_study()
    study.optimize(lambda trial: 1.0, n_trials=1)
    trial = study.trials[0]

    def call_cost(targets: int) -> float:
        with BackupWorker() as worker:
            for number in range(targets):
                worker.submit(tmp_path / f"trial-{number:05d}", lambda p, d: True)
            worker.flush(60)
            bar = SweepProgressBar(
                total=None, progress=BackupProgress(), worker=worker, enabled=False
            )
            times = []
            for _ in range(7):
                started = time.perf_counter()
                bar(study, trial)
                times.append(time.perf_counter() - started)
            return statistics.median(times)

    few, many = call_cost(10), call_cost(4_000)
    assert many < max(10 * few, 0.002), (few, many)


_CTRL_C_SCRIPT = """\
import sys
from pathlib import Path

import optuna

from sweepsafe import run_sweep
from sweepsafe.testing import FaultPlan, simulated_store

optuna.logging.set_verbosity(optuna.logging.ERROR)
local, drive, plan = (Path(arg) for arg in sys.argv[1:4])
store = simulated_store(local, drive, plan)


def objective(trial):
    if trial.number == 1:
        FaultPlan(hang=True).write(plan)
        print("drive hung", flush=True)
    return 1.0


run_sweep(objective, output_dir=local, study_key="k", n_trials=2, backup_to_drive=store,
          flush_timeout=120)
"""


def test_ctrl_c_during_the_final_flush_of_run_sweep_does_not_wait_again_at_exit(
    tmp_path: Path,
) -> None:
    # The user pressed Ctrl-C to stop waiting for a hung Drive: the exit hook must not
    # then wait its own 30 s for the same backups, silently.
    import os
    import signal
    import subprocess
    import sys
    import time

    from sweepsafe.testing import FaultPlan

    local, drive, plan = tmp_path / "local", tmp_path / "drive", tmp_path / "plan.json"
    local.mkdir()
    FaultPlan().write(plan)
    script = tmp_path / "sweep.py"
    script.write_text(_CTRL_C_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, str(script), str(local), str(drive), str(plan)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "drive hung"
        time.sleep(2.0)  # the final flush is waiting for the hung Drive
        interrupted = time.monotonic()
        child.send_signal(signal.SIGINT)
        _out, err = child.communicate(timeout=90)
        took = time.monotonic() - interrupted
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert "KeyboardInterrupt" in err
    assert took < 15.0, (took, err[-2000:])
