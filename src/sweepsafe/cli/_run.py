"""``sweepsafe run``: the user's objective as a backed-up, resumable sweep."""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sweepsafe.cli._common import (
    add_drive_timeout_option,
    add_progress_options,
    check_drive_dir,
    check_timeout,
    kind_of,
    local_folder,
    non_negative_float,
    non_negative_int,
    object_store_for,
    positive_float,
    positive_int,
    quiet_optuna,
    read_timeout,
    show_progress,
    whole_number,
)
from sweepsafe.cli._errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNSOUND,
    CommandError,
)
from sweepsafe.cli._objective import WatchedObjective, explain_sweep_failure, load_objective
from sweepsafe.cli._progress import SweepProgressBar
from sweepsafe.drive import DriveStore
from sweepsafe.errors import LeaseHeldError, StorageError, StudyConflictError, SweepsafeError
from sweepsafe.paths import COLAB_DRIVE_MOUNT
from sweepsafe.worker import BackupWorker

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler

    from sweepsafe.sweep import SweepResult
    from sweepsafe.worker import FlushReport

__all__ = ["STUDY_DIR_ENV", "register"]

COLAB_DEFAULT_SUBDIR = "sweepsafe"
STUDY_DIR_ENV = "SWEEPSAFE_STUDY_DIR"
"""Set by ``sweepsafe run`` to the study folder, for the objective's ``trial_dir``."""

_SAMPLERS = ("tpe", "random", "nsga2", "cmaes", "qmc")
_PRUNERS = ("median", "hyperband", "successive-halving", "none")
# The final flush has waited as long as it was allowed to: closing the worker waits no
# more, it cuts short what is still in flight (abandoning its helpers), so the exit fits
# in the flush timeout plus a second.
_CLOSE_AFTER_FLUSH_S = 0.0


_SHARED_DEFAULTS: dict[str, float] = {
    "heartbeat_interval": 60,
    "max_retry": 3,
    "export_interval": 300.0,
}
"""The shared-study options' values when not given (``None`` means not given)."""


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``run`` to the command's parser."""
    run = commands.add_parser(
        "run",
        parents=[common],
        help="run your objective with backups to Drive; run again to resume",
        description="Run MODULE:FUNCTION as an Optuna objective. The study lives in "
        "OUTPUT_DIR/study-<hash of KEY> and is backed up to the Drive folder after every "
        "trial; running the same command again resumes it, from Drive if the local "
        "folder is gone or older.",
    )
    run.add_argument("objective", metavar="MODULE:FUNCTION", help="e.g. train:objective")
    run.add_argument("--output-dir", required=True, help="local folder of the study")
    run.add_argument("--study-key", required=True, help="names the study; same key, same study")
    run.add_argument(
        "--drive-dir",
        help="Drive folder for the copies (on Colab: /content/drive/MyDrive/sweepsafe), or an "
        "object store URL such as s3://bucket/prefix",
    )
    run.add_argument(
        "--trials", type=positive_int, help="total finished trials the study should have"
    )
    run.add_argument("--timeout", type=positive_float, help="stop starting trials after S s")
    run.add_argument(
        "--direction",
        choices=("minimize", "maximize"),
        help="default minimize for a new study; a resumed one keeps its own",
    )
    run.add_argument("--n-jobs", type=positive_int, default=1, help="trials run in parallel")
    run.add_argument("--sampler", choices=_SAMPLERS, default="tpe", help="default tpe")
    run.add_argument("--pruner", choices=_PRUNERS, default="median", help="default median")
    run.add_argument(
        "--seed",
        type=_seed,
        help="seed of the sampler (0 to 2**32 - 1), for a sweep that can be reproduced",
    )
    run.add_argument(
        "--no-restore",
        dest="restore_disabled",
        action="store_true",
        help="never restore from Drive (a Drive copy with more trials then refuses backups)",
    )
    run.add_argument(
        "--no-backup",
        action="store_true",
        help="run without any backup, e.g. to compare timings",
    )
    run.add_argument(
        "--takeover",
        action="store_true",
        help="take the study over from another runtime that still holds its lease (only "
        "when that runtime is gone)",
    )
    run.add_argument(
        "--flush-timeout",
        type=non_negative_float,
        default=300.0,
        help="seconds to wait for the final backup (default 300)",
    )
    run.add_argument(
        "--file-concurrency",
        type=positive_int,
        default=16,
        help="files copied to Drive at once (default 16)",
    )
    shared = run.add_argument_group("a sweep shared by several workers through a database server")
    shared.add_argument(
        "--storage",
        metavar="URL",
        help="the study lives in this database (postgresql://user@host/db); run the same "
        "command on every worker",
    )
    shared.add_argument(
        "--heartbeat-interval",
        type=positive_int,
        help="seconds between a running trial's heartbeats (default "
        f"{_SHARED_DEFAULTS['heartbeat_interval']:g})",
    )
    shared.add_argument(
        "--grace-period",
        type=positive_int,
        help="a trial silent this long is stale, failed and retried (default: 2 heartbeats)",
    )
    shared.add_argument(
        "--max-retry",
        type=non_negative_int,
        help=f"retries of a trial whose worker died (default {_SHARED_DEFAULTS['max_retry']})",
    )
    shared.add_argument(
        "--export-interval",
        type=positive_float,
        help="seconds between exports of the study to Drive (default "
        f"{_SHARED_DEFAULTS['export_interval']:g})",
    )
    add_drive_timeout_option(run)
    add_progress_options(run)
    run.set_defaults(command_function=run_command)


def _seed(text: str) -> int:
    """An argparse type: a seed every sampler takes (NumPy's range)."""
    return whole_number(text, 0, 2**32 - 1)


def _store_for_run(output_dir: Path, args: argparse.Namespace) -> DriveStore:
    options = {"file_concurrency": args.file_concurrency, "drive_timeout": read_timeout(args)}
    if args.drive_dir is None:
        if (
            kind_of(Path(COLAB_DRIVE_MOUNT) / "MyDrive", check_timeout(args)) == "dir"
            or _on_colab()
        ):
            # /content/drive/MyDrive/sweepsafe, or a clear "Drive is not mounted".
            return DriveStore.for_colab(output_dir, COLAB_DEFAULT_SUBDIR, **options)
        raise CommandError(
            "--drive-dir is required outside Colab (on Colab it defaults to "
            f"{COLAB_DRIVE_MOUNT}/MyDrive/{COLAB_DEFAULT_SUBDIR}); or run with --no-backup"
        )
    store = object_store_for(output_dir, args.drive_dir, **options)
    if store is not None:
        return store
    drive = Path(os.path.abspath(args.drive_dir))
    check_drive_dir(drive, output_dir, local_option="--output-dir", timeout=check_timeout(args))
    return DriveStore(output_dir, drive, **options)


def _on_colab() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("google.colab") is not None
    except ImportError:
        return False


def _sampler(args: argparse.Namespace) -> BaseSampler:
    import optuna

    seed: int | None = args.seed
    samplers = optuna.samplers
    if args.sampler == "random":
        return samplers.RandomSampler(seed=seed)
    if args.sampler == "nsga2":
        return samplers.NSGAIISampler(seed=seed)
    if args.sampler == "cmaes":
        return samplers.CmaEsSampler(seed=seed)
    if args.sampler == "qmc":
        return samplers.QMCSampler(seed=seed)
    return samplers.TPESampler(seed=seed)


def _pruner(args: argparse.Namespace) -> BasePruner:
    import optuna

    pruners = optuna.pruners
    if args.pruner == "hyperband":
        return pruners.HyperbandPruner()
    if args.pruner == "successive-halving":
        return pruners.SuccessiveHalvingPruner()
    if args.pruner == "none":
        return pruners.NopPruner()
    return pruners.MedianPruner()


def _shared(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name)
    return _SHARED_DEFAULTS[name] if value is None else value


class _ReportPrintedHere(logging.Filter):
    """Drops the log record of the final report: the command prints the report itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "sweepsafe_report", False)


def _refuse_options_that_do_nothing(args: argparse.Namespace) -> None:
    """An option the rest of the command line makes meaningless is a mistake to name,
    not to ignore: the user expects it to act."""
    if args.no_backup:
        for given, flag in ((args.drive_dir, "--drive-dir"), (args.takeover, "--takeover")):
            if given:
                raise CommandError(
                    f"{flag} does nothing with --no-backup (nothing goes to Drive); drop one "
                    "of them"
                )
    if args.storage is None:
        shared = {
            "--heartbeat-interval": args.heartbeat_interval,
            "--grace-period": args.grace_period,
            "--max-retry": args.max_retry,
            "--export-interval": args.export_interval,
        }
        for flag, value in shared.items():
            if value is not None:
                raise CommandError(
                    f"{flag} applies to a study shared through --storage URL; without "
                    "--storage it does nothing, so drop it or give --storage"
                )


def run_command(args: argparse.Namespace, out: TextIO) -> int:
    """Run the user's objective with backups to Drive; 1 if the Drive copy is incomplete."""
    _refuse_options_that_do_nothing(args)
    # Imported here: the other commands, and a bad option, need neither Optuna nor these.
    from sweepsafe.backup import BackupProgress
    from sweepsafe.sweep import run_sweep, study_dir_for

    quiet_optuna()
    output_dir = local_folder(args.output_dir, "--output-dir")
    store = None if args.no_backup else _store_for_run(output_dir, args)
    objective = WatchedObjective(load_objective(args.objective))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(
            f"--output-dir {output_dir} cannot be created ({exc.strerror or exc}); give a "
            "writable folder on local disk"
        ) from None
    study_dir = study_dir_for(output_dir, args.study_key)
    # The objective cannot be handed an argument, so it finds its study folder here.
    os.environ[STUDY_DIR_ENV] = str(study_dir)
    progress = BackupProgress()
    worker = BackupWorker() if store is not None else None
    bar = SweepProgressBar(
        total=args.trials, progress=progress, worker=worker, enabled=show_progress(args)
    )
    report_filter = _ReportPrintedHere()
    sweep_logger = logging.getLogger("sweepsafe.sweep")
    sweep_logger.addFilter(report_filter)
    result: SweepResult | None = None
    final: FlushReport | None = None
    started = time.monotonic()
    try:
        result = run_sweep(
            objective,
            output_dir=output_dir,
            study_key=args.study_key,
            n_trials=args.trials,
            timeout=args.timeout,
            direction=args.direction,
            sampler=_sampler(args),
            pruner=_pruner(args),
            n_jobs=args.n_jobs,
            callbacks=[bar],
            backup_to_drive=store,
            backup_enabled=store is not None,
            restore=not args.restore_disabled,
            takeover=args.takeover,
            flush_timeout=args.flush_timeout,
            worker=worker,
            progress=progress,
            storage=args.storage,
            heartbeat_interval=_shared(args, "heartbeat_interval"),
            grace_period=args.grace_period,
            max_retry=int(_shared(args, "max_retry")),
            export_interval=float(_shared(args, "export_interval")),
        )
    except (LeaseHeldError, StudyConflictError, StorageError) as exc:
        raise CommandError(str(exc), EXIT_BAD_INPUT) from None
    except SweepsafeError:
        raise
    except KeyboardInterrupt:
        raise CommandError(_interrupted(worker), EXIT_INTERRUPTED) from None
    except Exception as exc:
        raise explain_sweep_failure(exc, objective) from exc
    finally:
        sweep_logger.removeFilter(report_filter)
        report = None if result is None else result.backup_report
        bar.finish(drive_complete=None if report is None else report.ok)
        if worker is not None:
            final = worker.close(timeout=_CLOSE_AFTER_FLUSH_S)
        if store is not None:
            store.close()
    _print_run_summary(result, out, time.monotonic() - started, final)
    return EXIT_OK if result.backup_ok else EXIT_UNSOUND


def _interrupted(worker: BackupWorker | None) -> str:
    """What Ctrl-C left behind, in words that are true whenever it came."""
    resume = "run the same command again to resume"
    if worker is None:
        return f"interrupted; {resume}"
    report = worker.flush(0)
    if report.ok:
        return f"interrupted, after a complete backup to Drive; {resume}"
    missing = len(report.failed) + len(report.pending)
    return (
        f"interrupted before the final backup finished: {missing} target(s) not backed up "
        f"to Drive (the Drive copy holds what reached it before); {resume}"
    )


def _print_run_summary(
    result: SweepResult, out: TextIO, duration_s: float, final: FlushReport | None
) -> None:
    study = result.study
    finished = [
        t.number for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")
    ]
    origin = ""
    if result.resumed_trials:
        source = "restored from Drive" if result.restored_from_drive else "found locally"
        origin = f", {result.resumed_trials} of them {source}"
    out.write(f"Study {study.study_name} in {result.study_dir} ({duration_s:.1f} s)\n")
    out.write(f"  {len(finished)} finished trials{origin}\n")
    if len(study.directions) == 1:
        try:
            out.write(f"  best value {study.best_value:.6g} with {study.best_params}\n")
        except ValueError:
            out.write("  no completed trial yet\n")
    report = result.backup_report
    if report is None:
        return
    out.write(f"{report}\n")
    if not report.ok and not report.missing_files and final is not None:
        out.write(_trial_files_line(result.study_dir, finished, final))


def _trial_files_line(study_dir: Path, finished: list[int], final: FlushReport) -> str:
    """How many finished trials of this run have files not known to be on Drive.

    A trial's files are on Drive once its own folder copy succeeded, or once the final
    copy of the whole ``trials/`` folder did.
    """
    from sweepsafe.backup import TRIALS_DIR_NAME, trial_folder_name

    trials = study_dir / TRIALS_DIR_NAME
    folders = {r.target.name: r for r in final.targets if r.target.parent == trials}
    whole = next((r for r in final.targets if r.target == trials), None)
    ran = [number for number in finished if trial_folder_name(number) in folders]
    lacking = (
        []
        if whole is not None and whole.ok
        else [n for n in ran if not folders[trial_folder_name(n)].ok]
    )
    if not ran:
        return ""
    if not lacking:
        return f"  The files of all {len(ran)} finished trials of this run reached Drive.\n"
    numbers = ", ".join(str(n) for n in lacking[:10]) + (", ..." if len(lacking) > 10 else "")
    return (
        f"  {len(lacking)} of the {len(ran)} finished trials of this run lack files on Drive "
        f"(trials {numbers}): their copies did not finish.\n"
    )
