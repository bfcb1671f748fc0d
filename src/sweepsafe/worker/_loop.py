"""The backup worker's event loop: one daemon thread that runs every copy.

A sync backup callable runs in one of anyio's worker threads, an async one on the loop;
both behind one :class:`anyio.CapacityLimiter`. One task per busy target runs its jobs
one after another, with retries; one task per periodic job runs it on its interval; a
dispatcher task starts those tasks when woken. Every task belongs to the dispatcher's
task group, and stopping cancels it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from sweepsafe.worker._retry import (
    AttemptOutcome,
    RetryPolicy,
    outcome_of_exception,
    outcome_of_result,
)

if TYPE_CHECKING:
    from sweepsafe.worker._ledger import Job, TargetSlot, WorkerLedger

__all__ = ["BackupLoop", "PeriodicJob", "pause"]

logger = logging.getLogger("sweepsafe.worker")

PeriodicJob = Callable[[], Awaitable[object]]

_RUNNING: contextvars.ContextVar[BackupLoop] = contextvars.ContextVar("sweepsafe_backup_loop")
"""The loop whose task is running: set for every task of a loop's task group."""


async def pause(seconds: float) -> None:
    """Sleep up to ``seconds``. On a worker's loop a flush ends the pause at once, and
    while a flush is on there is no pause: a job that waits only to space its work out
    never holds up the end of a sweep. Elsewhere, a plain sleep."""
    if seconds <= 0:
        return
    loop = _RUNNING.get(None)
    event = None if loop is None else loop.flushed
    if event is None:
        await anyio.sleep(seconds)
        return
    with anyio.move_on_after(seconds):
        await event.wait()


class BackupLoop:
    """Runs the jobs recorded in a :class:`WorkerLedger` on a background event loop."""

    def __init__(
        self, ledger: WorkerLedger, *, max_concurrency: int, retry: RetryPolicy, name: str
    ) -> None:
        self._ledger = ledger
        self._max_concurrency = max_concurrency
        self._retry = retry
        self._name = name
        self._rng = random.Random()
        self.thread: threading.Thread | None = None
        # Guarded by the ledger's lock:
        self._wake: Callable[[], None] | None = None  # set while the loop accepts wake-ups
        self._wake_requested = False
        self._stopping = False
        self._flushes = 0  # flushes waiting now
        self._periodic: dict[Hashable, tuple[float, PeriodicJob]] = {}
        self._periodic_changed: set[Hashable] = set()
        # Only touched on the loop's thread:
        self._wake_event: anyio.Event | None = None
        self.flushed: anyio.Event | None = None
        """Set while a flush is waiting: it ends every :func:`pause` of the loop's jobs."""
        self._periodic_scopes: dict[Hashable, anyio.CancelScope] = {}

    def is_loop_thread(self) -> bool:
        """The calling thread is the loop's own."""
        return self.thread is not None and threading.current_thread() is self.thread

    def wake_locked(self) -> None:
        """Have the loop look at its new work, starting it on first use; never waits."""
        if self.thread is None:
            # A daemon thread of our own, not a portal's executor thread: the interpreter
            # joins executor threads before atexit hooks run, so a hung copy would block
            # the exit hook meant to bound it. anyio's worker threads inherit the flag.
            self.thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self.thread.start()
        elif self._wake is not None and not self._wake_requested:
            self._wake_requested = True
            try:
                self._wake()
            except RuntimeError:
                # The loop is closing; the job shows as pending in the next report.
                logger.debug("The backup loop closed while it was being woken")

    def flush_began_locked(self) -> None:
        """A flush began: the jobs' pauses end until every flush has ended."""
        self._flushes += 1
        if self.thread is not None:
            self.wake_locked()

    def flush_ended_locked(self) -> None:
        self._flushes -= 1
        if self.thread is not None:
            self.wake_locked()

    def every_locked(self, key: Hashable, interval: float, job: PeriodicJob | None) -> None:
        """Run ``job`` every ``interval`` seconds from now on (None: stop running it)."""
        if job is None:
            self._periodic.pop(key, None)
        else:
            self._periodic[key] = (interval, job)
        self._periodic_changed.add(key)
        self.wake_locked()

    def stop_locked(self) -> None:
        """Ask the loop to cancel what is in flight and end; never waits."""
        if self.thread is not None:
            self._stopping = True
            self.wake_locked()

    def forget_wake_after_fork(self) -> None:
        """In a forked child: never wake the loop, whose wake-up pipe is the parent's."""
        self._wake = None

    def _run(self) -> None:
        try:
            anyio.run(self._dispatch, backend="asyncio")
        except Exception:
            logger.exception("The backup worker %r stopped on an internal error", self._name)
        finally:
            with self._ledger.lock:
                self._wake = None
                self._ledger.mark_loop_stopped_locked()

    async def _dispatch(self) -> None:
        """Start a task for each target with new work and each periodic job, until stopped."""
        ledger = self._ledger
        limiter = anyio.CapacityLimiter(self._max_concurrency)
        thread_limiter = anyio.CapacityLimiter(self._max_concurrency)
        loop = asyncio.get_running_loop()

        def wake_from_any_thread() -> None:
            # The one bridge that does not wait for the loop: submit() must return at once.
            loop.call_soon_threadsafe(self._on_wake)

        _RUNNING.set(self)  # the tasks started below inherit it
        self.flushed = anyio.Event()
        try:
            async with anyio.create_task_group() as task_group:
                with ledger.lock:
                    self._wake = wake_from_any_thread
                while True:
                    self._wake_event = anyio.Event()
                    with ledger.lock:
                        to_start, to_wake = ledger.take_new_work_locked()
                        self._wake_requested = False
                        stopping = self._stopping
                        flushing = self._flushes > 0
                        periodic = {key: self._periodic.get(key) for key in self._periodic_changed}
                        self._periodic_changed.clear()
                    if stopping:
                        task_group.cancel_scope.cancel()
                        return
                    for slot in to_start:
                        task_group.start_soon(self._serve_target, slot, limiter, thread_limiter)
                    for event in to_wake:
                        event.set()
                    if flushing:
                        self.flushed.set()
                    elif self.flushed.is_set():
                        self.flushed = anyio.Event()
                    for key, entry in periodic.items():
                        old = self._periodic_scopes.pop(key, None)
                        if old is not None:
                            old.cancel()
                        if entry is not None:
                            scope = anyio.CancelScope()
                            self._periodic_scopes[key] = scope
                            task_group.start_soon(self._run_periodic, key, scope, *entry)
                    await self._wake_event.wait()
        finally:
            with ledger.lock:
                self._wake = None

    def _on_wake(self) -> None:
        if self._wake_event is not None:
            self._wake_event.set()

    async def _run_periodic(
        self, key: Hashable, scope: anyio.CancelScope, interval: float, job: PeriodicJob
    ) -> None:
        """Run one periodic job on its interval; a failure is logged, never raised."""
        last_error: str | None = None
        with scope:
            while True:
                await anyio.sleep(interval)
                try:
                    with anyio.fail_after(max(interval, 1.0) * 4):
                        await job()
                    last_error = None
                except Exception as exc:  # noqa: BLE001 - logged once per message; the job runs on
                    message = f"{type(exc).__name__}: {exc}"
                    if message != last_error:
                        logger.warning("Periodic job %s failed: %s", key, message)
                    last_error = message

    async def _serve_target(
        self,
        slot: TargetSlot,
        limiter: anyio.CapacityLimiter,
        thread_limiter: anyio.CapacityLimiter,
    ) -> None:
        """Run a target's jobs one after another, with retries, until none waits."""
        ledger = self._ledger
        job: Job | None = None
        while True:
            with ledger.lock:
                job = ledger.next_job_locked(slot, job)
                if job is None:
                    return
                attempt = slot.attempts
            outcome = await self._attempt(slot, job, limiter, thread_limiter)
            finished = outcome.ok or not outcome.retryable or attempt >= self._retry.max_attempts
            retry_wake: anyio.Event | None = None
            with ledger.lock:
                change = ledger.record_attempt_locked(slot, outcome)
                if finished:
                    ledger.finish_job_locked(slot, outcome.ok)
                    delay = 0.0
                else:
                    delay = self._retry.delay(attempt, self._rng)
                    event = anyio.Event()
                    if delay > 0 and ledger.retry_waits_locked(slot, event):
                        retry_wake = event
            _log_attempt(slot.path, outcome, change, attempt, finished)
            if finished:
                job = None
            elif retry_wake is not None:
                with anyio.move_on_after(delay):
                    await retry_wake.wait()
                with ledger.lock:
                    ledger.retry_wait_ended_locked(slot)

    async def _attempt(
        self,
        slot: TargetSlot,
        job: Job,
        limiter: anyio.CapacityLimiter,
        thread_limiter: anyio.CapacityLimiter,
    ) -> AttemptOutcome:
        async with limiter:
            in_thread = not _is_async_callable(job.backup)
            with self._ledger.lock:
                self._ledger.attempt_started_locked(slot, in_thread=in_thread)
            try:
                if in_thread:
                    returned = await anyio.to_thread.run_sync(
                        self._call_in_thread,
                        slot,
                        job,
                        abandon_on_cancel=True,  # only close() cancels; a stuck call is left
                        limiter=thread_limiter,
                    )
                else:
                    returned = job.backup(slot.path, job.is_directory)
                if inspect.isawaitable(returned):
                    returned = await returned
            except Exception as exc:  # noqa: BLE001 - recorded, logged, and named by flush
                return outcome_of_exception(exc)
        return outcome_of_result(returned)

    def _call_in_thread(self, slot: TargetSlot, job: Job) -> object:
        try:
            return job.backup(slot.path, job.is_directory)
        finally:
            with self._ledger.lock:
                self._ledger.thread_call_ended_locked(slot)


def _is_async_callable(backup: object) -> bool:
    """A coroutine function, a bound async method, or an object with ``async __call__``."""
    if inspect.iscoroutinefunction(backup):
        return True
    call = getattr(type(backup), "__call__", None)  # noqa: B004 - the method, not callability
    return inspect.iscoroutinefunction(call)


def _log_attempt(
    path: Path, outcome: AttemptOutcome, change: str | None, attempt: int, finished: bool
) -> None:
    if change == "recovered":
        logger.info("Backup of %s succeeded again after earlier failures.", path)
    elif change == "failed":
        if not finished:
            logger.warning("Backup of %s failed (will retry): %s", path, outcome.error)
        elif not outcome.retryable:
            logger.warning("Backup of %s failed (not retried): %s", path, outcome.error)
        else:
            tries = "1 try" if attempt == 1 else f"{attempt} tries"
            logger.warning("Backup of %s failed (gave up after %s): %s", path, tries, outcome.error)
    elif not outcome.ok:
        logger.debug("Backup of %s failed again (attempt %d): %s", path, attempt, outcome.error)
