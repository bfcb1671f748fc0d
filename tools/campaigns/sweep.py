"""The sweep the kill and fault campaigns run in a child process.

It runs :func:`sweepsafe.sweep.run_sweep` against a simulated Drive (a local folder with
the faults of a JSON plan file, re-read before every Drive operation) and tells the
campaign what it is doing as JSON lines on stdout, one event a line::

    {"event": "run_sweep_called", "study_dir": "...", ...}
    {"event": "trial_start", "number": 0}
    {"event": "initial_backup_done"}          the first copy of study.db reached Drive
    {"event": "trial_done", "number": 0, "finished": 1, "duration_s": 0.03}
    {"event": "final_flush"}                  the last trial ended; the final backup follows
    {"event": "sweep_returned", "report": {...}, ...}
    {"event": "backup_returned", "report": {...}}   only with --after-sweep backup-on-go

Every version of every file an objective writes is first appended to ``--versions-log``
(its path relative to the study folder and its SHA-256), so that a campaign can prove any
file it finds on Drive is a version the local file really had.

    python tools/campaigns/sweep.py --local-root L --drive-root D --plan P --n-trials 20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from sweepsafe.backup import StudyBackupReport, backup_hpo_study_to_drive
from sweepsafe.errors import LeaseHeldError, StudyConflictError
from sweepsafe.sweep import run_sweep, study_dir_for, trial_dir
from sweepsafe.testing import simulated_store

STUDY_KEY = {"campaign": "sweepsafe", "model": "quadratic"}
CHUNK_BYTES = 64 * 1024

_emit_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Tell the campaign what just happened: one JSON line on stdout, flushed at once."""
    line = json.dumps({"event": event, "t": time.monotonic(), **fields}, default=str)
    with _emit_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class VersionLog:
    """Appends (path, sha256) of every file version before the file is written."""

    def __init__(self, path: Path | None, study_dir: Path) -> None:
        self._path = path
        self._study_dir = study_dir
        self._lock = threading.Lock()

    def write_file(self, target: Path, content: bytes, over_s: float = 0.0) -> None:
        """Record ``content`` as a version of ``target``, then write it in chunks.

        The chunks are spread over ``over_s`` seconds, as a training loop that streams a
        large checkpoint would: a copy running meanwhile can see the file half written.
        """
        if self._path is not None:
            entry = {
                "path": target.relative_to(self._study_dir).as_posix(),
                "sha256": hashlib.sha256(content).hexdigest(),
                "size": len(content),
            }
            with self._lock, self._path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")
        starts = range(0, len(content), CHUNK_BYTES)
        pace = threading.Event()
        with target.open("wb") as out:
            for start in starts:
                out.write(content[start : start + CHUNK_BYTES])
                out.flush()
                if over_s:
                    pace.wait(over_s / len(starts))


class SweepsafeLogEvents(logging.Handler):
    """Turns sweepsafe's log records into events; notes the first backup reaching Drive."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("First backup of") and "reached Drive" in message:
            emit("initial_backup_done")
        if record.levelno >= logging.WARNING:
            emit("log", level=record.levelname, logger=record.name, message=message)


def make_objective(
    study_dir: Path, versions: VersionLog, seed: int, trial_ms: tuple[float, float], max_kib: int
) -> Any:
    """An objective of 20-50 ms that writes a checkpoint twice and a result file."""

    def objective(trial: optuna.trial.Trial) -> float:
        started = time.monotonic()
        emit("trial_start", number=trial.number)
        rng = random.Random(f"{seed}:{trial.number}")
        x = trial.suggest_float("x", -10.0, 10.0)
        depth = trial.suggest_int("depth", 1, 8)
        folder = trial_dir(study_dir, trial)
        budget = rng.uniform(*trial_ms) / 1000.0
        for epoch in range(2):
            size = rng.randint(4, max_kib) * 1024
            versions.write_file(folder / "checkpoint.bin", rng.randbytes(size), budget * 0.4)
            # The trial's "training": half its time after each checkpoint.
            threading.Event().wait(max(0.0, started + budget * (epoch + 1) / 2 - time.monotonic()))
        value = (x - 2.0) ** 2 + depth
        result = json.dumps({"number": trial.number, "x": x, "depth": depth, "value": value})
        versions.write_file(folder / "result.json", result.encode())
        return value

    return objective


class TrialMarkers:
    """The first callback: announces each finished trial and the start of the final flush.

    After the trials in ``pause_after`` it waits for a line on stdin, so that a campaign
    can change the Drive's faults at an exact point of the sweep (the backup worker
    goes on meanwhile; only the next trial waits).
    """

    def __init__(self, n_trials: int, pause_after: frozenset[int] = frozenset()) -> None:
        self._n_trials = n_trials
        self._pause_after = pause_after

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        finished = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        duration = None
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
        emit(
            "trial_done",
            number=trial.number,
            state=trial.state.name,
            finished=finished,
            duration_s=duration,
        )
        if trial.number in self._pause_after:
            emit("paused", number=trial.number)
            sys.stdin.readline()
        if finished >= self._n_trials:
            emit("final_flush")


def describe_report(report: StudyBackupReport | None) -> dict[str, Any] | None:
    """The end-of-sweep report as plain JSON for the campaign."""
    if report is None:
        return None
    verification = report.verification
    return {
        "ok": report.ok,
        "timed_out": report.timed_out,
        "duration_s": report.duration_s,
        "error": report.error,
        "text": str(report),
        "targets": [
            {
                "target": str(target.target),
                "ok": target.ok,
                "pending": target.pending,
                "last_error": target.last_error,
            }
            for target in report.targets
        ],
        "verification": None
        if verification is None
        else {
            "exists": verification.exists,
            "ok": verification.ok,
            "error": verification.error,
            "trial_counts": dict(verification.trial_counts),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-root", type=Path, required=True)
    parser.add_argument("--drive-root", type=Path, required=True)
    parser.add_argument("--plan", type=Path, required=True, help="the fault plan JSON file")
    parser.add_argument("--n-trials", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--versions-log", type=Path, default=None)
    parser.add_argument("--flush-timeout", type=float, default=60.0)
    parser.add_argument("--drive-timeout", type=float, default=None)
    parser.add_argument("--trial-ms", type=float, nargs=2, default=(20.0, 50.0))
    parser.add_argument("--max-kib", type=int, default=1024, help="largest checkpoint, KiB")
    parser.add_argument("--n-jobs", type=int, default=1, help="Optuna's n_jobs")
    parser.add_argument(
        "--after-sweep",
        choices=("exit", "backup-on-go"),
        default="exit",
        help="backup-on-go: wait for a line on stdin, then back up the study again",
    )
    parser.add_argument("--backup-timeout", type=float, default=60.0)
    parser.add_argument(
        "--pause-after",
        type=int,
        nargs="*",
        default=(),
        help="after these trial numbers, wait for a line on stdin",
    )
    args = parser.parse_args(argv)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweepsafe_logger = logging.getLogger("sweepsafe")
    sweepsafe_logger.setLevel(logging.INFO)
    sweepsafe_logger.addHandler(SweepsafeLogEvents())

    output_dir = args.local_root / "out"
    study_dir = study_dir_for(output_dir, STUDY_KEY)
    store_kwargs: dict[str, Any] = {}
    if args.drive_timeout is not None:
        store_kwargs["drive_timeout"] = args.drive_timeout
    store = simulated_store(args.local_root, args.drive_root, args.plan, **store_kwargs)
    versions = VersionLog(args.versions_log, study_dir)
    objective = make_objective(
        study_dir, versions, args.seed, tuple(args.trial_ms), max(4, args.max_kib)
    )
    emit("run_sweep_called", study_dir=str(study_dir))
    try:
        result = run_sweep(
            objective,
            output_dir=output_dir,
            study_key=STUDY_KEY,
            n_trials=args.n_trials,
            direction="minimize",
            sampler=optuna.samplers.RandomSampler(seed=args.seed),
            callbacks=[TrialMarkers(args.n_trials, frozenset(args.pause_after))],
            backup_to_drive=store,
            flush_timeout=args.flush_timeout,
            n_jobs=args.n_jobs,
        )
    except (LeaseHeldError, StudyConflictError) as exc:
        # Another runtime holds the study, or this one's local study diverged from
        # Drive's: a refusal, said in one sentence, not a crash.
        emit("refused", kind=type(exc).__name__, message=str(exc))
        store.close()
        return 3
    except BaseException as exc:
        emit("sweep_raised", error=repr(exc), traceback=traceback.format_exc())
        raise
    states: dict[str, int] = {}
    for trial in result.study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    emit(
        "sweep_returned",
        report=describe_report(result.backup_report),
        backup_ok=result.backup_ok,
        restored_from_drive=result.restored_from_drive,
        resumed_trials=result.resumed_trials,
        states=states,
    )
    if args.after_sweep == "backup-on-go":
        emit("waiting_for_go")
        sys.stdin.readline()
        report = backup_hpo_study_to_drive(
            output_dir, store, study_dir=study_dir, timeout=args.backup_timeout
        )
        emit("backup_returned", report=describe_report(report))
    store.close()
    emit("exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
