"""``sweepsafe run``, ``backup`` and ``restore``: a user's sweep and single copies, from a shell."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO, cast

from sweepsafe.backup import STUDY_DB_NAME, BackupProgress
from sweepsafe.cli._errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_UNSOUND, CommandError
from sweepsafe.cli._progress import SweepProgressBar
from sweepsafe.cli._status import inspect_database
from sweepsafe.drive import BackupResult, DriveStore
from sweepsafe.errors import DriveNotMountedError, SweepsafeError
from sweepsafe.paths import COLAB_DRIVE_MOUNT, DRIVE_ROOTS_ENV
from sweepsafe.sweep import SweepResult, run_sweep, study_dir_for
from sweepsafe.worker import BackupWorker

if TYPE_CHECKING:
    import argparse

    from optuna.trial import Trial

__all__ = [
    "STUDY_DIR_ENV",
    "backup_command",
    "check_drive_dir",
    "load_objective",
    "restore_command",
    "run_command",
]

COLAB_DEFAULT_SUBDIR = "sweepsafe"

STUDY_DIR_ENV = "SWEEPSAFE_STUDY_DIR"
"""Set by ``sweepsafe run`` to the study folder, for the objective's ``trial_dir``."""


def load_objective(spec: str) -> Callable[[Trial], Any]:
    """Import ``MODULE:FUNCTION``; MODULE is a module name or a path to a ``.py`` file.

    The current directory is put on ``sys.path`` first, so a module beside the user is
    found as it would be by ``python -c "import mymodule"``.

    Raises:
        CommandError: the spec is malformed, the module does not import, or the
            function is missing or not callable.
    """
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise CommandError(
            f"objective {spec!r} is not MODULE:FUNCTION (e.g. mymodule:objective or "
            "train.py:objective)"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _import_module(module_name)
    try:
        objective = getattr(module, function_name)
    except AttributeError:
        raise CommandError(
            f"module {module_name!r} has no function {function_name!r}; "
            f"check the name after the ':' in {spec!r}"
        ) from None
    if not callable(objective):
        raise CommandError(
            f"{spec} is a {type(objective).__name__}, not a function taking an Optuna trial"
        )
    return cast("Callable[[Trial], Any]", objective)


def _import_module(name: str) -> ModuleType:
    is_file = name.endswith(".py") or os.sep in name or (os.altsep or os.sep) in name
    try:
        if not is_file:
            return importlib.import_module(name)
        path = Path(os.path.abspath(name))
        if not path.is_file():
            raise CommandError(f"cannot import objective module {name!r}: {path} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise CommandError(f"cannot import objective module {name!r}: not a Python file")
        # Siblings of the file import as they would when it runs as a script.
        sys.path.insert(0, str(path.parent))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    except CommandError:
        raise
    except Exception as exc:  # any error in the user's module, reported in a line
        raise CommandError(
            f"cannot import objective module {name!r}: {type(exc).__name__}: {exc}"
        ) from exc


def check_drive_dir(drive_dir: Path, local_dir: Path, *, local_option: str) -> None:
    """Refuse a Drive folder that cannot work before anything is written.

    Raises:
        DriveNotMountedError: the Drive mount holding ``drive_dir`` is missing.
        CommandError: its parent folder is missing, or it overlaps ``local_dir``.
    """
    for root in _drive_roots():
        if _is_within(drive_dir, root):
            mounted = root / "MyDrive" if str(root) == COLAB_DRIVE_MOUNT else root
            if not mounted.is_dir():
                how = (
                    f" (in Colab: from google.colab import drive; drive.mount('{root}'))"
                    if str(root) == COLAB_DRIVE_MOUNT
                    else ""
                )
                raise DriveNotMountedError(
                    f"Google Drive is not mounted: {mounted} is not a folder; mount it{how}"
                )
    if _is_within(drive_dir, local_dir) or _is_within(local_dir, drive_dir):
        raise CommandError(
            f"conflicting options: the Drive folder {drive_dir} and {local_option} {local_dir} "
            "overlap; the Drive copy must be outside the folder it backs up, and the other "
            "way round"
        )
    if not drive_dir.parent.is_dir():
        raise CommandError(
            f"{drive_dir.parent} (the parent of the Drive folder) does not exist; create it, "
            "or check that Drive is mounted"
        )


def _drive_roots() -> list[Path]:
    extra = [entry for entry in os.environ.get(DRIVE_ROOTS_ENV, "").split(os.pathsep) if entry]
    return [Path(os.path.abspath(root)) for root in (COLAB_DRIVE_MOUNT, *extra)]


def _is_within(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([path, root]) == str(root)
    except ValueError:
        return False


def _store_for_run(output_dir: Path, drive_dir: str | None) -> DriveStore:
    if drive_dir is None:
        if (Path(COLAB_DRIVE_MOUNT) / "MyDrive").is_dir() or _on_colab():
            # /content/drive/MyDrive/sweepsafe, or a clear "Drive is not mounted".
            return DriveStore.for_colab(output_dir, COLAB_DEFAULT_SUBDIR)
        raise CommandError(
            "--drive-dir is required outside Colab (on Colab it defaults to "
            f"{COLAB_DRIVE_MOUNT}/MyDrive/{COLAB_DEFAULT_SUBDIR})"
        )
    drive = Path(os.path.abspath(drive_dir))
    check_drive_dir(drive, output_dir, local_option="--output-dir")
    return DriveStore(output_dir, drive)


def _on_colab() -> bool:
    try:
        return importlib.util.find_spec("google.colab") is not None
    except ImportError:
        return False


def run_command(args: argparse.Namespace, out: TextIO, *, show_progress: bool) -> int:
    """Run the user's objective with backups to Drive; 1 if the Drive copy is incomplete."""
    output_dir = Path(os.path.abspath(args.output_dir))
    store = _store_for_run(output_dir, args.drive_dir)
    try:
        objective = _WatchedObjective(load_objective(args.objective))
        study_dir = study_dir_for(output_dir, args.study_key)
        _refuse_unsound_local_study(study_dir / STUDY_DB_NAME)
        # The objective cannot be handed an argument, so it finds its study folder here.
        os.environ[STUDY_DIR_ENV] = str(study_dir)
        progress = BackupProgress()
        worker = BackupWorker()
        bar = SweepProgressBar(
            total=args.trials, progress=progress, worker=worker, enabled=show_progress
        )
        result: SweepResult | None = None
        try:
            result = run_sweep(
                objective,
                output_dir=output_dir,
                study_key=args.study_key,
                n_trials=args.trials,
                timeout=args.timeout,
                direction=args.direction,
                n_jobs=args.n_jobs,
                callbacks=[bar],
                backup_to_drive=store,
                restore=not args.restore_disabled,
                flush_timeout=args.flush_timeout,
                worker=worker,
                progress=progress,
            )
        except SweepsafeError:
            raise
        except KeyboardInterrupt:
            raise CommandError(
                "interrupted, after the final backup to Drive (a warning above names "
                "anything not backed up); run the same command again to resume",
                EXIT_INTERRUPTED,
            ) from None
        except Exception as exc:
            raise _explain_sweep_failure(exc, objective) from exc
        finally:
            bar.finish(drive_complete=_final_backup_ok(result))
            worker.close(timeout=args.flush_timeout)
    finally:
        store.close()
    _print_run_summary(result, out)
    return EXIT_OK if result.backup_ok else EXIT_UNSOUND


class _WatchedObjective:
    """The user's objective, remembering what it raised, to tell its errors from others."""

    def __init__(self, objective: Callable[[Trial], Any]) -> None:
        self._objective = objective
        self.raised: BaseException | None = None

    def __call__(self, trial: Trial) -> Any:
        try:
            return self._objective(trial)
        except BaseException as exc:
            self.raised = exc
            raise


def _explain_sweep_failure(exc: Exception, objective: _WatchedObjective) -> CommandError:
    if exc is objective.raised:
        return CommandError(
            f"the sweep stopped: the objective raised {type(exc).__name__}: {exc} "
            "(the study was backed up as far as it got; fix the objective and run the "
            "same command again to resume)",
            EXIT_UNSOUND,
        )
    return CommandError(
        f"the sweep stopped: {type(exc).__name__}: {exc} (run with --verbose for the details)",
        EXIT_UNSOUND,
    )


def _refuse_unsound_local_study(database: Path) -> None:
    """Stop before Optuna opens a local database that is corrupt or not SQLite."""
    if not os.path.lexists(database):
        return
    report = inspect_database(database)
    if not report.sound:
        raise CommandError(
            f"{report.error}; move it away and run again to restore the study from Drive",
            EXIT_UNSOUND,
        )


def _final_backup_ok(result: SweepResult | None) -> bool | None:
    if result is None or result.backup_report is None:
        return None
    return result.backup_report.ok


def _print_run_summary(result: SweepResult, out: TextIO) -> None:
    study = result.study
    finished = [
        t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")
    ]
    origin = ""
    if result.resumed_trials:
        source = "restored from Drive" if result.restored_from_drive else "found locally"
        origin = f", {result.resumed_trials} of them {source}"
    out.write(f"Study {study.study_name} in {result.study_dir}\n")
    out.write(f"  {len(finished)} finished trials{origin}\n")
    if len(study.directions) == 1:
        try:
            out.write(f"  best value {study.best_value:.6g} with {study.best_params}\n")
        except ValueError:
            out.write("  no completed trial yet\n")
    if result.backup_report is not None:
        out.write(f"{result.backup_report}\n")


def _store_for_copy(args: argparse.Namespace) -> tuple[DriveStore, Path]:
    local_root = Path(os.path.abspath(args.local_root))
    drive_root = Path(os.path.abspath(args.drive_root))
    path = Path(os.path.abspath(args.path))
    check_drive_dir(drive_root, local_root, local_option="--local-root")
    if not _is_within(path, local_root):
        raise CommandError(
            f"conflicting options: {path} is not inside --local-root {local_root}; give a "
            "path under it"
        )
    return DriveStore(local_root, drive_root), path


def backup_command(args: argparse.Namespace, out: TextIO) -> int:
    """Copy one file or folder to Drive and wait for it; 1 if the copy failed."""
    store, path = _store_for_copy(args)
    with store:
        if not os.path.lexists(path):
            raise CommandError(f"{path} does not exist, so there is nothing to back up")
        result = store.backup(path, is_directory=path.is_dir())
    return _report_copy("Backed up", result, out)


def restore_command(args: argparse.Namespace, out: TextIO) -> int:
    """Copy the Drive copy of one file or folder back; 1 if the restore failed."""
    store, path = _store_for_copy(args)
    with store:
        remote = store.drive_path_for(path)
        if not os.path.lexists(remote):
            raise CommandError(
                f"Google Drive holds no copy of {path} (looked for {remote}); nothing to restore"
            )
        result = store.restore(path, is_directory=remote.is_dir())
    return _report_copy("Restored", result, out)


def _report_copy(verb: str, result: BackupResult, out: TextIO) -> int:
    if not result.ok:
        raise CommandError(
            result.error or f"{verb.lower()} of {result.source} failed", EXIT_UNSOUND
        )
    detail = f"{result.bytes_copied / 1e6:.2f} MB"
    if result.kind == "directory":
        detail += f" in {result.files_copied} files ({result.files_unchanged} unchanged)"
    out.write(
        f"{verb} {result.source} -> {result.destination}: {detail}, {result.duration_s:.1f} s\n"
    )
    return EXIT_OK
