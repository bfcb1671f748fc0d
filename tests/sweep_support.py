"""Helpers for the Optuna integration tests: a worker of its own, a copy counter, checks."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sweepsafe.drive import BackupResult, DriveStore, GenerationInfo, VerifyResult
from sweepsafe.worker import BackupWorker, RetryPolicy

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class CountingStore:
    """A backend over a real store that records every backup it makes (a proxy: it is a
    ``BackupBackend`` itself, so sweepsafe treats it as the store it wraps)."""

    def __init__(self, store: DriveStore) -> None:
        self.store = store
        self.local_root = store.local_root
        self.lease_timeout = store.lease_timeout
        self._lock = threading.Lock()
        self.results: list[BackupResult] = []

    async def abackup(
        self, path: Any, is_directory: bool = False, *, exclude: Any = (), final: bool = False
    ) -> BackupResult:
        result = await self.store.abackup(path, is_directory, exclude=exclude, final=final)
        with self._lock:
            self.results.append(result)
        return result

    async def arestore(self, path: Any, is_directory: bool = False, **options: Any) -> BackupResult:
        return await self.store.arestore(path, is_directory, **options)

    async def averify(self, path: Any) -> VerifyResult:
        return await self.store.averify(path)

    async def ahistory(self, path: Any) -> list[GenerationInfo]:
        return await self.store.ahistory(path)

    async def aacquire(
        self, study_dir: Any, *, takeover: bool = False, shared: bool = False
    ) -> None:
        await self.store.aacquire(study_dir, takeover=takeover, shared=shared)

    async def aholds(self, study_dir: Any, *, take: bool = False) -> bool:
        return await self.store.aholds(study_dir, take=take)

    async def arenew(self) -> None:
        await self.store.arenew()

    async def arelease(self, study_dir: Any = None) -> None:
        await self.store.arelease(study_dir)

    def copies_of(self, path: Path) -> list[BackupResult]:
        with self._lock:
            return [result for result in self.results if result.source == path]

    def copies_under(self, folder: Path) -> list[BackupResult]:
        with self._lock:
            return [r for r in self.results if r.source == folder or folder in r.source.parents]


@contextmanager
def own_worker(max_attempts: int = 1, close_timeout: float = 10.0) -> Iterator[BackupWorker]:
    """A worker of the test's own (not the process-wide one), with instant retries; the
    ``private_worker`` fixture is one with the defaults."""
    worker = BackupWorker(retry=RetryPolicy(initial_delay=0.0, max_attempts=max_attempts))
    try:
        yield worker
    finally:
        worker.close(timeout=close_timeout)


def finished_trials(database: Path) -> list[tuple[int, tuple[float, ...] | None]]:
    """(number, values) of the finished trials in an Optuna SQLite file, read with Optuna."""
    summaries = optuna.get_all_study_summaries(f"sqlite:///{database}")
    assert len(summaries) == 1, summaries
    study = optuna.load_study(study_name=summaries[0].study_name, storage=f"sqlite:///{database}")
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return [(t.number, tuple(t.values) if t.values is not None else None) for t in trials]


def trial_states(database: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    connection.close()
    return {str(state): int(count) for state, count in rows}


def integrity(database: Path) -> str:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


def wait_while_running(
    process: Any,
    condition: Any,
    what: str,
    output: Any = lambda: "",
    timeout: float = 120.0,
) -> None:
    """Wait until ``condition()`` is true while ``process`` (a Popen) still runs.

    Fails at once if the process ends first (with its ``output()``), or after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.02)


def wait_for(condition: object, timeout: float = 20.0, what: str = "condition") -> None:
    """Wait until ``condition()`` is true, checking on a short period, up to ``timeout``."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        event.wait(0.01)
