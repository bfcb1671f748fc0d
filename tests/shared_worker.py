"""One worker of a shared study, as its own process: ``run_sweep(storage=URL)``.

Prints one JSON line per event on stdout (``trial_started``, ``trial``, ``exporting``,
``done``) so that a test can follow it and kill it at a chosen moment. Each trial writes
a file into its trial folder naming the trial and this worker.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import optuna

from sweepsafe import run_sweep, study_dir_for, trial_dir
from sweepsafe.errors import SweepsafeError
from sweepsafe.testing import simulated_store

KEY = "shared"


_EMITTING = threading.Lock()


def emit(event: str, **fields: object) -> None:
    # One write per line under a lock: the worker thread logs "exporting" while the trial
    # thread reports trials, and print() writes the text and its newline separately.
    line = json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n"
    with _EMITTING:
        sys.stdout.write(line)
        sys.stdout.flush()


class Events(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Exporting the shared study"):
            emit("exporting")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--local", required=True)
    parser.add_argument("--drive", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--trial-seconds", type=float, default=0.3)
    parser.add_argument("--export-interval", type=float, default=1.0)
    parser.add_argument("--flush-timeout", type=float, default=60.0)
    # A named pipe: this worker's first trial ends once the test opens it for writing.
    parser.add_argument("--gate")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("sweepsafe").setLevel(logging.INFO)
    logging.getLogger("sweepsafe").addHandler(Events())
    if os.environ.get("SHARED_WORKER_DEBUG"):
        debug = logging.StreamHandler()
        debug.setFormatter(logging.Formatter("%(created).2f %(name)s %(message)s"))
        logging.getLogger("sweepsafe").addHandler(debug)
        logging.getLogger("sweepsafe").setLevel(logging.DEBUG)
    store = simulated_store(args.local, args.drive, args.plan, lease_timeout=3.0, drive_timeout=20)
    study_dir = study_dir_for(Path(args.local) / "out", KEY)
    gates = [args.gate] if args.gate else []

    def objective(trial: optuna.Trial) -> float:
        emit("trial_started", trial=trial.number)
        x = trial.suggest_float("x", -10.0, 10.0)
        (trial_dir(study_dir, trial) / "model.txt").write_text(f"{args.name} {trial.number}\n")
        time.sleep(args.trial_seconds)
        if gates:
            with open(gates.pop()) as gate:  # blocks until the test opens it for writing
                gate.read()
        emit("trial", trial=trial.number)
        return (x - 2.0) ** 2

    try:
        result = run_sweep(
            objective,
            output_dir=Path(args.local) / "out",
            study_key=KEY,
            n_trials=args.trials,
            backup_to_drive=store,
            storage=args.url,
            heartbeat_interval=1,
            grace_period=3,
            export_interval=args.export_interval,
            flush_timeout=args.flush_timeout,
        )
    except SweepsafeError as exc:
        emit("error", message=str(exc))
        return 4
    finally:
        store.close()
    report = result.backup_report
    emit("done", ok=bool(report and report.ok), report=str(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
