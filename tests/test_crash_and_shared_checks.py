"""Crash and shared-study checks: what a runtime that dies mid-write leaves must still
restore, and a Drive copy must never go backwards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from drive_support import simulated_drive
from sweepsafe import DriveStore, SweepResult, run_sweep, study_dir_for, trial_dir
from sweepsafe.testing import FaultPlan, simulated_store
from sweepsafe.worker import BackupWorker


def runtime_sweep(
    local: Path, drive: Path, plan: Path, n_trials: int, files: Callable[[int], dict[str, bytes]]
) -> SweepResult:
    """One runtime's ``run_sweep`` of study "k" under ``local/out``, backed up to the
    simulated ``drive``; each trial writes ``files(trial number)`` into its folder."""
    local.mkdir(exist_ok=True)
    out = local / "out"

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)
        for name, data in files(trial.number).items():
            (trial_dir(study_dir_for(out, "k"), trial) / name).write_bytes(data)
        return x * x

    store = simulated_store(local, drive, plan)
    worker = BackupWorker()
    try:
        return run_sweep(
            objective,
            output_dir=out,
            study_key="k",
            n_trials=n_trials,
            backup_to_drive=store,
            worker=worker,
        )
    finally:
        worker.close()
        store.close()


def shared_sweep(
    store: DriveStore, storage: str, output_dir: Path, n_trials: int, **kwargs: Any
) -> SweepResult:
    """A worker of the shared study "shared" on the server ``storage``, backed up by ``store``."""
    return run_sweep(
        lambda trial: trial.suggest_float("x", 0, 1),
        output_dir=output_dir,
        study_key="shared",
        n_trials=n_trials,
        storage=storage,
        backup_to_drive=store,
        **kwargs,
    )


def _history(drive: Path) -> Path:
    return drive / "study-1" / ".sweepsafe" / "history" / "study.db"


def _finished(database: Path) -> int:
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{database}")
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def test_a_base_whose_record_never_landed_still_restores(tmp_path: Path) -> None:
    # keep_generations=1: the newest base is the plain study.db alone. The next base
    # replaces the plain copy, then its record fails to land (the runtime dies there).
    with simulated_drive(tmp_path, keep_generations=1) as setup:
        database = setup.local / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        study.tell(study.ask(), 1.0)
        assert setup.store.backup(database).ok
        study.tell(study.ask(), 1.0)
        assert setup.store.backup(database, final=True).ok  # a plain base; gen 1 thinned
        study.tell(study.ask(), 1.0)
        assert setup.store.backup(database).ok  # a patch
        study.tell(study.ask(), 1.0)
        FaultPlan(fail_paths=(("*/history/study.db/0*.json", "EIO"),)).write(setup.plan_path)
        assert not setup.store.backup(database, final=True).ok
    FaultPlan().write(setup.plan_path)

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    store = simulated_store(fresh, setup.drive, setup.plan_path, keep_generations=1)
    try:
        restored = fresh / "study-1" / "study.db"
        result = store.restore(restored)
        assert result.ok, result.error
        assert _finished(restored) == 4
    finally:
        store.close()


def test_a_new_study_does_not_replace_a_drive_copy_whose_history_cannot_be_rebuilt(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        for _ in range(4):
            study.tell(study.ask(), 1.0)
            assert setup.store.backup(database).ok
        assert setup.store.backup(database, final=True).ok
        setup.store.release(database.parent)
    # The history's base records are lost (deleted by hand); the plain copy holds 4 trials.
    for record in _history(setup.drive).glob("*.json"):
        record.unlink()

    other = tmp_path / "other"
    other.mkdir()
    store = simulated_store(other, setup.drive, setup.plan_path)
    try:
        database = other / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        study.tell(study.ask(), 1.0)
        result = store.backup(database)
        assert not result.ok, result
        assert _finished(setup.drive / "study-1" / "study.db") == 4
    finally:
        store.close()


def test_a_runtime_back_on_its_disk_keeps_the_files_of_a_trial_another_runtime_finished(
    tmp_path: Path,
) -> None:
    plan = tmp_path / "plan.json"
    FaultPlan().write(plan)
    drive = tmp_path / "drive"

    def sweep(local: Path, name: str, n_trials: int) -> optuna.Study:
        def files(number: int) -> dict[str, bytes]:
            return {"model.txt": f"{name} trial {number} finished\n".encode()}

        result = runtime_sweep(local, drive, plan, n_trials, files)
        assert result.backup_ok
        return result.study

    # Runtime A: three trials; it starts trial 3, writes part of its files and dies.
    sweep(tmp_path / "a", "A", 3)
    study_dir = study_dir_for(tmp_path / "a" / "out", "k")
    study = optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir}/study.db")
    trial = study.ask()
    (trial_dir(study_dir, trial) / "model.txt").write_text("A trial 3, unfinished\n")
    # Runtime B, on a fresh disk, restores the study and runs trials 3 to 5.
    sweep(tmp_path / "b", "B", 6)
    on_drive = drive / "out" / study_dir.name / "trials" / "trial-00003" / "model.txt"
    assert on_drive.read_text() == "B trial 3 finished\n"

    # Runtime A comes back on its own disk and goes on from Drive.
    sweep(tmp_path / "a", "A", 8)

    assert on_drive.read_text() == "B trial 3 finished\n"
    local = study_dir / "trials" / "trial-00003" / "model.txt"
    assert local.read_text() == "B trial 3 finished\n"


def test_a_shared_worker_runs_its_trials_while_drive_is_disconnected(
    tmp_path: Path, postgres_database: str
) -> None:

    plan = tmp_path / "plan.json"
    FaultPlan(disconnected=True).write(plan)
    local = tmp_path / "local"
    local.mkdir()
    store = simulated_store(local, tmp_path / "drive", plan, drive_timeout=5.0)
    try:
        result = shared_sweep(store, postgres_database, local / "out", 3, flush_timeout=10.0)
    finally:
        store.close()
    storage = optuna.storages.RDBStorage(postgres_database)
    try:
        study = optuna.load_study(study_name=result.study.study_name, storage=storage)
        assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 3
    finally:
        storage.engine.dispose()
    assert result.backup_report is not None
    assert not result.backup_report.ok


def test_a_shared_worker_with_no_trials_of_its_own_does_not_wait_for_an_export(
    tmp_path: Path, postgres_database: str
) -> None:
    import json
    import time

    plan = tmp_path / "plan.json"
    FaultPlan().write(plan)
    local, drive = tmp_path / "local", tmp_path / "drive"
    local.mkdir()
    # The sweep already has its trials; another live worker holds the study's lease.
    with simulated_store(local, drive, plan) as store:
        shared_sweep(store, postgres_database, local / "out", 2)
    now = time.time()
    owner = {"id": "other", "host": "elsewhere", "pid": 1, "boot_id": "b", "started": now}
    lease = {"format": 1, "owner": owner, "acquired": now, "heartbeat": now, "released": False}
    state = drive / "out" / study_dir_for(local / "out", "shared").name / ".sweepsafe"
    (state / "lease.json").write_text(json.dumps(lease))

    late = tmp_path / "late"
    late.mkdir()
    with simulated_store(late, drive, plan) as store:
        started = time.monotonic()
        result = shared_sweep(store, postgres_database, late / "out", 2, flush_timeout=60.0)
        waited = time.monotonic() - started
    assert result.backup_report is not None
    assert result.backup_report.ok, result.backup_report
    # Waiting for another worker's export would have taken the whole flush timeout.
    assert waited < 60.0 / 2


def test_trial_files_a_restore_did_not_bring_back_come_back_at_the_next_start(
    tmp_path: Path,
) -> None:
    plan = tmp_path / "plan.json"
    FaultPlan().write(plan)
    drive = tmp_path / "drive"

    def sweep(local: Path, n_trials: int) -> None:
        runtime_sweep(local, drive, plan, n_trials, lambda number: {"ckpt.bin": b"w" * 1000})

    sweep(tmp_path / "a", 3)
    # A new runtime restores the study, but Drive fails to hand over the trials' files
    # (as when the runtime is killed between the database and the trial folders).
    FaultPlan(fail_read_paths=(("*/trials/*", "EIO"),)).write(plan)
    sweep(tmp_path / "b", 3)
    FaultPlan().write(plan)

    sweep(tmp_path / "b", 5)

    study_dir = study_dir_for(tmp_path / "b" / "out", "k")
    missing = [
        n for n in range(5) if not (study_dir / "trials" / f"trial-{n:05d}" / "ckpt.bin").exists()
    ]
    assert missing == []


def test_a_shared_worker_whose_final_export_outlasted_its_wait_gives_the_lease_back(
    tmp_path: Path, postgres_database: str
) -> None:
    import json
    import time

    plan = tmp_path / "plan.json"
    FaultPlan(latency_s=2.0).write(plan)  # a slow Drive: the export outlasts the wait
    local = tmp_path / "local"
    local.mkdir()
    store = simulated_store(local, tmp_path / "drive", plan, lease_timeout=10.0)
    worker = BackupWorker()
    try:
        result = shared_sweep(
            store, postgres_database, local / "out", 2, worker=worker, flush_timeout=3.0
        )
        assert result.backup_report is not None
        assert result.backup_report.timed_out
        FaultPlan().write(plan)
        assert not worker.flush(60.0).timed_out  # the export goes on, and ends
        # The export ran after the sweep closed the server's connections: close its own.
        storage = result.study._storage
        getattr(storage, "_backend", storage).engine.dispose()
        time.sleep(3.5)  # a renewal period (lease_timeout / 4) and more
        name = study_dir_for(local / "out", "shared").name
        lease = json.loads(
            (tmp_path / "drive" / "out" / name / ".sweepsafe" / "lease.json").read_text()
        )
        # The export ended: the lease is given back, so another worker may export.
        assert lease["released"], lease
    finally:
        worker.close()
        store.close()
