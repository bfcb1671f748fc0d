"""The backup worker's book of targets: every state transition of a target happens here.

Callers' threads (``submit``, ``flush``, ``stats``) and the worker's loop both change it,
always while holding :attr:`WorkerLedger.lock`; methods ending in ``_locked`` expect the
caller to hold it. A target's life: a submit makes a job *waiting*; the loop *takes* it
(a task serves the target); each *attempt* is recorded; the job *finishes* when it
succeeded, failed for good, or ran out of retries; a submit meanwhile queues exactly
one more job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sweepsafe.worker._reports import FlushReport, TargetReport, TargetState, WorkerStats

if TYPE_CHECKING:
    import anyio

    from sweepsafe.worker._retry import AttemptOutcome

__all__ = ["Job", "TargetSlot", "WorkerLedger"]


@dataclass(frozen=True)
class Job:
    """What one submit captured; immutable, so later calls cannot change a queued job."""

    backup: Callable[[Path, bool], object]
    is_directory: bool


class TargetSlot:
    """The worker's record of one target; changed only through the ledger's methods."""

    __slots__ = (
        "attempts",
        "copies",
        "covered_seq",
        "finished_seq",
        "in_thread",
        "is_directory",
        "last_error",
        "last_ok",
        "last_result",
        "last_success",
        "latest_seq",
        "logged_error",
        "path",
        "retry_wake",
        "running",
        "task_active",
        "waiting",
    )

    def __init__(self, path: Path, is_directory: bool) -> None:
        self.path = path
        self.is_directory = is_directory
        self.waiting: Job | None = None  # submitted, not started yet
        self.task_active = False  # a task on the loop serves this target
        self.running = False  # an attempt is in progress
        self.in_thread = False  # a sync callable runs in a worker thread
        self.retry_wake: anyio.Event | None = None  # set while a retry waits out its delay
        self.latest_seq = 0  # sequence number of the newest submit
        self.covered_seq = 0  # newest submit the job in progress covers
        self.finished_seq = 0  # newest submit covered by a job that finished for good
        self.attempts = 0  # of the current or latest job
        self.last_ok: bool | None = None  # how the latest finished job ended
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.last_result: object = None
        self.logged_error: str | None = None  # the failure last logged, to log each once
        self.copies = 0

    @property
    def pending(self) -> bool:
        """Some submit is not yet covered by a job that finished."""
        return self.finished_seq < self.latest_seq


class WorkerLedger:
    """Targets, the queue of targets the loop must look at, and the counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.job_finished = threading.Condition(self.lock)
        """Notified whenever a job finishes for good, and when the loop stops."""
        self.targets: dict[str, TargetSlot] = {}
        self.new_work: list[TargetSlot] = []
        self.loop_stopped = False
        self.seq = 0
        self.submitted = 0
        self.coalesced = 0
        self.started = 0
        self.succeeded = 0
        self.failed = 0
        self.retried = 0
        self.bytes_copied = 0

    # -- transitions ------------------------------------------------------------------------
    def submit_locked(self, key: str, job: Job) -> bool:
        """Record a submit; True when the loop must be woken to serve the target."""
        self.seq += 1
        self.submitted += 1
        slot = self.targets.get(key)
        if slot is None:
            slot = self.targets[key] = TargetSlot(Path(key), job.is_directory)
        slot.latest_seq = self.seq
        slot.is_directory = job.is_directory
        if slot.waiting is not None:
            self.coalesced += 1
            slot.waiting = job  # the same work; the newest callable does it
            return False
        slot.waiting = job
        if slot.task_active and slot.retry_wake is None:
            return False  # the task serving this target takes the job when its copy ends
        self.new_work.append(slot)
        return True

    def take_new_work_locked(self) -> tuple[list[TargetSlot], list[anyio.Event]]:
        """For the loop: targets that need a task, and retry waits to cut short."""
        new_work, self.new_work = self.new_work, []
        to_start: list[TargetSlot] = []
        to_wake: list[anyio.Event] = []
        for slot in new_work:
            if slot.waiting is None:
                continue
            if not slot.task_active:
                slot.task_active = True
                to_start.append(slot)
            elif slot.retry_wake is not None:
                to_wake.append(slot.retry_wake)
        return to_start, to_wake

    def next_job_locked(self, slot: TargetSlot, current: Job | None) -> Job | None:
        """The job the target's task runs next: a newly submitted one replaces ``current``
        (a job waiting to be retried); None ends the task."""
        if current is None or slot.waiting is not None:
            job = slot.waiting
            if job is None:
                slot.task_active = False
                return None
            slot.waiting = None
            slot.covered_seq = slot.latest_seq
            slot.attempts = 0
            self.started += 1
            current = job
        slot.attempts += 1
        if slot.attempts > 1:
            self.retried += 1
        return current

    def attempt_started_locked(self, slot: TargetSlot, *, in_thread: bool) -> None:
        """An attempt begins (in a worker thread for a sync callable)."""
        slot.running = True
        slot.in_thread = in_thread

    def thread_call_ended_locked(self, slot: TargetSlot) -> None:
        """A sync callable returned (or raised) in its worker thread."""
        slot.in_thread = False

    def record_attempt_locked(self, slot: TargetSlot, outcome: AttemptOutcome) -> str | None:
        """Store an attempt's outcome; return ``"failed"`` or ``"recovered"`` if worth a log.

        A failure is worth one log line each time its message changes; the first success
        after a logged failure is worth one too.
        """
        self.bytes_copied += outcome.bytes_copied
        slot.last_result = outcome.result
        slot.running = False
        if outcome.ok:
            slot.copies += 1
            slot.last_success = time.time()
            slot.last_error = None
            recovered = slot.logged_error is not None
            slot.logged_error = None
            return "recovered" if recovered else None
        slot.last_error = outcome.error
        if outcome.error == slot.logged_error:
            return None
        slot.logged_error = outcome.error
        return "failed"

    def finish_job_locked(self, slot: TargetSlot, ok: bool) -> None:
        """Mark every submit the job covered as done; wake flushes."""
        slot.finished_seq = max(slot.finished_seq, slot.covered_seq)
        slot.last_ok = ok
        if ok:
            self.succeeded += 1
        else:
            self.failed += 1
        self.job_finished.notify_all()

    def retry_waits_locked(self, slot: TargetSlot, event: anyio.Event) -> bool:
        """A retry will wait on ``event`` unless a new submit already replaced it."""
        if slot.waiting is not None:
            return False
        slot.retry_wake = event
        return True

    def retry_wait_ended_locked(self, slot: TargetSlot) -> None:
        """The retry delay is over (or was cut short by a submit)."""
        slot.retry_wake = None

    def mark_loop_stopped_locked(self) -> None:
        """The loop is gone: nothing runs any more, and flushes stop waiting."""
        self.loop_stopped = True
        for slot in self.targets.values():
            slot.running = False
            slot.task_active = False
            slot.retry_wake = None
        self.job_finished.notify_all()

    def forget_loop_after_fork(self) -> None:
        """In a forked child, which has no loop: a new lock (the parent's may have been
        held at the fork), and flushes wait for nothing."""
        self.lock = threading.Lock()
        self.job_finished = threading.Condition(self.lock)
        with self.lock:
            self.mark_loop_stopped_locked()

    # -- views ------------------------------------------------------------------------------
    def unfinished_locked(self) -> list[tuple[TargetSlot, int]]:
        """Targets with submits not yet finished, and the newest such submit."""
        return [(slot, slot.latest_seq) for slot in self.targets.values() if slot.pending]

    def stuck_in_threads_locked(self) -> list[Path]:
        """Targets whose sync callable is still running in a worker thread."""
        return [slot.path for slot in self.targets.values() if slot.in_thread]

    def report_locked(self, timed_out: bool, duration_s: float) -> FlushReport:
        """A flush report on every target as it stands now."""
        reports = tuple(
            TargetReport(
                target=slot.path,
                is_directory=slot.is_directory,
                ok=not slot.pending and slot.last_ok is True,
                pending=slot.pending,
                attempts=slot.attempts,
                last_success=slot.last_success,
                last_error=slot.last_error,
                last_result=slot.last_result,
            )
            for slot in self.targets.values()
        )
        return FlushReport(reports, timed_out=timed_out, duration_s=duration_s)

    def stats_locked(self, *, targets: bool = True) -> WorkerStats:
        """A snapshot of the counters and (``targets``) of every target."""
        return WorkerStats(
            submitted=self.submitted,
            coalesced=self.coalesced,
            started=self.started,
            succeeded=self.succeeded,
            failed=self.failed,
            retried=self.retried,
            bytes_copied=self.bytes_copied,
            targets=tuple(
                TargetState(
                    target=slot.path,
                    last_success=slot.last_success,
                    last_error=slot.last_error,
                    running=slot.running,
                    waiting=slot.waiting is not None or (slot.task_active and not slot.running),
                    copies=slot.copies,
                )
                for slot in (self.targets.values() if targets else ())
            ),
        )
