"""Runtimes as real processes, and an observer that reads the Drive copy as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna

from sweepsafe import DriveStore
from sweepsafe.testing import FaultPlan

SCRIPT = Path(__file__).with_name("runtime_script.py")
WAIT_LIMIT_S = 90.0


class RuntimeProcess:
    """``runtime_script.py`` running in a session of its own; its JSON events as they come."""

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        drive: Path,
        plan: Path,
        key: str,
        trials: int,
        *extra: str,
    ) -> None:
        self.name = name
        self.local = tmp_path / name
        self.events: list[dict[str, Any]] = []
        self.stderr = ""
        self._changed = threading.Condition()
        command = [sys.executable, str(SCRIPT), "--local", str(self.local), "--drive", str(drive)]
        command += ["--plan", str(plan), "--key", key, "--trials", str(trials), "--name", name]
        self.process = subprocess.Popen(
            [*command, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._readers = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if not line.endswith("\n"):
                break  # the writer was killed in the middle of writing this line
            with self._changed:
                self.events.append(json.loads(line))
                self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "exited"})
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()

    def wait_for(self, event: str, **fields: Any) -> dict[str, Any]:
        """The first event named ``event`` with these fields, waiting for it."""

        def found() -> dict[str, Any] | None:
            for item in self.events:
                if item["event"] == event and all(item.get(k) == v for k, v in fields.items()):
                    return item
            return None

        with self._changed:
            if not self._changed.wait_for(
                lambda: found() is not None or self.events[-1:] == [{"event": "exited"}],
                WAIT_LIMIT_S,
            ):
                raise AssertionError(f"{self.name}: no {event} event in {WAIT_LIMIT_S} s")
            item = found()
        if item is None:
            raise AssertionError(f"{self.name} exited before {event}: {self.events}\n{self.stderr}")
        return item

    def finish(self) -> int:
        """Wait for the process to end; its exit status."""
        status = self.process.wait(timeout=WAIT_LIMIT_S)
        self._close()
        return status

    def kill(self) -> None:
        """SIGKILL the whole runtime (the sweep and every helper it started)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=WAIT_LIMIT_S)
        self._close()

    def _close(self) -> None:
        for reader in self._readers:
            reader.join(timeout=WAIT_LIMIT_S)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def plan_file(tmp_path: Path, plan: FaultPlan | None = None) -> Path:
    path = tmp_path / "fault-plan.json"
    (plan or FaultPlan()).write(path)
    return path


class DriveObserver:
    """Reads a study's Drive copy read-only, from a store of its own, as a user would."""

    def __init__(self, tmp_path: Path, drive: Path) -> None:
        self.store = DriveStore(tmp_path / "observer", drive)

    def close(self) -> None:
        self.store.close()

    def newest_finished(self, drive_db: Path) -> int | None:
        """Finished trials in the newest generation on Drive (None before the first)."""
        generations = self.store.history(drive_db)
        return generations[0].finished_trials if generations else None

    def restored_study(self, study_dir_on_drive: Path, into: Path) -> optuna.Study:
        """The Drive copy restored (database and trial folders) into an empty folder."""
        store = DriveStore(into, study_dir_on_drive.parent)
        try:
            local = into / study_dir_on_drive.name
            assert store.restore(local / "study.db"), "the Drive copy did not restore"
            store.restore(local / "trials", is_directory=True)
        finally:
            store.close()
        storage = f"sqlite:///{local / 'study.db'}"
        (summary,) = optuna.get_all_study_summaries(storage)
        return optuna.load_study(study_name=summary.study_name, storage=storage)


@contextmanager
def sampling(sample: Callable[[], int | None], period_s: float = 0.05) -> Iterator[list[int]]:
    """Call ``sample`` on a period in a thread while the block runs; the values seen."""
    seen: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        while not stop.wait(period_s):
            try:
                value = sample()
            except Exception as exc:
                errors.append(exc)
                continue
            if value is not None:
                seen.append(value)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=WAIT_LIMIT_S)
    # Reads may race a rename now and then; they may not fail all the time.
    assert len(errors) <= max(5, len(seen)), errors[:3]


def finished_numbers(study: optuna.Study) -> list[int]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sorted(t.number for t in study.get_trials(deepcopy=False, states=states))


def deadline(seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + seconds
    return lambda: time.monotonic() < end
