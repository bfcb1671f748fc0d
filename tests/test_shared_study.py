"""A sweep shared by several workers through a real PostgreSQL server, backed up to Drive.

Four worker processes run one study in a server the tests start themselves; one is
killed mid-trial, another while it exports. Only the Drive is simulated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy

from replica_support import DriveObserver, finished_numbers
from sweep_support import wait_while_running
from sweepsafe import run_sweep, study_dir_for
from sweepsafe.errors import SweepsafeError
from sweepsafe.testing import FaultPlan

WORKER = Path(__file__).with_name("shared_worker.py")
WAIT_S = 120.0
KEY = "shared"


class Worker:
    """``shared_worker.py`` in a session of its own; its events as they come."""

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        url: str,
        plan: Path,
        trials: int,
        seconds: float = 0.4,
        *options: str,
        gated: bool = False,
    ) -> None:
        """``gated``: the worker's first trial ends only at :meth:`end_held_trial`."""
        self.name = name
        self.local = tmp_path / name
        self.export = self.local / "out" / drive_study(tmp_path).name / "study.db"
        self.gate = tmp_path / f"{name}.gate"
        if gated:
            os.mkfifo(self.gate)
            options = (*options, "--gate", str(self.gate))
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        command = [sys.executable, str(WORKER), "--url", url, "--local", str(self.local)]
        command += ["--drive", str(tmp_path / "drive"), "--plan", str(plan)]
        command += ["--trials", str(trials), "--name", name, "--trial-seconds", str(seconds)]
        command += options
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.stderr = ""
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not line.endswith("\n"):
                break  # the worker was killed in the middle of writing this line
            with self._changed:
                self.events.append(json.loads(line))
                self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()

    def wait_for(self, event: str) -> dict[str, Any] | None:
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    any(e["event"] == event for e in self.events) or self.process.poll() is not None
                ),
                WAIT_S,
            )
            return next((e for e in self.events if e["event"] == event), None)

    def end_held_trial(self) -> None:
        with open(self.gate, "w"):  # the worker's read of the named pipe returns
            pass

    def wait_for_export(self) -> None:
        """Until this worker has written an export of the study, locally."""
        wait_while_running(self.process, self.export.exists, "an export", lambda: self.stderr)

    def done(self) -> dict[str, Any]:
        """The worker's last event: whether its report is ok, and the report."""
        return next(e for e in self.events if e["event"] == "done")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.finish()

    def finish(self) -> int:
        code = self.process.wait(timeout=WAIT_S)
        for thread in self._threads:
            thread.join(timeout=WAIT_S)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return code


def plan(tmp_path: Path, latency: float = 0.0) -> Path:
    path = tmp_path / "plan.json"
    FaultPlan(latency_s=latency).write(path)
    return path


def drive_study(tmp_path: Path) -> Path:
    return tmp_path / "drive" / "out" / study_dir_for(Path("/x"), KEY).name


def server_finished(url: str) -> list[int]:
    """The numbers of the study's COMPLETE trials in the server."""
    complete = optuna.trial.TrialState.COMPLETE
    return sorted(t.number for t in server_trials(url) if t.state == complete)


def exported_finished(tmp_path: Path) -> list[int]:
    """The finished trials of the study's export on Drive, restored as a user would."""
    observer = DriveObserver(tmp_path, tmp_path / "drive")
    try:
        return finished_numbers(observer.restored_study(drive_study(tmp_path), tmp_path / "check"))
    finally:
        observer.close()


def has_heartbeat(url: str, number: int) -> bool:
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            found = connection.execute(
                sqlalchemy.text(
                    "SELECT COUNT(*) FROM trial_heartbeats AS h JOIN trials AS t "
                    "ON h.trial_id = t.trial_id WHERE t.number = :number"
                ),
                {"number": number},
            ).scalar()
    finally:
        engine.dispose()
    return bool(found)


def other_sessions(url: str) -> int:
    """How many sessions other than this query's are connected to the database at ``url``."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            count = connection.execute(
                sqlalchemy.text(
                    "SELECT COUNT(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar()
    finally:
        engine.dispose()
    return int(count or 0)


def server_trials(url: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url)
    try:
        (summary,) = optuna.get_all_study_summaries(storage)
        return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


@pytest.mark.timeout(300)
def test_four_workers_one_killed_mid_trial_finish_the_sweep_and_drive_holds_it(
    tmp_path: Path, postgres_database: str
) -> None:
    # Long enough that the others start trials after the grace period, when they find
    # the dead worker's trial stale.
    n_trials = 30
    workers = [
        Worker(tmp_path, f"w{i}", postgres_database, plan(tmp_path), n_trials) for i in range(4)
    ]
    victim = workers[1]
    started = victim.wait_for("trial_started")
    assert started is not None, victim.stderr
    # Optuna finds a stale trial by its heartbeat, recorded just after the trial starts
    # (a worker killed before its first heartbeat leaves a trial it never sees as stale).
    wait_while_running(
        victim.process,
        lambda: has_heartbeat(postgres_database, started["trial"]),
        "the trial's first heartbeat",
        lambda: victim.stderr,
    )
    victim.kill()  # mid-trial: its trial is left RUNNING in the server
    codes = [worker.finish() for worker in workers if worker is not victim]
    assert codes == [0, 0, 0], [w.stderr for w in workers]

    trials = server_trials(postgres_database)
    by_number = {t.number: t for t in trials}
    killed = by_number[started["trial"]]
    assert killed.state == optuna.trial.TrialState.FAIL  # found stale by its heartbeat
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retried  # and retried by another worker
    assert [t.number for t in trials if t.state == optuna.trial.TrialState.FAIL] == [
        killed.number
    ]  # no live worker's trial was ever failed
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert n_trials <= len(finished) <= n_trials + 3  # each worker may overshoot by one

    # Every finished trial's folder is on Drive, backed up by the worker that ran it.
    for trial in finished:
        model = drive_study(tmp_path) / "trials" / f"trial-{trial.number:05d}" / "model.txt"
        assert model.read_text().split()[1] == str(trial.number)
    # The export on Drive is a sound SQLite study holding every finished trial.
    assert exported_finished(tmp_path) == sorted(t.number for t in finished)


@pytest.mark.timeout(300)
def test_a_trial_that_ends_while_the_lease_holder_exports_for_the_last_time_reaches_drive(
    tmp_path: Path, postgres_database: str
) -> None:
    # Drive takes a while per file, so the holder's last export is on its way for seconds.
    fault_plan = plan(tmp_path, latency=0.5)
    rarely = ("--export-interval", "600")  # the only export is each worker's last
    holder = Worker(tmp_path, "w0", postgres_database, fault_plan, 3, 0.2, *rarely, gated=True)
    assert holder.wait_for("trial_started") is not None, holder.stderr  # it holds the lease
    late = Worker(tmp_path, "w1", postgres_database, fault_plan, 3, 0.2, *rarely, gated=True)
    started = late.wait_for("trial_started")
    assert started is not None, late.stderr
    holder.end_held_trial()  # the holder may now end its trials
    # The holder ends its three trials and exports the study, without the late trial.
    holder.wait_for_export()
    late.end_held_trial()  # while that export is on its way to Drive
    assert [holder.finish(), late.finish()] == [0, 0], [holder.stderr, late.stderr]

    assert late.done()["ok"], late.done()["report"]
    finished = server_finished(postgres_database)
    assert started["trial"] in finished
    assert exported_finished(tmp_path) == finished  # the late trial too


@pytest.mark.timeout(300)
def test_workers_that_end_while_the_holder_exports_take_its_lease_in_turn_and_all_say_complete(
    tmp_path: Path, postgres_database: str
) -> None:
    # Three workers wait for the holder's lease at once; as it comes free, they may all
    # take it in the same moment (Drive has no conditional write): the ones that lose
    # must wait for the winner's export rather than report a failed one.
    fault_plan = plan(tmp_path, latency=0.5)
    rarely = ("--export-interval", "600")

    def worker(index: int) -> Worker:
        return Worker(
            tmp_path, f"w{index}", postgres_database, fault_plan, 4, 0.2, *rarely, gated=True
        )

    holder = worker(0)
    assert holder.wait_for("trial_started") is not None, holder.stderr  # it holds the lease
    workers = [holder, *(worker(index) for index in (1, 2, 3))]
    for late in workers[1:]:
        assert late.wait_for("trial_started") is not None, late.stderr
    holder.end_held_trial()
    holder.wait_for_export()
    for late in workers[1:]:
        late.end_held_trial()
    assert [w.finish() for w in workers] == [0] * 4, [w.stderr for w in workers]

    for each in workers:
        assert each.done()["ok"], (each.name, each.done()["report"])
    assert exported_finished(tmp_path) == server_finished(postgres_database)


@pytest.mark.timeout(300)
def test_a_worker_that_ends_first_waits_for_the_holders_next_export_to_hold_its_trials(
    tmp_path: Path, postgres_database: str
) -> None:
    fault_plan = plan(tmp_path, latency=0.1)
    every = ("--export-interval", "2")
    # Its held trial never ends: the holder sweeps on until it is killed.
    holder = Worker(tmp_path, "w0", postgres_database, fault_plan, 60, 0.2, *every, gated=True)
    assert holder.wait_for("trial_started") is not None, holder.stderr  # it holds the lease
    # This worker stops once the study holds two finished trials; the holder sweeps on.
    short = Worker(tmp_path, "w1", postgres_database, fault_plan, 2, 0.2, *every)
    assert short.finish() == 0, short.stderr
    try:
        assert holder.process.poll() is None  # still sweeping: it never gave the lease back
        done = short.done()
        assert done["ok"], done["report"]
        assert "another worker's export on Drive holds this worker's trials" in done["report"]
        mine = [e["trial"] for e in short.events if e["event"] == "trial"]
        assert mine
        assert set(mine) <= set(exported_finished(tmp_path))
    finally:
        holder.kill()


@pytest.mark.timeout(300)
def test_a_worker_whose_trials_no_export_holds_in_time_says_its_backup_is_incomplete(
    tmp_path: Path, postgres_database: str
) -> None:
    rarely = ("--export-interval", "600")
    # Its held trial never ends: the holder sweeps on until it is killed.
    holder = Worker(tmp_path, "w0", postgres_database, plan(tmp_path), 60, 0.2, *rarely, gated=True)
    assert holder.wait_for("trial_started") is not None, holder.stderr  # it holds the lease
    short = Worker(
        tmp_path, "w1", postgres_database, plan(tmp_path), 2, 0.2, *rarely, "--flush-timeout", "2"
    )
    assert short.finish() == 0, short.stderr
    holder.kill()
    done = short.done()
    assert not done["ok"]
    assert "INCOMPLETE" in done["report"]
    assert "does not hold this worker's last trials yet" in done["report"]


def test_an_export_loaded_into_a_server_leaves_no_export_time_of_the_old_server(
    tmp_path: Path, postgres_database: str
) -> None:
    # A worker compares the export time in the study with its own server's clock, so a
    # time from the server an export came from must not come along into another one.
    from sweepsafe.export import EXPORTED_AS_OF, export_study, load_into_server

    storage = optuna.storages.RDBStorage(postgres_database)
    try:
        study = optuna.create_study(study_name="s", storage=storage)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        study_id = storage.get_study_id_from_name("s")
        # An export made far ahead of this server's clock, as another server's could be.
        storage.set_study_system_attr(study_id, EXPORTED_AS_OF, "2999-01-01T00:00:00")
        assert export_study(postgres_database, "s", tmp_path / "export.db").trials == 2
    finally:
        storage.engine.dispose()
    engine = sqlalchemy.create_engine(postgres_database)
    try:
        tables = sqlalchemy.MetaData()
        tables.reflect(bind=engine)
        tables.drop_all(engine)  # an empty server to load the export into
    finally:
        engine.dispose()

    assert load_into_server(tmp_path / "export.db", postgres_database) == ["s"]
    storage = optuna.storages.RDBStorage(postgres_database)
    try:
        study_id = storage.get_study_id_from_name("s")
        assert EXPORTED_AS_OF not in storage.get_study_system_attrs(study_id)
        assert len(storage.get_all_trials(study_id)) == 2  # the rest of the study came
    finally:
        storage.engine.dispose()


@pytest.mark.timeout(300)
def test_an_exporter_killed_while_it_exports_leaves_the_previous_export_and_another_exports(
    tmp_path: Path, postgres_database: str
) -> None:
    # Drive takes a while per file, so a kill while exporting lands mid-copy.
    fault_plan = plan(tmp_path, latency=0.4)
    # Enough trials that the others are still sweeping when the exporter dies.
    workers = [Worker(tmp_path, f"w{i}", postgres_database, fault_plan, 60) for i in range(3)]
    exporter = None
    while exporter is None:
        for worker in workers:
            # The second export: the first one left a sound export on Drive to fall back on.
            if sum(e["event"] == "exporting" for e in worker.events) >= 2:
                exporter = worker
        assert any(w.process.poll() is None for w in workers), [w.stderr for w in workers]
        threading.Event().wait(0.02)
    exporter.kill()
    observer = DriveObserver(tmp_path, tmp_path / "drive")
    try:
        after_kill = observer.restored_study(drive_study(tmp_path), tmp_path / "after-kill")
        assert after_kill.get_trials()  # sound and loads: the previous export
        others = [w for w in workers if w is not exporter]
        assert [w.finish() for w in others] == [0, 0], [w.stderr for w in others]
        exported = [any(e["event"] == "exporting" for e in w.events) for w in others]
        # Another worker took the lease over and exported.
        assert any(exported), [(w.name, w.stderr[-1500:]) for w in others]
        final = observer.restored_study(drive_study(tmp_path), tmp_path / "final")
        complete = [
            t.number
            for t in server_trials(postgres_database)
            if t.state == optuna.trial.TrialState.COMPLETE
        ]
        assert finished_numbers(final) == sorted(complete)
    finally:
        observer.close()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("mongodb://localhost/sweeps", "not a database URL"),
        ("postgresql+pg8000://u@localhost/sweeps", "pip install pg8000"),
        ("postgresql+psycopg://u@127.0.0.1:1/sweeps", "could not reach the database server"),
    ],
    ids=["unsupported kind", "driver missing", "server unreachable"],
)
def test_a_storage_that_cannot_be_used_is_one_clear_sentence(
    tmp_path: Path, url: str, words: str
) -> None:
    with pytest.raises(SweepsafeError, match=words) as raised:
        run_sweep(
            lambda t: t.suggest_float("x", 0, 1),
            output_dir=tmp_path / "out",
            study_key=KEY,
            n_trials=1,
            storage=url,
        )
    assert "\n" not in str(raised.value)


def test_a_study_restored_from_drive_into_a_fresh_server_continues_as_a_shared_sweep(
    tmp_path: Path, postgres_database: str
) -> None:
    from cli_support import run_cli
    from sweepsafe.testing import simulated_store

    local, drive = tmp_path / "local", tmp_path / "drive"
    with simulated_store(local, drive, FaultPlan()) as store:
        single = run_sweep(
            lambda t: t.suggest_float("x", 0, 1),
            output_dir=local / "out",
            study_key=KEY,
            n_trials=6,
            backup_to_drive=store,
        )
    database = single.study_dir / "study.db"
    fresh = tmp_path / "fresh"
    restored = fresh / "out" / single.study_dir.name / "study.db"
    command = run_cli(
        "restore",
        restored,
        "--local-root",
        fresh,
        "--drive-root",
        drive,
        "--into",
        postgres_database,
    )
    assert command.returncode == 0, command.stderr
    assert f"Loaded {single.study.study_name}" in command.stdout
    again = run_cli(  # the server is no longer empty: loading twice is refused
        "restore",
        restored,
        "--local-root",
        fresh,
        "--drive-root",
        drive,
        "--into",
        postgres_database,
    )
    assert again.returncode == 2
    assert "already holds 1 study" in again.stderr

    shared = run_sweep(
        lambda t: t.suggest_float("x", 0, 1),
        output_dir=tmp_path / "worker" / "out",
        study_key=KEY,
        study_name=single.study.study_name,
        n_trials=9,
        storage=postgres_database,
        heartbeat_interval=1,
    )
    # A notebook that runs sweep after sweep must not pile up connections to the server.
    assert other_sessions(postgres_database) == 0
    numbers = [t.number for t in server_trials(postgres_database) if t.state.is_finished()]
    assert numbers == list(range(9))  # the six restored trials, then three new ones
    assert shared.study.study_name == single.study.study_name
    assert database.exists()


@pytest.mark.timeout(180)
def test_status_with_the_server_counts_the_live_workers(
    tmp_path: Path, postgres_database: str
) -> None:
    from cli_support import run_cli

    worker = Worker(tmp_path, "w0", postgres_database, plan(tmp_path), 3, seconds=30.0)
    try:
        started = worker.wait_for("trial_started")
        assert started is not None, worker.stderr
        wait_while_running(
            worker.process,
            lambda: has_heartbeat(postgres_database, started["trial"]),
            "the trial's first heartbeat",
            lambda: worker.stderr,
        )
        result = run_cli(
            "status",
            worker.local / "out",
            "--storage",
            postgres_database,
            "--grace-period",
            "10",
        )
        assert "Workers seen by heartbeat in the last 10 s" in result.stdout, result.stderr
        assert "1 in study-" in result.stdout
    finally:
        worker.kill()


def test_restore_into_an_unreachable_server_never_prints_the_password(tmp_path: Path) -> None:
    from cli_support import run_cli
    from sweepsafe.testing import simulated_store

    local, drive = tmp_path / "local", tmp_path / "drive"
    with simulated_store(local, drive, FaultPlan()) as store:
        single = run_sweep(
            lambda t: t.suggest_float("x", 0, 1),
            output_dir=local / "out",
            study_key=KEY,
            n_trials=2,
            backup_to_drive=store,
        )
    fresh = tmp_path / "fresh"
    command = run_cli(
        "restore",
        fresh / "out" / single.study_dir.name / "study.db",
        "--local-root",
        fresh,
        "--drive-root",
        drive,
        "--into",
        "postgresql+psycopg://sweeper:hunter2@127.0.0.1:1/sweeps",
    )
    assert command.returncode == 2, command.stderr
    assert "could not reach the database server" in command.stderr
    assert "sweeper:***@127.0.0.1" in command.stderr
    assert "hunter2" not in command.stdout + command.stderr
