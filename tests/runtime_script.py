"""One "runtime" for the replica tests: a real sweep in its own process, as a notebook runs it.

Run as ``python runtime_script.py --local DIR --drive DIR --plan FILE --key KEY --trials N``.
Prints one JSON line per event on stdout (``opened``, ``trial``, ``done``, ``refused``) so
the test can follow it and kill it at a chosen moment. Each trial writes two small files
into its trial folder whose content names the trial and this runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import optuna

from sweepsafe import run_sweep, study_dir_for, trial_dir
from sweepsafe.errors import LeaseHeldError, StudyConflictError, SweepsafeError
from sweepsafe.testing import simulated_store

_EMITTING = threading.Lock()


def emit(event: str, **fields: object) -> None:
    # One write per line under a lock, so that no two events ever share a line.
    line = json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n"
    with _EMITTING:
        sys.stdout.write(line)
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local", required=True)
    parser.add_argument("--drive", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--name", default="runtime")
    parser.add_argument("--trial-seconds", type=float, default=0.0)
    parser.add_argument("--takeover", action="store_true")
    parser.add_argument("--hold", help="a file: a trial waits until it exists")
    parser.add_argument("--hold-from", type=int, default=0, help="the first trial to hold")
    parser.add_argument("--lease-timeout", type=float, default=120.0)
    parser.add_argument("--flush-timeout", type=float, default=60.0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = simulated_store(
        args.local, args.drive, args.plan, lease_timeout=args.lease_timeout, drive_timeout=20.0
    )
    output_dir = Path(args.local) / "out"

    held = threading.Event()

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -10.0, 10.0)
        if args.hold and not held.is_set() and trial.number >= args.hold_from:
            held.set()
            emit("holding", trial=trial.number)
            hold = Path(args.hold)
            while not hold.exists():
                threading.Event().wait(0.02)
        folder = trial_dir(os.environ["RUNTIME_STUDY_DIR"], trial)
        (folder / "model.txt").write_text(f"{args.name} trial {trial.number} x={x}\n")
        (folder / "metrics.json").write_text(json.dumps({"trial": trial.number, "x": x}))
        if args.trial_seconds:
            time.sleep(args.trial_seconds)
        emit("trial", trial=trial.number)
        return (x - 2.0) ** 2

    os.environ["RUNTIME_STUDY_DIR"] = str(study_dir_for(output_dir, args.key))
    try:
        result = run_sweep(
            objective,
            output_dir=output_dir,
            study_key=args.key,
            n_trials=args.trials,
            backup_to_drive=store,
            takeover=args.takeover,
            flush_timeout=args.flush_timeout,
        )
    except (LeaseHeldError, StudyConflictError) as exc:
        emit("refused", kind=type(exc).__name__, message=str(exc))
        return 3
    except SweepsafeError as exc:
        emit("error", kind=type(exc).__name__, message=str(exc))
        return 4
    finally:
        store.close()
    report = result.backup_report
    emit(
        "done",
        ok=bool(report and report.ok),
        report=str(report),
        restored=result.restored_from_drive,
        resumed=result.resumed_trials,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
