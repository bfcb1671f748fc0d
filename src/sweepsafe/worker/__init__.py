"""The background worker that runs backup jobs off the caller's thread.

The worker knows nothing about Optuna or Drive: it runs callables on targets, coalesces
duplicate jobs per target, retries failures and reports what finished.
"""

from __future__ import annotations

from sweepsafe.worker._loop import pause
from sweepsafe.worker._reports import FlushReport, TargetReport, TargetState, WorkerStats
from sweepsafe.worker._retry import RetryPolicy
from sweepsafe.worker._worker import (
    BackupCallable,
    BackupOutcome,
    BackupWorker,
    get_default_worker,
    set_exit_timeout,
)

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
    "pause",
    "set_exit_timeout",
]
