"""The live display of a sweep: a tqdm bar on stderr with the best value and the backup state."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import TYPE_CHECKING

# tqdm ships no type information (types-tqdm would add it).
from tqdm import tqdm

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial

    from sweepsafe.backup import BackupProgress
    from sweepsafe.worker import BackupWorker

__all__ = ["SweepProgressBar", "TqdmAwareHandler"]


class SweepProgressBar:
    """An Optuna callback drawing trials done, best value and how far Drive is behind.

    Thread-safe (Optuna calls it from pool threads with ``n_jobs > 1``). It runs before
    the backup callbacks, so the trial it is called for is counted here by hand. It
    also records when the last trial ended, to time the sweep apart from its final flush.
    """

    def __init__(
        self,
        *,
        total: int | None,
        progress: BackupProgress,
        worker: BackupWorker | None,
        enabled: bool,
        description: str = "trials",
    ) -> None:
        self._progress = progress
        self._worker = worker
        self._lock = threading.Lock()
        self._best: float | None = None
        self._maximize: bool | None = None
        self._resumed: int | None = None
        self._seen = 0
        self.last_trial_ended: float | None = None
        """``time.monotonic()`` when the newest trial ended; None before the first."""
        self._bar = tqdm(
            total=total,
            desc=description,
            unit="trial",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            leave=True,
        )

    def __call__(self, study: Study, trial: FrozenTrial) -> None:
        ended = time.monotonic()
        with self._lock:
            self.last_trial_ended = ended
            if self._resumed is None:
                # Before any backup callback has run, this is the study's count at the start.
                self._resumed = self._progress.trials_finished
                self._start_best(study)
            if trial.state.name in ("COMPLETE", "PRUNED"):
                self._seen += 1  # a FAIL trial is never finished, here or on Drive
            value = trial.value if len(trial.values or ()) == 1 else None
            if value is not None and not math.isnan(value) and trial.state.name == "COMPLETE":
                better = self._best is None or (
                    value > self._best if self._maximize else value < self._best
                )
                if better:
                    self._best = value
            self._draw()

    def finish(self, *, drive_complete: bool | None = None) -> None:
        """Draw the outcome of the final backup, if there was one, and close the bar."""
        with self._lock:
            self._draw(drive_complete=drive_complete)
            self._bar.close()

    def _start_best(self, study: Study) -> None:
        """Learn the direction, and the best value of a resumed study, once."""
        if len(study.directions) != 1:
            self._maximize = False
            return
        self._maximize = study.direction.name == "MAXIMIZE"
        try:
            self._best = study.best_value
        except ValueError:
            self._best = None

    def _draw(self, *, drive_complete: bool | None = None) -> None:
        if self._resumed is None:
            finished = self._progress.trials_finished
        else:
            finished = self._resumed + self._seen
        parts = []
        if self._best is not None:
            parts.append(f"best {self._best:.4g}")
        if self._worker is not None:
            stats = self._worker.stats(targets=False)  # at every trial: counters only
            if drive_complete is None:
                behind = max(0, finished - self._progress.trials_backed_up)
                state = f"{behind} behind"
            else:
                state = "copy complete" if drive_complete else "copy INCOMPLETE"
            drive = f"Drive: {stats.succeeded} copies, {stats.coalesced} coalesced, {state}"
            if stats.failed:
                drive += f", {stats.failed} FAILED"
            parts.append(drive)
        self._bar.n = finished
        self._bar.set_postfix_str(" | ".join(parts), refresh=True)


class TqdmAwareHandler(logging.Handler):
    """Writes log records to stderr without breaking a progress bar drawn there.

    Tracebacks are left out unless ``show_tracebacks``: the command says what went
    wrong in one line, and ``--verbose`` shows the details.
    """

    def __init__(self, *, show_tracebacks: bool) -> None:
        super().__init__()
        self._show_tracebacks = show_tracebacks
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not self._show_tracebacks and (record.exc_info or record.exc_text):
                record = logging.makeLogRecord(record.__dict__)
                record.exc_info = None
                record.exc_text = None
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
