"""A simulated slow Drive for the worker tests: backup callables the test holds and fails.

The test controls them with events, not sleeps: a held Drive blocks every call until the
test releases it, like a FUSE mount that stopped answering; queued outcomes make calls
fail the way a flaky mount does. Every call is recorded, with a global start order.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from sweepsafe.worker import BackupWorker, RetryPolicy

# Long enough for any test, short enough that a forgotten held call does not outlive the run.
HELD_CALL_LIMIT_S = 60.0
WAIT_LIMIT_S = 30.0

_start_order = itertools.count()  # next() on it is atomic: one global order for all calls


def next_tick() -> int:
    """A number from the same global counter that stamps every call's start."""
    return next(_start_order)


@dataclass(frozen=True)
class DriveCall:
    """One call of a simulated Drive."""

    target: Path
    is_directory: bool
    tick: int
    thread: str


@dataclass(frozen=True)
class FailedCopy:
    """A result shaped like ``sweepsafe.drive.BackupResult`` for a copy that failed."""

    error: str
    retryable: bool = True
    ok: bool = False
    bytes_copied: int = 0

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class DoneCopy:
    """A result shaped like ``sweepsafe.drive.BackupResult`` for a copy that succeeded."""

    bytes_copied: int
    ok: bool = True
    error: str | None = None
    retryable: bool = True

    def __bool__(self) -> bool:
        return self.ok


class _DriveRecord:
    """Calls, concurrency and queued outcomes, shared by the sync and async Drives."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.calls: list[DriveCall] = []
        self.finished = 0
        self.cancelled: list[Path] = []
        self.active: dict[Path, int] = {}
        self.max_active = 0
        self.max_active_per_target = 0
        self._outcomes: deque[object] = deque()
        self._always: object = None

    def fail_next(self, *outcomes: object) -> None:
        """The next calls end with these, in order: an exception is raised, else returned."""
        with self.changed:
            self._outcomes.extend(outcomes)

    def fail_always(self, outcome: object) -> None:
        """Every later call ends with ``outcome`` (``None`` to succeed again)."""
        with self.changed:
            self._always = outcome

    def calls_for(self, target: Path) -> list[DriveCall]:
        with self.changed:
            return [call for call in self.calls if call.target == target]

    def wait_for_calls(self, count: int) -> None:
        """Block until ``count`` calls have started."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.calls) >= count, WAIT_LIMIT_S):
                raise AssertionError(f"only {len(self.calls)} of {count} Drive calls started")

    def wait_for_finished(self, count: int) -> None:
        """Block until ``count`` calls have ended."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.finished >= count, WAIT_LIMIT_S):
                raise AssertionError(f"only {self.finished} of {count} Drive calls ended")

    def _begin(self, target: Path, is_directory: bool) -> None:
        with self.changed:
            call = DriveCall(target, is_directory, next_tick(), threading.current_thread().name)
            self.calls.append(call)
            self.active[target] = self.active.get(target, 0) + 1
            self.max_active = max(self.max_active, sum(self.active.values()))
            self.max_active_per_target = max(self.max_active_per_target, self.active[target])
            self.changed.notify_all()

    def _end(self, target: Path, cancelled: bool = False) -> object:
        with self.changed:
            self.active[target] -= 1
            self.finished += 1
            if cancelled:
                self.cancelled.append(target)
            self.changed.notify_all()
            if cancelled:
                return None
            if self._outcomes:
                return self._outcomes.popleft()
            return self._always

    @staticmethod
    def _deliver(outcome: object, default: object) -> object:
        if isinstance(outcome, BaseException):
            raise outcome
        return default if outcome is None else outcome


class SlowDrive(_DriveRecord):
    """A sync ``backup(target, is_directory)`` callable: runs in the worker's threads.

    Held (``hold()``), each call blocks its thread until ``release()``, as a write to a
    stalled FUSE mount does. Returns ``result`` unless an outcome was queued.
    """

    def __init__(self, *, held: bool = False, result: object = True) -> None:
        super().__init__()
        self._open = threading.Event()
        self._result = result
        if not held:
            self._open.set()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def __call__(self, target: Path, is_directory: bool) -> object:
        self._begin(target, is_directory)
        try:
            if not self._open.wait(HELD_CALL_LIMIT_S):
                raise TimeoutError("the test never released the simulated Drive")
        finally:
            outcome = self._end(target)
        return self._deliver(outcome, self._result)


class AsyncSlowDrive(_DriveRecord):
    """An async ``backup(target, is_directory)`` callable: runs on the worker's loop.

    Held, each call waits (cancellably) until ``release()`` is called from any thread;
    a call cancelled while held is recorded in ``cancelled``.
    """

    def __init__(self, *, held: bool = False, result: object = True) -> None:
        super().__init__()
        self._held = held
        self._result = result
        self._waiting: list[tuple[anyio.Event, anyio.lowlevel.EventLoopToken]] = []

    def hold(self) -> None:
        with self.changed:
            self._held = True

    def release(self) -> None:
        with self.changed:
            self._held = False
            waiting, self._waiting = self._waiting, []
        for event, token in waiting:
            with contextlib.suppress(RuntimeError):  # that loop has already ended
                anyio.from_thread.run_sync(event.set, token=token)

    async def __call__(self, target: Path, is_directory: bool) -> object:
        self._begin(target, is_directory)
        released = anyio.Event()
        with self.changed:
            if self._held:
                self._waiting.append((released, anyio.lowlevel.current_token()))
            else:
                released.set()
        try:
            with anyio.fail_after(HELD_CALL_LIMIT_S):
                await released.wait()
        except anyio.get_cancelled_exc_class():
            self._end(target, cancelled=True)
            raise
        outcome = self._end(target)
        return self._deliver(outcome, self._result)


class LogWatch(logging.Handler):
    """Collects records of the ``sweepsafe.worker`` logger; sets an event on a match."""

    def __init__(self, matches: Callable[[logging.LogRecord], bool] = lambda _: False) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.matched = threading.Event()
        self._matches = matches
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)
        if self._matches(record):
            self.matched.set()

    def messages(self, level: int) -> list[str]:
        with self._lock_records:
            return [r.getMessage() for r in self.records if r.levelno == level]


class WorkerRig:
    """Makes workers and simulated Drives for one test, and cleans both up after it.

    Cleanup releases every Drive first, so no held call outlives the test, then closes
    every worker.
    """

    def __init__(self) -> None:
        self._workers: list[BackupWorker] = []
        self._drives: list[SlowDrive | AsyncSlowDrive] = []

    def worker(self, **options: Any) -> BackupWorker:
        options.setdefault("retry", RetryPolicy(initial_delay=0.0, max_attempts=1))
        worker = BackupWorker(**options)
        self._workers.append(worker)
        return worker

    def drive(self, *, held: bool = False, result: object = True) -> SlowDrive:
        drive = SlowDrive(held=held, result=result)
        self._drives.append(drive)
        return drive

    def async_drive(self, *, held: bool = False, result: object = True) -> AsyncSlowDrive:
        drive = AsyncSlowDrive(held=held, result=result)
        self._drives.append(drive)
        return drive

    def close(self) -> None:
        for drive in self._drives:
            drive.release()
        for worker in self._workers:
            worker.close(timeout=WAIT_LIMIT_S)
