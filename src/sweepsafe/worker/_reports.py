"""What the backup worker tells its caller: flush reports and statistics snapshots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sweepsafe.errors import BackupFailed

__all__ = ["FlushReport", "TargetReport", "TargetState", "WorkerStats"]


@dataclass(frozen=True)
class TargetReport:
    """Where one backup target stood when a flush returned."""

    target: Path
    """The absolute local path that was submitted."""
    is_directory: bool
    ok: bool
    """The latest job for this target finished and succeeded."""
    pending: bool
    """A job for this target had not finished when the flush returned."""
    attempts: int
    """Attempts made by the latest job (including its retries)."""
    last_success: float | None
    """Wall-clock time (``time.time()``) of the newest successful copy, or ``None``."""
    last_error: str | None
    """Why the latest failed attempt failed, or ``None`` after a success."""
    last_result: object
    """What the backup callable returned last (e.g. a ``BackupResult``), or ``None``."""


@dataclass(frozen=True)
class FlushReport:
    """The outcome of :meth:`BackupWorker.flush` (or ``close``): every target the worker knows.

    ``str(report)`` is a one-line summary that names every failed or pending target.
    """

    targets: tuple[TargetReport, ...]
    timed_out: bool
    """The flush gave up waiting; the pending targets are still being worked on."""
    duration_s: float

    @property
    def ok(self) -> bool:
        """Every target's latest job finished and succeeded."""
        return all(report.ok for report in self.targets)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def failed(self) -> tuple[TargetReport, ...]:
        """Targets whose latest job finished and failed (after its retries)."""
        return tuple(r for r in self.targets if not r.ok and not r.pending)

    @property
    def pending(self) -> tuple[TargetReport, ...]:
        """Targets with a job not finished when the flush returned."""
        return tuple(r for r in self.targets if r.pending)

    def __str__(self) -> str:
        total = len(self.targets)
        noun = "target" if total == 1 else "targets"
        problems = [r for r in self.targets if not r.ok]
        if not problems:
            return f"{total} {noun} backed up"
        reasons = ", ".join(f"{r.target} ({self._reason(r)})" for r in problems)
        return f"{len(problems)} of {total} {noun} not backed up: {reasons}"

    def _reason(self, report: TargetReport) -> str:
        if report.pending:
            tried = f"; the last attempt failed: {report.last_error}" if report.last_error else ""
            if self.timed_out:
                return f"pending: flush timed out after {self.duration_s:.3g} s{tried}"
            return f"pending: the worker stopped before the backup finished{tried}"
        return f"failed: {report.last_error or 'unknown error'}"

    def raise_for_failures(self) -> None:
        """Raise :class:`~sweepsafe.errors.BackupFailed` naming every failed or pending target.

        Raises:
            BackupFailed: some target was not backed up.
        """
        if not self.ok:
            raise BackupFailed(str(self))


@dataclass(frozen=True)
class TargetState:
    """One target in a :class:`WorkerStats` snapshot."""

    target: Path
    last_success: float | None
    """Wall-clock time (``time.time()``) of the newest successful copy, or ``None``."""
    last_error: str | None
    """Why the latest failed attempt failed, or ``None`` after a success."""
    running: bool
    """A copy of this target is in progress."""
    waiting: bool
    """A job for this target waits to run: for its turn, a free slot, or a retry."""
    copies: int
    """Successful copies of this target so far."""


@dataclass(frozen=True)
class WorkerStats:
    """A consistent snapshot of a worker's counters, taken at one instant."""

    submitted: int
    """Calls of ``submit`` that were accepted."""
    coalesced: int
    """Submits that added nothing because a job for the same target was already waiting."""
    started: int
    """Jobs started (a job with retries counts once)."""
    succeeded: int
    """Jobs that finished with a successful copy."""
    failed: int
    """Jobs that failed for good (after their retries, or not retryable)."""
    retried: int
    """Retry attempts made."""
    bytes_copied: int
    """Bytes the backup callables reported copying."""
    targets: tuple[TargetState, ...]
