"""A runtime for the kill-point tests: a sweep, or a restore of a chosen generation.

Run as ``python kill_point_runtime.py sweep|restore --local DIR --drive DIR --stop FILE
...``. Its Drive helper is ``kill_point_helper.py`` obeying the ``--stop`` file, so the
test can SIGKILL it at one chosen Drive-side operation. Prints one JSON line per event.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import optuna

from sweepsafe import DriveStore, run_sweep, study_dir_for, trial_dir
from sweepsafe.errors import SweepsafeError

HELPER = Path(__file__).with_name("kill_point_helper.py")


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def die_before(name: str) -> None:
    """SIGKILL this process (its helpers live on, as a killed notebook's would not
    matter) the moment the restore calls ``sweepsafe.drive._restore.<name>``."""
    from sweepsafe.drive import _restore

    original: Callable[..., object] = getattr(_restore, name)

    def dying(*args: object) -> object:
        emit("dying", before=name)
        os.kill(os.getpid(), signal.SIGKILL)
        return original(*args)

    setattr(_restore, name, dying)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["sweep", "restore", "grow"])
    parser.add_argument("--local", required=True)
    parser.add_argument("--drive", required=True)
    parser.add_argument("--stop", required=True)
    parser.add_argument("--key", default="kill-points")
    parser.add_argument("--trials", type=int, default=0)
    parser.add_argument("--generation", type=int)
    parser.add_argument("--keep", type=int, default=10)
    parser.add_argument("--compact", type=float, default=1.0)
    parser.add_argument("--extra", default="", help="a further file each trial writes")
    parser.add_argument("--die-before", help="a function of the restore: SIGKILL on calling it")
    args = parser.parse_args()
    if args.die_before:
        die_before(args.die_before)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = DriveStore(
        args.local,
        args.drive,
        helper_command=[sys.executable, "-I", str(HELPER), args.stop],
        drive_timeout=20.0,
        keep_generations=args.keep,
        compact_fraction=args.compact,
    )
    output_dir = Path(args.local) / "out"
    study_dir = study_dir_for(output_dir, args.key)
    try:
        if args.action == "grow":
            # One trial, one backup: a history that depends on nothing but sizes.
            study_dir.mkdir(parents=True, exist_ok=True)
            database = study_dir / "study.db"
            study = optuna.create_study(study_name=args.key, storage=f"sqlite:///{database}")
            for number in range(args.trials):
                study.tell(study.ask(), float(number))
                grown = store.backup(database)
                assert grown.ok, grown.error
            emit("done", ok=True, report="")
            return 0
        if args.action == "restore":
            result = store.restore(study_dir / "study.db", generation=args.generation)
            emit("restored", ok=result.ok, error=result.error, generation=result.generation)
            return 0

        def objective(trial: optuna.Trial) -> float:
            x = trial.suggest_float("x", -10.0, 10.0)
            folder = trial_dir(study_dir, trial)
            (folder / "model.txt").write_text(f"trial {trial.number}\n")
            if args.extra:
                (folder / args.extra).write_text(f"trial {trial.number}\n")
            emit("trial", trial=trial.number)
            return (x - 2.0) ** 2

        try:
            result_sweep = run_sweep(
                objective,
                output_dir=output_dir,
                study_key=args.key,
                n_trials=args.trials,
                backup_to_drive=store,
                flush_timeout=60.0,
            )
        except SweepsafeError as exc:
            emit("refused", ok=False, error=str(exc))
            return 0
    finally:
        store.close()
    report = result_sweep.backup_report
    emit("done", ok=bool(report and report.ok), report=str(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
