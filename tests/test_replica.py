"""The Drive copy never goes backwards and never lies, whoever writes to it.

Each scenario is one way sweeps really go wrong on Colab: a stale runtime that comes back,
two notebook tabs on one study, a study folder deleted on Drive, a damaged Drive copy,
newer local work, a tampered Drive folder, a kill while trial files lag the database.
Runtimes are real processes (``runtime_script.py``) sharing one stand-in Drive folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import optuna
import pytest

from cli_support import run_cli
from drive_support import DriveSetup, make_study, simulated_drive, write_bytes
from replica_support import (
    DriveObserver,
    RuntimeProcess,
    finished_numbers,
    plan_file,
    sampling,
)
from sweep_support import own_worker, wait_for, wait_while_running
from sweepsafe import DriveStore, SweepResult, run_sweep, study_dir_for
from sweepsafe.drive import _unit
from sweepsafe.drive._replica import Lease, Runtime, this_runtime
from sweepsafe.errors import LeaseHeldError, SweepsafeError
from sweepsafe.testing import FaultPlan, simulated_store
from sweepsafe.worker import BackupWorker

KEY = "replica"


def drive_study(drive: Path) -> Path:
    return drive / "out" / study_dir_for(Path("/x"), KEY).name


def trial_files(study_dir: Path) -> dict[str, str]:
    trials = study_dir / "trials"
    return {
        p.relative_to(trials).as_posix(): p.read_text()
        for p in sorted(trials.rglob("*"))
        if p.is_file() and ".sweepsafe" not in p.parts
    }


def test_a_stale_runtime_that_comes_back_continues_from_the_newer_drive_copy(
    tmp_path: Path,
) -> None:
    drive = tmp_path / "drive"
    plan = plan_file(tmp_path)
    observer = DriveObserver(tmp_path, drive)
    try:
        a = RuntimeProcess(tmp_path, "a", drive, plan, KEY, 5)
        assert a.finish() == 0
        b = RuntimeProcess(tmp_path, "b", drive, plan, KEY, 10)
        assert b.finish() == 0, b.stderr
        assert b.wait_for("done")["restored"] is True
        b_files = trial_files(drive_study(drive))
        assert [f for f in b_files if f.startswith("trial-00009/")]

        # A reconnects with its local disk intact (5 trials) and runs the same cell.
        db = drive_study(drive) / "study.db"
        with sampling(lambda: observer.newest_finished(db)) as seen:
            a_again = RuntimeProcess(tmp_path, "a", drive, plan, KEY, 12)
            assert a_again.finish() == 0, a_again.stderr
        done = a_again.wait_for("done")
        assert done["ok"], done["report"]
        assert done["restored"] is True  # the Drive copy was newer: it came back
        assert seen == sorted(seen)
        assert min(seen) >= 10
        study = observer.restored_study(drive_study(drive), tmp_path / "check")
        assert finished_numbers(study) == list(range(12))
        files = trial_files(drive_study(drive))
        for rel, content in b_files.items():
            assert files[rel] == content  # B's trials keep B's files
        assert files["trial-00011/model.txt"].startswith("a trial 11")
    finally:
        observer.close()


def test_a_second_runtime_is_refused_while_the_first_holds_the_study(tmp_path: Path) -> None:
    drive = tmp_path / "drive"
    plan = plan_file(tmp_path)
    release = tmp_path / "release-a"
    a = RuntimeProcess(tmp_path, "a", drive, plan, KEY, 6, "--hold", str(release))
    try:
        a.wait_for("holding")
        b = RuntimeProcess(tmp_path, "b", drive, plan, KEY, 6)
        assert b.finish() == 3
        refused = b.wait_for("refused")
        assert refused["kind"] == "LeaseHeldError"
        message = refused["message"]
        assert f"process {a.process.pid}" in message
        assert "takeover=True" in message
        assert "last heartbeat" in message
        assert not (tmp_path / "b" / "out").exists() or not list((tmp_path / "b").rglob("*.db"))
        release.touch()
        assert a.finish() == 0
        assert a.wait_for("done")["ok"]
    finally:
        release.touch()
        if a.process.poll() is None:
            a.kill()
    # The command says it in one line, and exits 2: it could not start.
    objective = tmp_path / "obj.py"
    objective.write_text("def objective(trial):\n    return trial.suggest_float('x', 0, 1)\n")
    release.unlink()
    a2 = RuntimeProcess(tmp_path, "a", drive, plan, KEY, 8, "--hold", str(release))
    try:
        a2.wait_for("holding")
        command = run_cli(
            "run",
            "obj:objective",
            "--output-dir",
            tmp_path / "c" / "out",
            "--study-key",
            KEY,
            "--drive-dir",
            drive / "out",
            "--trials",
            "8",
            cwd=tmp_path,
        )
        assert command.returncode == 2, command.stderr
        (line,) = command.stderr.splitlines()
        assert line.startswith("sweepsafe: error: ")
        assert "--takeover" in line
    finally:
        release.touch()
        a2.finish()


def test_takeover_stops_the_old_runtime_and_the_drive_copy_never_goes_backwards(
    tmp_path: Path,
) -> None:
    drive = tmp_path / "drive"
    plan = plan_file(tmp_path)
    release = tmp_path / "release-a"
    observer = DriveObserver(tmp_path, drive)
    a = RuntimeProcess(
        tmp_path, "a", drive, plan, KEY, 8, "--hold", str(release), "--hold-from", "3"
    )
    try:
        a.wait_for("holding")  # A is mid-sweep, alive, holding its lease...
        db = drive_study(drive) / "study.db"
        wait_while_running(
            a.process,
            lambda: (observer.newest_finished(db) or 0) >= 3,
            "Drive listed three finished trials",
            lambda: a.stderr,
        )
        with sampling(lambda: observer.newest_finished(db)) as seen:
            # ...and a second tab takes the study over (its user says A is gone).
            b = RuntimeProcess(tmp_path, "b", drive, plan, KEY, 5, "--takeover")
            assert b.finish() == 0, b.stderr
            release.touch()  # A wakes up and goes on with its sweep
            assert a.finish() == 0, a.stderr
        a_done = a.wait_for("done")
        assert not a_done["ok"]
        assert "took over" in a_done["report"]  # A says why its Drive copy is incomplete
        assert seen == sorted(seen), seen  # the Drive copy never lost a finished trial
        study = observer.restored_study(drive_study(drive), tmp_path / "check")
        # Drive holds B's sweep, which went on from A's three trials; A's later trials
        # stayed on A's disk.
        finished = finished_numbers(study)
        assert len(finished) == 5, finished
        assert finished[:3] == [0, 1, 2], finished
    finally:
        release.touch()
        if a.process.poll() is None:
            a.kill()
        observer.close()


def test_a_study_folder_deleted_on_drive_is_noticed_and_copied_again_in_full(
    tmp_path: Path,
) -> None:
    local = tmp_path / "local"
    drive = tmp_path / "drive"
    with simulated_store(local, drive, FaultPlan()) as store:

        def objective(trial: optuna.Trial) -> float:
            folder = study_dir_for(local / "out", trial.study.user_attrs["key"]) / "trials"
            path = folder / f"trial-{trial.number:05d}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "w.txt").write_text(f"{trial.number}")
            return trial.suggest_float("x", 0, 1)

        results = {}
        for key in ("first", "second"):  # two studies share the Drive root

            def keyed(trial: optuna.Trial, key: str = key) -> float:
                trial.study.set_user_attr("key", key)
                return objective(trial)

            results[key] = run_sweep(
                keyed, output_dir=local / "out", study_key=key, n_trials=8, backup_to_drive=store
            )
        first_drive = store.drive_path_for(results["first"].study_dir)
        second_drive = store.drive_path_for(results["second"].study_dir)
        untouched = trial_files(second_drive)
        shutil.rmtree(first_drive)  # someone deleted one study's folder on Drive

        again = run_sweep(
            lambda t: objective(t),
            output_dir=local / "out",
            study_key="first",
            n_trials=8,
            backup_to_drive=store,
        )

        assert again.backup_ok, again.backup_report
        assert trial_files(first_drive) == trial_files(results["first"].study_dir)
        assert len(trial_files(first_drive)) == 8
        assert trial_files(second_drive) == untouched
    fresh = DriveObserver(tmp_path / "fresh", drive)
    try:
        study = fresh.restored_study(first_drive, tmp_path / "fresh-disk")
        assert finished_numbers(study) == list(range(8))
        assert len(trial_files(tmp_path / "fresh-disk" / first_drive.name)) == 8
    finally:
        fresh.close()


@pytest.mark.parametrize("damage", ["zeroed header", "empty file"])
def test_restore_refuses_a_drive_copy_that_is_not_a_sound_study(
    tmp_path: Path, damage: str
) -> None:
    local = tmp_path / "local"
    drive = tmp_path / "drive"
    with simulated_store(local, drive, FaultPlan()) as store:
        result = run_sweep(
            lambda t: t.suggest_float("x", 0, 1),
            output_dir=local / "out",
            study_key=KEY,
            n_trials=4,
            backup_to_drive=store,
        )
        database = result.study_dir / "study.db"
        drive_db = store.drive_path_for(database)
        # An older sweepsafe kept only the plain copy on Drive, and it got damaged.
        shutil.rmtree(drive_db.parent / ".sweepsafe" / "history")
        if damage == "empty file":
            drive_db.write_bytes(b"")
        else:
            data = bytearray(drive_db.read_bytes())
            data[:16] = bytes(16)
            drive_db.write_bytes(bytes(data))
        damaged = drive_db.read_bytes()
        local_before = database.read_bytes()

        command = run_cli(
            "restore", database, "--local-root", local, "--drive-root", drive, cwd=tmp_path
        )
        assert command.returncode == 1, command.stdout
        (line,) = command.stderr.splitlines()
        assert str(drive_db) in line
        assert "nothing local was replaced" in line
        assert database.read_bytes() == local_before

        shutil.rmtree(local / "out")  # a new runtime, nothing local
        with pytest.raises(SweepsafeError, match="could not be restored"):
            run_sweep(
                lambda t: t.suggest_float("x", 0, 1),
                output_dir=local / "out",
                study_key=KEY,
                n_trials=6,
                backup_to_drive=store,
            )
        assert drive_db.read_bytes() == damaged  # Drive was not overwritten by a new study
        assert not database.exists()


def test_restore_keeps_a_local_checkpoint_newer_than_its_backup(tmp_path: Path) -> None:
    local = tmp_path / "local"
    drive = tmp_path / "drive"
    with simulated_store(local, drive, FaultPlan()) as store:
        study_dir = study_dir_for(local / "out", KEY)

        def objective(trial: optuna.Trial) -> float:
            folder = study_dir / "trials" / f"trial-{trial.number:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "ckpt.txt").write_text("epoch 1\n")
            return trial.suggest_float("x", 0, 1)

        run_sweep(
            objective, output_dir=local / "out", study_key=KEY, n_trials=3, backup_to_drive=store
        )
        checkpoint = study_dir / "trials" / "trial-00001" / "ckpt.txt"
        checkpoint.write_text("epoch 50\n")  # training went on after the last backup
        (study_dir / "trials" / "trial-00002" / "ckpt.txt").unlink()  # and one was lost

        command = run_cli(
            "restore",
            study_dir / "trials",
            "--local-root",
            local,
            "--drive-root",
            drive,
            cwd=tmp_path,
        )
        assert command.returncode == 0, command.stderr
        assert "kept the local" in command.stdout
        assert "trial-00001/ckpt.txt" in command.stdout
        assert checkpoint.read_text() == "epoch 50\n"
        assert (study_dir / "trials" / "trial-00002" / "ckpt.txt").read_text() == "epoch 1\n"

        # Following the advice to move a bad study.db away restores it, not the files.
        (study_dir / "study.db").rename(tmp_path / "moved-away.db")
        again = run_sweep(
            objective, output_dir=local / "out", study_key=KEY, n_trials=3, backup_to_drive=store
        )
        assert again.restored_from_drive
        assert checkpoint.read_text() == "epoch 50\n"
        assert again.backup_ok, again.backup_report
        assert store.drive_path_for(checkpoint).read_text() == "epoch 50\n"


def test_restore_never_brings_sweepsafe_state_and_tampered_records_are_ignored(
    tmp_path: Path,
) -> None:
    local = tmp_path / "local"
    drive = tmp_path / "drive"
    outside = tmp_path / "outside.txt"
    outside.write_text("not sweepsafe's to delete\n")
    with simulated_store(local, drive, FaultPlan(), mirror=True) as store:
        result = run_sweep(
            lambda t: t.suggest_float("x", 0, 1),
            output_dir=local / "out",
            study_key=KEY,
            n_trials=3,
            backup_to_drive=store,
        )
        drive_state = store.drive_path_for(result.study_dir) / ".sweepsafe"
        # A crafted record on Drive names a file far outside both folders.
        crafted = {"p": "../../../outside.txt", "s": [1, 1, 1, 1]}
        (drive_state / "manifest.jsonl").write_text(json.dumps(crafted) + "\n")
        (drive.parent / "drive-root-state").mkdir()
        shutil.rmtree(local)

        assert store.restore(local / "out", is_directory=True).ok
        assert not list((local / "out").rglob("manifest.jsonl"))
        assert not any(p.name == "identity.json" for p in local.rglob("*"))
        # The same crafted line in the local journal is ignored too.
        for journal in (local / ".sweepsafe").rglob("manifest.jsonl"):
            with journal.open("a") as file:
                file.write(json.dumps(crafted) + "\n")
        store_again = DriveStore(local, drive, mirror=True)
        try:
            assert store_again.backup(local / "out", is_directory=True).ok
        finally:
            store_again.close()
        assert outside.read_text() == "not sweepsafe's to delete\n"


def test_a_killed_runtime_never_leaves_finished_trials_without_their_files(
    tmp_path: Path,
) -> None:
    drive = tmp_path / "drive"
    # Files are slower than the database here: every file pays the latency.
    plan = plan_file(tmp_path, FaultPlan(latency_s=0.25))
    observer = DriveObserver(tmp_path, drive)
    try:
        a = RuntimeProcess(tmp_path, "a", drive, plan, KEY, 40)
        db = drive_study(drive) / "study.db"
        a.wait_for("trial", trial=0)
        wait_while_running(
            a.process,
            lambda: (observer.newest_finished(db) or 0) >= 3,
            "Drive listed three finished trials",
            lambda: a.stderr,
        )
        a.kill()  # the runtime dies as soon as Drive lists 3 finished trials
        study = observer.restored_study(drive_study(drive), tmp_path / "fresh")
        finished = finished_numbers(study)
        assert len(finished) >= 3
        files = trial_files(tmp_path / "fresh" / drive_study(drive).name)
        for number in finished:
            assert f"trial-{number:05d}/model.txt" in files
            assert f"trial-{number:05d}/metrics.json" in files
    finally:
        observer.close()


def test_a_study_killed_mid_transaction_resumes_on_the_same_disk(tmp_path: Path) -> None:
    local = tmp_path / "local"
    with simulated_store(local, tmp_path / "drive", FaultPlan()) as store:
        first = run_sweep(
            lambda t: t.suggest_float("x", 0, 1),
            output_dir=local / "out",
            study_key=KEY,
            n_trials=3,
            backup_to_drive=store,
        )
        database = first.study_dir / "study.db"
        # A runtime killed while SQLite was writing leaves a hot journal behind.
        writer = (
            "import os, signal, sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA cache_size=1')\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "c.execute('CREATE TABLE scratch (x)')\n"
            "c.executemany('INSERT INTO scratch VALUES (?)', [(b'x' * 4000,)] * 500)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        subprocess.run([sys.executable, "-c", writer, str(database)], check=False)
        journal = database.with_name("study.db-journal")
        assert journal.stat().st_size > 0

        again = run_sweep(
            lambda t: t.suggest_float("x", 0, 1),
            output_dir=local / "out",
            study_key=KEY,
            n_trials=5,
            backup_to_drive=store,
        )

        assert again.resumed_trials == 3
        assert len(finished_numbers(again.study)) == 5
        assert again.backup_ok, again.backup_report


def sweep_on(
    setup: DriveSetup,
    worker: BackupWorker,
    objective: Callable[[optuna.Trial], float],
    n_trials: int,
) -> SweepResult:
    """``run_sweep`` in this process, backed up to the simulated Drive of ``setup``."""
    return run_sweep(
        objective,
        output_dir=setup.local / "out",
        study_key=KEY,
        n_trials=n_trials,
        backup_to_drive=setup.store,
        worker=worker,
        flush_timeout=60,
    )


def test_a_sweep_runs_its_trials_while_drive_is_still_writing_its_lease(tmp_path: Path) -> None:
    """Taking the study is a Drive write: the sweep checks the lease is free and goes on,
    and the first backup writes the lease before any of the study reaches Drive."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        return trial.suggest_float("x", 0.0, 1.0)

    with (
        simulated_drive(tmp_path, FaultPlan(pause_fifo=str(gate))) as setup,
        own_worker() as worker,
    ):
        outcome: list[object] = []
        sweep = threading.Thread(
            target=lambda: outcome.append(sweep_on(setup, worker, objective, n_trials=3))
        )
        sweep.start()
        # Every Drive write waits at the gate, the lease's first of all.
        wait_for(lambda: len(ran) == 3, what="the trials, while no Drive write can land")
        study_on_drive = setup.drive / "out" / study_dir_for(setup.local / "out", KEY).name
        assert not (study_on_drive / ".sweepsafe" / "lease.json").exists()
        assert not (study_on_drive / "study.db").exists()
        setup.set_faults(FaultPlan())
        with open(gate, "wb") as writes:  # opens once a write waits at the gate
            writes.write(b"x" * 64)  # one byte for each write already waiting
            writes.flush()
            sweep.join(timeout=60)
        assert not sweep.is_alive()

    (result,) = outcome
    assert isinstance(result, SweepResult)
    assert result.backup_report is not None
    assert result.backup_report.ok, result.backup_report
    lease = Lease.from_json((study_on_drive / ".sweepsafe" / "lease.json").read_bytes())
    assert lease is not None
    assert lease.owner.is_same_process(this_runtime())
    copy = optuna.load_study(study_name=None, storage=f"sqlite:///{study_on_drive / 'study.db'}")
    assert finished_numbers(copy) == [0, 1, 2]


def test_a_study_taken_before_the_first_backup_landed_stops_the_sweep(tmp_path: Path) -> None:
    """The lease was free when the sweep started, but another runtime took the study
    before this one's lease reached Drive: the sweep stops as if refused at the start."""
    study_dir = study_dir_for(tmp_path / "local" / "out", KEY)
    study_on_drive = tmp_path / "drive" / "out" / study_dir.name
    lease_file = study_on_drive / ".sweepsafe" / "lease.json"
    other = Runtime("other", "other-host", 4242, "boot", time.time() - 60)
    ran: list[int] = []
    plan = FaultPlan(fail_paths=(("*/lease.json", "EIO"),))  # this runtime's lease write fails
    with simulated_drive(tmp_path, plan) as setup, own_worker(max_attempts=1) as worker:

        def objective(trial: optuna.Trial) -> float:
            ran.append(trial.number)
            if trial.number == 0:
                # Meanwhile another runtime takes the study, and Drive works again.
                write_bytes(lease_file, Lease(other, time.time(), time.time()).to_json())
                setup.set_faults(FaultPlan())
            else:
                wait_for(lambda: setup.store.lease_refused(study_dir), what="the refusal")
            return trial.suggest_float("x", 0.0, 1.0)

        with pytest.raises(LeaseHeldError, match=r"runtime \(host other-host, process 4242"):
            sweep_on(setup, worker, objective, n_trials=20)

    # Stopped at the end of the first trial after the refusal: trial 0 if the first
    # backup met the other lease before that trial's end, else trial 1, which waits for it.
    assert ran in ([0], [0, 1])
    theirs = Lease.from_json(lease_file.read_bytes())
    assert theirs is not None
    assert theirs.owner == other
    on_drive = [p.relative_to(study_on_drive).as_posix() for p in study_on_drive.rglob("*")]
    assert [p for p in on_drive if (study_on_drive / p).is_file()] == [".sweepsafe/lease.json"]


@pytest.mark.parametrize("pause", ["before", "after"])
def test_a_renewal_in_flight_as_the_lease_is_given_back_leaves_it_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pause: str
) -> None:
    """The worker renews leases on its own event loop while the sweep's end gives them
    back from another thread: a renewal whose Drive write lands before or after the
    release must not leave the study taken, or the next runtime waits out the lease."""
    with simulated_drive(tmp_path, lease_timeout=0.8) as setup:
        database = setup.local / "study-1" / "study.db"
        make_study(database, 2)
        assert setup.store.backup(database).ok
        real_acquire = _unit.acquire_lease
        renewing, go_on = threading.Event(), threading.Event()

        async def held_up_acquire(*args: Any, **kwargs: Any) -> Lease:
            # The renewal's own lease write, held up just before or just after it lands.
            if pause == "before":
                renewing.set()
                await anyio.to_thread.run_sync(go_on.wait)
            lease = await real_acquire(*args, **kwargs)
            if pause == "after":
                renewing.set()
                await anyio.to_thread.run_sync(go_on.wait)
            return lease

        monkeypatch.setattr(_unit, "acquire_lease", held_up_acquire)
        time.sleep(0.3)  # past a quarter of the lease timeout: the lease is due for renewal
        renewal = threading.Thread(target=anyio.run, args=(setup.store.arenew,))
        renewal.start()
        try:
            assert renewing.wait(30), "the renewal never wrote the lease"
            setup.store.release(database.parent)
        finally:
            go_on.set()
            renewal.join(30)
        assert not renewal.is_alive()

        assert not anyio.run(setup.store.aholds, database.parent)
        lease_file = setup.drive / "study-1" / ".sweepsafe" / "lease.json"
        lease = Lease.from_json(lease_file.read_bytes())
        assert lease is not None
        assert lease.released, lease
