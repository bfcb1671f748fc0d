"""``sweepsafe demo``: a real sweep against a slowed stand-in for Drive, timed against none.

The demo runs the same seeded sweep twice: once without backups (the baseline), once
backed up to a local folder whose writes are slowed like Drive's. The trials should take
the same time both ways, since the per-trial callbacks only schedule copies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sweepsafe.cli._common import (
    add_progress_options,
    non_negative_float,
    positive_int,
    quiet_optuna,
    show_progress,
)
from sweepsafe.cli._errors import EXIT_OK, EXIT_UNSOUND, CommandError
from sweepsafe.cli._progress import SweepProgressBar
from sweepsafe.cli._status import check, sound
from sweepsafe.testing import FaultPlan, simulated_store
from sweepsafe.worker import BackupWorker

if TYPE_CHECKING:
    from optuna.trial import Trial

    from sweepsafe.backup import StudyBackupReport
    from sweepsafe.drive import DriveStore
    from sweepsafe.sweep import SweepResult
    from sweepsafe.worker import WorkerStats

__all__ = ["register"]

DEMO_STUDY_KEY = {"demo": "quadratic-2d", "version": 1}
_SEED = 20240601
_FINISHED_STATES = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class _TimedSweep:
    sweep_s: float
    """From the start of ``run_sweep`` to the end of the last trial."""
    total_s: float
    """The whole ``run_sweep`` call, including the final backup."""
    best_value: float | None
    report: StudyBackupReport | None


def quadratic_objective(study_dir: Path, trial_seconds: float) -> Callable[[Trial], float]:
    """A 2-D quadratic with its minimum 0 at (1, -2); each trial sleeps and writes a file."""
    from sweepsafe.sweep import trial_dir

    def objective(trial: Trial) -> float:
        x = trial.suggest_float("x", -5.0, 5.0)
        y = trial.suggest_float("y", -5.0, 5.0)
        time.sleep(trial_seconds)  # stands in for training a model
        value = (x - 1.0) ** 2 + (y + 2.0) ** 2
        result = {"x": x, "y": y, "value": value}
        (trial_dir(study_dir, trial) / "result.json").write_text(json.dumps(result) + "\n")
        return value

    return objective


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``demo`` to the command's parser."""
    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="run a real sweep against a slowed stand-in for Drive and show the overhead",
        description="Run a seeded Optuna sweep twice, without and with backups to a local "
        "folder slowed like Drive, and report the overhead and the Drive copy.",
    )
    demo.add_argument("--trials", type=positive_int, default=60, help="trials (default 60)")
    demo.add_argument(
        "--trial-seconds",
        type=non_negative_float,
        default=0.05,
        help="time each trial sleeps (default 0.05)",
    )
    demo.add_argument(
        "--drive-latency",
        type=non_negative_float,
        default=0.5,
        help="seconds the stand-in Drive takes per file written (default 0.5)",
    )
    demo.add_argument(
        "--workdir", help="an empty or new folder to run in, kept (default: a temporary one)"
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    add_progress_options(demo)
    demo.set_defaults(command_function=demo_command)


def demo_command(args: argparse.Namespace, out: TextIO) -> int:
    """Run the demo; 1 if the final Drive copy is incomplete."""
    quiet_optuna()
    workdir, remove_after = _prepare_workdir(args.workdir, keep=args.keep)
    try:
        return _run_demo(args, workdir, remove_after, out, show_progress=show_progress(args))
    finally:
        if remove_after:
            shutil.rmtree(workdir, ignore_errors=True)


def _prepare_workdir(workdir: str | None, *, keep: bool) -> tuple[Path, bool]:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="sweepsafe-demo-")), not keep
    path = Path(os.path.abspath(workdir))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CommandError(
            f"--workdir {path} is not an empty folder; give a new or empty one, so that "
            "the demo starts a fresh sweep"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def _run_demo(
    args: argparse.Namespace, workdir: Path, remove_after: bool, out: TextIO, *, show_progress: bool
) -> int:
    from sweepsafe.backup import STUDY_DB_NAME, TRIALS_DIR_NAME
    from sweepsafe.sweep import study_dir_for

    trials: int = args.trials
    # The first sweep in a process pays one-off costs (creating the SQLite schema,
    # warming imports); an untimed one-trial sweep takes them so both timings are fair.
    _timed_sweep(workdir / "warm-up", 1, 0.0, None, None, show_progress=False)
    baseline = _timed_sweep(
        workdir / "baseline", trials, args.trial_seconds, None, None, show_progress
    )
    drive = workdir / "drive"
    store = simulated_store(workdir / "local", drive, FaultPlan(latency_s=args.drive_latency))
    worker = BackupWorker()
    try:
        backed_up = _timed_sweep(
            workdir / "local", trials, args.trial_seconds, store, worker, show_progress
        )
        stats = worker.stats()
    finally:
        worker.close(timeout=30.0)
        store.close()

    drive_study = study_dir_for(drive, DEMO_STUDY_KEY)
    copy = check(drive_study / STUDY_DB_NAME)
    drive_trials = sum(copy.trial_counts.get(state, 0) for state in _FINISHED_STATES)
    trial_folders = _count_folders(drive_study / TRIALS_DIR_NAME)
    complete = (
        sound(copy)
        and drive_trials == trials
        and trial_folders == trials
        and backed_up.report is not None
        and backed_up.report.ok
    )
    _print_summary(
        out,
        args,
        baseline,
        backed_up,
        stats,
        copy_sound=sound(copy),
        drive_trials=drive_trials,
        trial_folders=trial_folders,
    )
    _print_next_steps(out, drive, removed=remove_after)
    if not complete:
        problem = copy.error or (
            f"it holds {drive_trials} of {trials} trials and {trial_folders} trial folders"
        )
        raise CommandError(f"the Drive copy is incomplete: {problem}", EXIT_UNSOUND)
    return EXIT_OK


def _timed_sweep(
    output_dir: Path,
    trials: int,
    trial_seconds: float,
    store: DriveStore | None,
    worker: BackupWorker | None,
    show_progress: bool,
) -> _TimedSweep:
    import optuna

    from sweepsafe.backup import BackupProgress
    from sweepsafe.sweep import run_sweep, study_dir_for

    progress = BackupProgress()
    bar = SweepProgressBar(
        total=trials,
        progress=progress,
        worker=worker,
        enabled=show_progress,
        description="with backup" if store is not None else "no backup",
    )
    objective = quadratic_objective(study_dir_for(output_dir, DEMO_STUDY_KEY), trial_seconds)
    started = time.monotonic()
    result: SweepResult | None = None
    try:
        result = run_sweep(
            objective,
            output_dir=output_dir,
            study_key=DEMO_STUDY_KEY,
            n_trials=trials,
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=_SEED),
            callbacks=[bar],
            backup_to_drive=store,
            backup_enabled=store is not None,
            flush_timeout=120.0,
            worker=worker,
            progress=progress,
        )
    finally:
        report = None if result is None else result.backup_report
        bar.finish(drive_complete=None if report is None else report.ok)
    ended = time.monotonic()
    last_trial = bar.last_trial_ended or ended
    return _TimedSweep(
        sweep_s=last_trial - started,
        total_s=ended - started,
        best_value=result.study.best_value,
        report=result.backup_report,
    )


def _count_folders(folder: Path) -> int:
    try:
        return sum(1 for entry in folder.iterdir() if entry.is_dir())
    except OSError:
        return 0


def _print_summary(
    out: TextIO,
    args: argparse.Namespace,
    baseline: _TimedSweep,
    backed_up: _TimedSweep,
    stats: WorkerStats,
    *,
    copy_sound: bool,
    drive_trials: int,
    trial_folders: int,
) -> None:
    ratio = backed_up.sweep_s / baseline.sweep_s if baseline.sweep_s > 0 else float("nan")
    flush_s = backed_up.total_s - backed_up.sweep_s
    # Timings of a few seconds wobble by some percent from run to run.
    meaning = ": the trials did not wait for Drive" if ratio < 1.15 else ""
    per_target = ", ".join(
        f"{state.target.name} {state.copies}" for state in stats.targets if state.copies
    )
    verdict = (
        f"sound: integrity check ok, {drive_trials} of {args.trials} trials, "
        f"{trial_folders} trial folders"
        if copy_sound
        else "NOT sound"
    )
    best = f"{backed_up.best_value:.4g}" if backed_up.best_value is not None else "-"
    rows = [
        ("trials", f"{args.trials} of {args.trial_seconds:g} s each, best value {best}"),
        ("sweep without backup", f"{baseline.sweep_s:.2f} s"),
        ("sweep with backup", f"{backed_up.sweep_s:.2f} s  (overhead ratio {ratio:.2f}{meaning})"),
        (
            "final flush",
            f"{flush_s:.2f} s  (copying what was still behind when the last trial ended)",
        ),
        (
            "Drive copies made",
            f"{stats.succeeded} ({per_target}); {stats.coalesced} of {stats.submitted} "
            "submits coalesced",
        ),
        ("Drive copy", verdict),
    ]
    if stats.failed:
        rows.append(("failed copies", str(stats.failed)))
    width = max(len(label) for label, _ in rows)
    out.write(
        f"sweepsafe demo: a real Optuna sweep backed up to a stand-in for Drive "
        f"(a local folder whose writes take {args.drive_latency:g} s per file)\n"
    )
    for label, value in rows:
        out.write(f"  {label.ljust(width)}  {value}\n")


def _print_next_steps(out: TextIO, drive: Path, *, removed: bool) -> None:
    if removed:
        out.write(
            "\nThe demo folder was removed. To look at the Drive copy, run the demo with "
            "--keep (or --workdir DIR) and then: sweepsafe status DIR/drive\n"
        )
    else:
        out.write(f"\nLook at the Drive copy:\n  sweepsafe status {drive}\n")
    out.write(
        "Plug in your own objective (a function taking an Optuna trial, in mymodule.py):\n"
        "  sweepsafe run mymodule:objective --output-dir ./sweeps --study-key my-sweep "
        "--drive-dir DRIVE_FOLDER --trials 100\n"
    )
