"""A notebook user's sweeps: cells run in the kernel's loop, run again, interrupted, mixed.

Real Optuna studies in real SQLite files, the process-wide worker a notebook uses, and a
simulated Drive.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import optuna
import pytest
from optuna.trial import Trial

from drive_support import DriveSetup
from sweep_support import finished_trials, integrity, trial_states
from sweepsafe import backup_hpo_study_to_drive, resume_study
from sweepsafe.errors import SweepsafeError
from sweepsafe.sweep import SweepResult, run_sweep, study_dir_for, trial_dir
from sweepsafe.testing import FaultPlan, simulated_store
from sweepsafe.worker import get_default_worker

optuna.logging.set_verbosity(optuna.logging.WARNING)


def in_cell(body: Callable[[], Any]) -> Any:
    """Run ``body`` as a notebook cell would: on a thread whose event loop is running, with
    Ctrl-C raising ``KeyboardInterrupt`` (``asyncio.run`` would turn it into a cancel)."""

    async def cell() -> Any:
        return body()

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(cell())
    finally:
        loop.close()


def sweep(
    drive: DriveSetup, key: str, n_trials: int, objective: Callable[[Trial], float], **kwargs: Any
) -> SweepResult:
    return run_sweep(
        objective,
        output_dir=drive.local / "out",
        study_key=key,
        n_trials=n_trials,
        **{"backup_to_drive": drive.store, "flush_timeout": 60, **kwargs},
    )


def writing(drive: DriveSetup, key: str) -> Callable[[Trial], float]:
    study_dir = study_dir_for(drive.local / "out", key)

    def objective(trial: Trial) -> float:
        x = trial.suggest_float("x", -10, 10)
        (trial_dir(study_dir, trial) / "result.txt").write_text(f"{x}\n")
        return (x - 2) ** 2

    return objective


def assert_drive_holds_every_finished_trial(drive: DriveSetup, result: SweepResult) -> None:
    database = result.study_dir / "study.db"
    drive_db = drive.store.drive_path_for(database)
    assert integrity(drive_db) == "ok"
    assert finished_trials(drive_db) == finished_trials(database)
    for number, _ in finished_trials(database):
        local = result.study_dir / "trials" / f"trial-{number:05d}" / "result.txt"
        assert drive.store.drive_path_for(local).read_bytes() == local.read_bytes()


def test_a_cell_interrupted_mid_sweep_and_run_again_finishes_and_backs_up(
    drive: DriveSetup,
) -> None:
    objective = writing(drive, "interrupted")

    def interrupted(trial: Trial) -> float:
        if trial.number == 3:
            raise KeyboardInterrupt
        return objective(trial)

    with pytest.raises(KeyboardInterrupt):
        in_cell(lambda: sweep(drive, "interrupted", 8, interrupted))
    again = in_cell(lambda: sweep(drive, "interrupted", 8, objective))

    assert again.resumed_trials == 3
    assert again.backup_ok, str(again.backup_report)
    assert "complete" in str(again.backup_report)
    assert len(finished_trials(again.study_dir / "study.db")) == 8
    assert trial_states(again.study_dir / "study.db").get("RUNNING", 0) == 0
    assert_drive_holds_every_finished_trial(drive, again)


def test_parallel_trials_that_fail_or_are_pruned_are_all_counted(drive: DriveSetup) -> None:
    objective = writing(drive, "mixed")

    def mixed(trial: Trial) -> float:
        value = objective(trial)
        if trial.number % 5 == 1:
            return float("nan")  # Optuna fails the trial
        if trial.number % 5 == 2:
            raise optuna.TrialPruned
        return value

    result = in_cell(lambda: sweep(drive, "mixed", 12, mixed, n_jobs=3))
    database = result.study_dir / "study.db"
    report = result.backup_report
    assert report is not None
    assert report.ok, str(report)
    assert {state: n for state, n in report.trial_counts.items() if n} == trial_states(database)
    assert_drive_holds_every_finished_trial(drive, result)


def files_under(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and ".sweepsafe" not in path.parts
    }


def test_entries_that_change_between_file_and_folder_reach_drive_as_they_are_now(
    drive: DriveSetup,
) -> None:
    folder = drive.local / "study-x" / "trials" / "trial-00000"
    folder.mkdir(parents=True)
    (folder / "ckpt").write_bytes(b"a file first")
    (folder / "logs").mkdir()
    (folder / "logs" / "events.txt").write_bytes(b"a folder first")
    assert drive.store.backup(folder, is_directory=True).ok

    (folder / "ckpt").unlink()
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "shard-0.bin").write_bytes(b"now a folder")
    shutil.rmtree(folder / "logs")
    (folder / "logs").write_bytes(b"now a file")
    result = drive.store.backup(folder, is_directory=True)

    assert result.ok, result.error
    copy = drive.store.drive_path_for(folder)
    assert files_under(copy) == {"ckpt/shard-0.bin": b"now a folder", "logs": b"now a file"}

    shutil.rmtree(folder)
    restored = drive.store.restore(folder, is_directory=True)
    assert restored.ok, restored.error
    assert files_under(folder) == {"ckpt/shard-0.bin": b"now a folder", "logs": b"now a file"}


def lease_on_drive(drive: DriveSetup, study_dir: Path) -> dict[str, Any]:
    lease = drive.store.drive_path_for(study_dir) / ".sweepsafe" / "lease.json"
    return dict(json.loads(lease.read_text(encoding="utf-8")))


def test_a_lease_given_back_stays_given_back_after_a_cell_with_a_new_store_runs_again(
    drive: DriveSetup,
) -> None:
    """The README's cell makes a new DriveStore each time it runs; the store of an earlier
    run whose final backup did not finish must not take the lease back afterwards."""
    objective = writing(drive, "stores")
    first_store = simulated_store(drive.local, drive.drive, drive.plan_path)
    second_store = simulated_store(drive.local, drive.drive, drive.plan_path)
    try:
        drive.set_faults(FaultPlan(latency_s=0.3))
        first = in_cell(
            lambda: sweep(
                drive, "stores", 3, objective, flush_timeout=0.05, backup_to_drive=first_store
            )
        )
        assert not first.backup_ok
        drive.set_faults(FaultPlan())
        again = in_cell(lambda: sweep(drive, "stores", 5, objective, backup_to_drive=second_store))
        assert again.backup_ok, str(again.backup_report)
        assert lease_on_drive(drive, again.study_dir)["released"] is True

        anyio.run(first_store.arenew)  # the earlier store's heartbeat, due any moment

        assert lease_on_drive(drive, again.study_dir)["released"] is True
    finally:
        first_store.close()
        second_store.close()


def helper_processes() -> set[int]:
    """The simulated Drive helpers this process started that still run."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"_simulated.py" in command:
            found.add(int(entry.name))
    return found


def test_a_cell_run_again_with_a_new_store_does_not_leave_helper_processes_behind(
    drive: DriveSetup,
) -> None:
    """Each run of the README's cell makes a new DriveStore: the helper processes of the
    stores of earlier runs end instead of adding up for as long as the kernel lives."""
    objective = writing(drive, "helpers")

    def cell(n_trials: int) -> SweepResult:
        store = simulated_store(drive.local, drive.drive, drive.plan_path)
        return sweep(drive, "helpers", n_trials, objective, backup_to_drive=store)

    counts: list[int] = []
    for n_trials in range(2, 6):
        result = in_cell(partial(cell, n_trials))
        assert result.backup_ok, str(result.backup_report)
        gc.collect()
        counts.append(len(helper_processes()))

    assert counts[-1] <= counts[0], counts


def write_lease_of_another_runtime(drive: DriveSetup, study_dir: Path, *, released: bool) -> None:
    path = drive.store.drive_path_for(study_dir) / ".sweepsafe" / "lease.json"
    lease = json.loads(path.read_text(encoding="utf-8"))
    lease["owner"].update(host="other-vm", id="0ther000", pid=4242, boot_id="other-boot")
    lease["heartbeat"] = time.time()
    lease["released"] = released
    path.write_text(json.dumps(lease), encoding="utf-8")


def test_a_cell_run_again_after_the_runtime_that_took_the_study_gave_it_back_backs_it_up(
    drive: DriveSetup,
) -> None:
    """The same store, kept in a notebook variable: the lease it lost to another tab in an
    earlier run is taken afresh once that tab gave the study back."""
    objective = writing(drive, "taken")
    first = in_cell(lambda: sweep(drive, "taken", 2, objective))
    assert first.backup_ok, str(first.backup_report)

    def taken_during_the_trial(trial: Trial) -> float:
        get_default_worker().flush(30)  # this run's first backup took the lease back
        write_lease_of_another_runtime(drive, first.study_dir, released=False)
        return objective(trial)

    lost = in_cell(lambda: sweep(drive, "taken", 3, taken_during_the_trial))
    assert not lost.backup_ok
    assert "took over" in str(lost.backup_report)

    write_lease_of_another_runtime(drive, first.study_dir, released=True)
    again = in_cell(lambda: sweep(drive, "taken", 5, objective))

    assert again.backup_ok, str(again.backup_report)
    assert len(finished_trials(again.study_dir / "study.db")) == 5
    assert_drive_holds_every_finished_trial(drive, again)
    assert lease_on_drive(drive, again.study_dir)["owner"]["host"] != "other-vm"


def test_a_second_sweep_of_a_study_this_process_still_sweeps_is_refused_not_its_trials_failed(
    drive: DriveSetup,
) -> None:
    """A cell run again while the first run still sweeps in a background thread: the
    running trial is the live sweep's, not a dead runtime's, and must not be failed."""
    objective = writing(drive, "twice")
    in_trial = threading.Event()
    finish = threading.Event()

    def held_open(trial: Trial) -> float:
        if trial.number == 1:
            in_trial.set()
            finish.wait(30)
        return objective(trial)

    results: list[SweepResult] = []
    background = threading.Thread(
        target=lambda: results.append(sweep(drive, "twice", 3, held_open)), daemon=True
    )
    background.start()
    try:
        assert in_trial.wait(30)
        with pytest.raises(SweepsafeError, match="already being swept in this process"):
            in_cell(lambda: sweep(drive, "twice", 3, objective))
    finally:
        finish.set()
        background.join(60)

    (first,) = results
    assert first.backup_ok, str(first.backup_report)
    assert trial_states(first.study_dir / "study.db") == {"COMPLETE": 3}
    again = in_cell(lambda: sweep(drive, "twice", 4, objective))
    assert again.backup_ok, str(again.backup_report)


def test_a_cell_run_again_with_another_study_name_is_refused_before_a_trial_file_is_written(
    drive: DriveSetup,
) -> None:
    # Trial folders are numbered per study: a second study in the same study.db would
    # write its trial 0's files over the first study's trial 0.
    first = in_cell(lambda: sweep(drive, "k", 2, writing(drive, "k"), study_name="first"))
    assert first.backup_ok
    kept = files_under(first.study_dir / "trials")

    with pytest.raises(SweepsafeError) as raised:
        in_cell(lambda: sweep(drive, "k", 2, writing(drive, "k"), study_name="renamed"))

    message = str(raised.value)
    assert "\n" not in message
    assert "holds the study 'first', not 'renamed'" in message
    assert "study_name='first'" in message
    assert files_under(first.study_dir / "trials") == kept
    assert optuna.get_all_study_names(f"sqlite:///{first.study_dir / 'study.db'}") == ["first"]
    again = in_cell(lambda: sweep(drive, "k", 3, writing(drive, "k"), study_name="first"))
    assert len(finished_trials(again.study_dir / "study.db")) == 3


def test_resume_study_in_a_cell_run_again_leaves_the_trial_a_running_sweep_runs(
    drive: DriveSetup,
) -> None:
    """The README's own-``study.optimize`` recipe, its cell run again while the first run
    still optimizes in a background thread: trials this process runs are not a dead
    runtime's, so they are not failed under the live sweep."""
    study_dir = study_dir_for(drive.local / "out", "own")
    objective = writing(drive, "own")
    in_trial = threading.Event()
    finish = threading.Event()
    errors: list[BaseException] = []

    def held_open(trial: Trial) -> float:
        if trial.number == 1:
            in_trial.set()
            finish.wait(30)
        return objective(trial)

    def first_cell() -> None:
        try:
            study = resume_study(study_dir, drive.store)
            study.optimize(held_open, n_trials=3)
        except BaseException as exc:
            errors.append(exc)

    background = threading.Thread(target=first_cell, daemon=True)
    background.start()
    try:
        assert in_trial.wait(30)
        second = in_cell(lambda: resume_study(study_dir, drive.store))
        running = second.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        assert [trial.number for trial in running] == [1]
    finally:
        finish.set()
        background.join(60)
    assert errors == []
    assert trial_states(study_dir / "study.db") == {"COMPLETE": 3}
    report = in_cell(lambda: backup_hpo_study_to_drive(drive.local / "out", drive.store))
    assert report.ok, str(report)
