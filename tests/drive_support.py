"""Helpers for the DriveStore and copy tests: real studies, real files, a simulated Drive."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna

from sweepsafe.drive import DriveStore
from sweepsafe.drive._reserved_names import is_temp_name
from sweepsafe.testing import FaultPlan, simulated_store

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class DriveSetup:
    """A store over ``local`` -> ``drive``, and the fault plan file its helpers obey."""

    store: DriveStore
    local: Path
    drive: Path
    plan_path: Path

    def set_faults(self, plan: FaultPlan) -> None:
        plan.write(self.plan_path)


@contextmanager
def simulated_drive(
    tmp_path: Path, plan: FaultPlan | None = None, **store_kwargs: object
) -> Iterator[DriveSetup]:
    """A store whose Drive side is a simulated Drive over ``tmp_path/drive``."""
    local = tmp_path / "local"
    drive = tmp_path / "drive"
    local.mkdir(exist_ok=True)
    plan_path = tmp_path / "fault-plan.json"
    (plan or FaultPlan()).write(plan_path)
    store = simulated_store(local, drive, plan_path, **store_kwargs)
    try:
        yield DriveSetup(store, local, drive, plan_path)
    finally:
        store.close()


def temp_files(root: Path) -> list[Path]:
    """sweepsafe temporaries anywhere under ``root``."""
    return [path for path in root.rglob("*") if is_temp_name(path.name)]


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    return (x - 2.0) ** 2


def make_study(database: Path, n_trials: int, *, wal: bool = False) -> str:
    """A real Optuna study in ``database`` with ``n_trials`` finished trials; its URL."""
    database.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{database}"
    study = optuna.create_study(
        storage=url, study_name="study", sampler=optuna.samplers.RandomSampler(0)
    )
    if wal:
        connection = sqlite3.connect(database)
        connection.execute("PRAGMA journal_mode=WAL").fetchall()
        connection.close()
    study.optimize(objective, n_trials=n_trials)
    return url


def complete_trial_numbers(database: Path) -> set[int]:
    """Numbers of COMPLETE trials, read with plain sqlite3."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    try:
        rows = connection.execute("SELECT number FROM trials WHERE state = 'COMPLETE'").fetchall()
    finally:
        connection.close()
    return {int(row[0]) for row in rows}


@contextmanager
def trials_running(url: str) -> Iterator[threading.Event]:
    """Keep adding trials to the study in another thread until the block ends.

    Yields an event that is set once at least one trial has finished in the thread.
    """
    stop = threading.Event()
    first_done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        study = optuna.load_study(study_name="study", storage=url)
        try:
            while not stop.is_set():
                study.optimize(objective, n_trials=1)
                first_done.set()
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
            first_done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield first_done
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert not errors, errors


def corrupt_database(path: Path) -> None:
    """Overwrite the middle of a database with garbage, keeping its SQLite header."""
    size = path.stat().st_size
    assert size >= 4 * 4096, "too small a database to corrupt usefully"
    with open(path, "r+b") as file:
        for page in range(1, size // 4096):
            file.seek(page * 4096 + 16)
            file.write(os.urandom(512))


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
