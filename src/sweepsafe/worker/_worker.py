"""BackupWorker: runs backup callables on targets, off the caller's thread.

Trial threads call :meth:`BackupWorker.submit`, which only records the job and returns.
A daemon thread runs one anyio event loop (asyncio) on which every copy happens: a sync
callable in one of anyio's worker threads, an async one on the loop itself. Jobs for the
same target are coalesced, failed ones retried with backoff; :meth:`BackupWorker.flush`
waits, with a deadline, for what was submitted before it.

The worker knows nothing about Optuna or Drive.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from types import TracebackType
from typing import Protocol

from sweepsafe.worker._ledger import Job, TargetSlot, WorkerLedger
from sweepsafe.worker._loop import BackupLoop
from sweepsafe.worker._reports import FlushReport, TargetReport, TargetState, WorkerStats
from sweepsafe.worker._retry import RetryPolicy

__all__ = [
    "BackupCallable",
    "BackupOutcome",
    "BackupWorker",
    "FlushReport",
    "RetryPolicy",
    "TargetReport",
    "TargetState",
    "WorkerStats",
    "get_default_worker",
    "set_exit_timeout",
]

logger = logging.getLogger(__name__)


class BackupOutcome(Protocol):
    """What the worker reads from an object a backup callable returns.

    ``sweepsafe.drive.BackupResult`` is one. Every attribute is optional: the worker
    reads them with defaults, so any truthy (success) or falsy (failure) object works.
    """

    ok: bool
    error: str | None
    retryable: bool
    bytes_copied: int


BackupCallable = Callable[[Path, bool], object]
"""``backup(target, is_directory)``: copies one target; sync or async.

Returns (or, if async, resolves to) ``None`` or a truthy value on success, and a falsy
value (``False``, a :class:`BackupOutcome` whose ``ok`` is false) on failure; or raises.
The return type is ``object`` because the worker reads any result defensively. A sync
callable runs in a worker thread, a coroutine function on the worker's loop; a sync
callable that returns an awaitable has it awaited on the loop.
"""

# How long close() waits for the loop to stop once it has cancelled what is in flight:
# cancelling abandons stuck helpers and threads at once, so this is only a safety net.
_STOP_GRACE_S = 1.0
# CPython runs a signal's Python handler only between bytecodes: a Ctrl-C that lands after
# the last such check and before a lock wait begins is acted on only when the wait ends.
# A flush waits in slices this long, so Ctrl-C stops it within one slice, not at its
# timeout (a loaded machine preempting the caller in that gap makes it happen for real).
_SIGNAL_SLICE_S = 0.25


class BackupWorker:
    """Runs backup callables on a background event loop; ``submit`` never waits for them.

    At most one job per target runs and at most one waits: a submit while one waits is
    coalesced into it, a submit while one runs schedules exactly one more run after it.
    Different targets run concurrently, up to ``max_concurrency``; the same target never
    runs twice at once. Failed jobs are retried per ``retry``; a new submit replaces a
    retry still waiting out its delay.

    The loop (a daemon thread) starts on the first submit. All methods are thread-safe;
    ``submit``, ``flush`` and ``close`` must not be called from the loop's own thread
    (that is, from inside an async backup callable). Close the worker, or use it as a
    context manager, to wait for its copies: a daemon thread does not hold up the
    interpreter's exit. (:func:`get_default_worker`'s worker is closed at exit.)

    Example:
        >>> with BackupWorker() as worker:  # doctest: +SKIP
        ...     worker.submit("study/study.db", store.abackup)
        ...     print(worker.flush(timeout=60))
        1 target backed up
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 2,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, so one shared default is safe
        name: str = "sweepsafe-backup",
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, not {max_concurrency}")
        self._name = name
        self._ledger = WorkerLedger()
        # The loop runs on asyncio: aiofiles and the store's helper pipes need it.
        self._loop = BackupLoop(
            self._ledger, max_concurrency=max_concurrency, retry=retry, name=name
        )
        self._closed = False
        self._warned_closed = False
        self._given_up_at = -1
        self._parent_pid: int | None = None  # in a forked child: the pid it belongs to
        _live_workers.add(self)

    def __repr__(self) -> str:
        return f"<BackupWorker {self._name!r}>"

    def __enter__(self) -> BackupWorker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """:meth:`close` was called; submits are dropped."""
        return self._closed

    def submit(
        self,
        target: str | os.PathLike[str],
        backup: BackupCallable,
        *,
        is_directory: bool = False,
    ) -> None:
        """Schedule ``backup(target, is_directory)`` and return at once.

        Does no I/O (``target`` is made absolute with :func:`os.path.abspath`) and never
        waits for the loop or for a copy; the first call starts the loop's thread without
        waiting for the loop. An earlier failed backup never makes it raise (failures show
        in :meth:`flush` reports and in the log). When a job for ``target`` is already
        waiting, this call is coalesced into it, and the waiting job will use this call's
        ``backup``. After :meth:`close` the job is dropped, with one warning in the log.
        A job running on the worker's loop (a periodic one, say) may submit others.
        """
        key = os.path.abspath(os.fspath(target))
        job = Job(backup, is_directory)
        with self._ledger.lock:
            if self._closed:
                self._warn_dropped_locked(key)
                return
            if self._ledger.submit_locked(key, job):
                self._loop.wake_locked()

    def every(
        self, key: Hashable, interval: float, job: Callable[[], Awaitable[object]] | None
    ) -> None:
        """Run the async ``job()`` every ``interval`` seconds on the loop, until replaced,
        removed (``job=None``) or the worker closes; never waits.

        For work that must go on while no trial ends, such as renewing a lease. A job
        that fails or takes more than four intervals is logged, and runs again next time.
        """
        if interval <= 0:
            raise ValueError(f"interval must be positive, not {interval}")
        with self._ledger.lock:
            if self._closed:
                return
            self._loop.every_locked(key, interval, job)

    def flush(self, timeout: float | None = None) -> FlushReport:
        """Block until every job submitted before this call finished, or ``timeout`` passed.

        A job has finished when it succeeded or failed for good (after its retries). The
        flush never cancels anything: when it times out it returns, with the unfinished
        targets marked pending, and they go on. Returns an empty report at once on a
        worker that was never given a job. While it waits, a job that only waits to
        space its work out (:func:`pause`) does not wait.

        Raises:
            RuntimeError: called from the worker loop's own thread.
        """
        if self._loop.is_loop_thread():
            raise RuntimeError(_LOOP_THREAD_MESSAGE.format(method="flush"))
        started = time.monotonic()
        deadline = None if timeout is None else started + max(0.0, timeout)
        ledger = self._ledger
        with ledger.lock:
            awaited = ledger.unfinished_locked()
            self._loop.flush_began_locked()
        try:
            return self._wait_for(awaited, started, deadline, timeout)
        except BaseException:
            # Ctrl-C, or a signal handler's exception (a SIGTERM turned into SystemExit on
            # a preempted machine, whose grace before SIGKILL is short), ended the wait:
            # whoever waited gave these up, so the exit hook must not make the process
            # wait for them again, silently, for its own timeout.
            with ledger.lock:
                self._given_up_at = ledger.seq
            raise
        finally:
            with ledger.lock:
                self._loop.flush_ended_locked()

    def _wait_for(
        self,
        awaited: list[tuple[TargetSlot, int]],
        started: float,
        deadline: float | None,
        timeout: float | None,
    ) -> FlushReport:
        ledger = self._ledger
        if awaited:
            # Logged outside the lock: a slow log handler must not hold up submit().
            logger.debug("Flush: waiting for %d targets (timeout %s s)", len(awaited), timeout)
        with ledger.lock:
            timed_out = False
            while not ledger.loop_stopped:
                awaited = [(slot, seq) for slot, seq in awaited if slot.finished_seq < seq]
                if not awaited:
                    break
                if deadline is None:
                    ledger.job_finished.wait(_SIGNAL_SLICE_S)
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        timed_out = True
                        # Someone already waited for these and gave up: the exit hook
                        # must not make them wait a second time.
                        self._given_up_at = ledger.seq
                        break
                    ledger.job_finished.wait(min(remaining, _SIGNAL_SLICE_S))
            return ledger.report_locked(timed_out, time.monotonic() - started)

    def waited_for_everything(self) -> bool:
        """A flush timed out after the newest submit: nothing new was asked for since."""
        with self._ledger.lock:
            return self._given_up_at == self._ledger.seq and self._ledger.seq > 0

    def close(self, timeout: float | None = 30.0) -> FlushReport:
        """Flush for up to ``timeout`` seconds, then stop the loop; idempotent.

        What is still in flight after the flush is cancelled: an async copy is cancelled
        (the store keeps the previous Drive copy whole); a sync callable stuck in a
        thread cannot be, so it is abandoned with a WARNING naming its target. Waits at
        most ``timeout`` plus a few seconds. Later submits are dropped (logged once).

        Raises:
            RuntimeError: called from the worker loop's own thread.
        """
        if self._loop.is_loop_thread():
            raise RuntimeError(_LOOP_THREAD_MESSAGE.format(method="close"))
        with self._ledger.lock:
            already_closed = self._closed
            self._closed = True
            thread = self._loop.thread
        if already_closed or thread is None:
            with self._ledger.lock:
                return self._ledger.report_locked(False, 0.0)
        report = self.flush(timeout)
        with self._ledger.lock:
            self._loop.stop_locked()
        thread.join(_STOP_GRACE_S)
        with self._ledger.lock:
            stuck = self._ledger.stuck_in_threads_locked()
        for path in stuck:
            logger.warning(
                "The backup of %s is stuck in a thread waiting for the Drive mount; it was "
                "abandoned, and the process may not exit until the Drive mount answers.",
                path,
            )
        if thread.is_alive():
            logger.warning("The backup worker %r did not stop in time; leaving it.", self._name)
        return report

    def stats(self, *, targets: bool = True) -> WorkerStats:
        """A consistent snapshot of the counters and (``targets``) of every target.

        The counters cost the same however many targets the worker has served; each
        target (one per trial folder in a sweep) adds to the cost of ``targets``, taken
        while submits wait, so a caller at every trial should leave them out.
        """
        with self._ledger.lock:
            return self._ledger.stats_locked(targets=targets)

    def _stay_with_parent(self, parent_pid: int) -> None:
        """In a forked child: the loop and the jobs are the parent's, and its copies go on
        there. The child's copy of the worker is closed: flush and close return at once,
        submits are dropped, and nothing of the parent's is waited for or reported."""
        self._ledger.forget_loop_after_fork()
        self._loop.forget_wake_after_fork()
        self._closed = True
        self._parent_pid = parent_pid

    def _warn_dropped_locked(self, key: str) -> None:
        if not self._warned_closed and self._parent_pid is not None:
            self._warned_closed = True
            logger.warning(
                "The backup worker %r belongs to process %d, which forked this one; "
                "dropping the backup of %s (and later ones): use a worker of this process.",
                self._name,
                self._parent_pid,
                key,
            )
        elif not self._warned_closed:
            self._warned_closed = True
            logger.warning(
                "The backup worker %r is closed; dropping the backup of %s (and later ones).",
                self._name,
                key,
            )


_LOOP_THREAD_MESSAGE = (
    "BackupWorker.{method}() was called from the worker's own event loop, where it would "
    "deadlock or reenter the worker; call it from another thread."
)


_default_lock = threading.Lock()
_default_worker: BackupWorker | None = None
_exit_hook_registered = False
_exit_timeout_s = 30.0
_live_workers: weakref.WeakSet[BackupWorker] = weakref.WeakSet()
_pid = os.getpid()


def _forget_workers_after_fork() -> None:
    """In a forked child (a data loader's worker, a hand-written ``os.fork()``): the
    workers, their threads and their jobs stay the parent's. Without this, a child that
    leaves through ``sys.exit`` would wait in the exit hook, for its timeout, for copies
    only the parent's thread runs, and then log them as not backed up.

    Runs while the child has one thread: locks another thread of the parent held at the
    fork are replaced, never taken.
    """
    global _default_lock, _default_worker, _pid
    parent_pid, _pid = _pid, os.getpid()
    _default_lock = threading.Lock()
    _default_worker = None
    for worker in list(_live_workers):
        worker._stay_with_parent(parent_pid)


os.register_at_fork(after_in_child=_forget_workers_after_fork)


def get_default_worker() -> BackupWorker:
    """The process-wide worker, created on first call (and again if it was closed).

    At interpreter exit it is closed with the timeout set by :func:`set_exit_timeout`
    (30 s unless changed), and whatever could not be backed up is logged by name.

    By then Python has shut down its ``concurrent.futures`` executors, so a copy that
    runs at exit must not use asyncio's default executor (``asyncio.to_thread``,
    ``loop.run_in_executor``, aiofiles); ``anyio.to_thread.run_sync`` still works.
    """
    global _default_worker, _exit_hook_registered
    with _default_lock:
        if _default_worker is None or _default_worker.closed:
            _default_worker = BackupWorker()
        if not _exit_hook_registered:
            atexit.register(_close_default_worker_at_exit)
            _exit_hook_registered = True
        return _default_worker


def set_exit_timeout(seconds: float) -> None:
    """How long the exit hook waits for the default worker's backups (default 30 s)."""
    global _exit_timeout_s
    if seconds < 0:
        raise ValueError(f"the exit timeout cannot be negative, not {seconds}")
    _exit_timeout_s = seconds


def reset_default_worker(timeout: float = 0.0) -> FlushReport | None:
    """Close the process-wide worker (waiting at most ``timeout``), forget it, and set the
    exit timeout back to 30 s: the next :func:`get_default_worker` makes a new one.

    For tests (``sweepsafe.testing.reset_default_worker``): global state left by one
    test must not leak into the next. Returns the closing report, None if there was no
    worker.
    """
    global _default_worker, _exit_timeout_s
    with _default_lock:
        worker, _default_worker = _default_worker, None
        _exit_timeout_s = 30.0
    return None if worker is None else worker.close(timeout)


def _close_default_worker_at_exit() -> None:
    with _default_lock:
        worker = _default_worker
        timeout = _exit_timeout_s
    if worker is None:
        return
    waited = worker.waited_for_everything()
    if waited:
        # The sweep's final flush already waited its timeout for what is still pending
        # and said so; waiting again would make the exit take twice as long.
        timeout = 0.0
    report = worker.close(timeout)
    if report.ok:
        return
    if waited and report.pending:
        logger.warning("At exit, %s", _not_waited_for_again(report))
    else:
        logger.warning("At exit, %s", report)


def _not_waited_for_again(report: FlushReport) -> str:
    """What the exit left undone when it did not wait again for what a flush gave up on
    (the report's own words would name a timeout of a few microseconds)."""
    pending = ", ".join(str(r.target) for r in report.pending)
    text = (
        f"{len(report.pending)} of {len(report.targets)} targets not backed up: {pending} "
        "(still unfinished when the last wait for them ended, so the exit did not wait again)"
    )
    failed = ", ".join(f"{r.target} (failed: {r.last_error})" for r in report.failed)
    return f"{text}; {failed}" if failed else text
