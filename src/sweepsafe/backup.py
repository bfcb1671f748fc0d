"""Backup policy for Optuna: the per-trial callbacks and the end-of-sweep backup.

The callbacks only hand a job to a :class:`~sweepsafe.worker.BackupWorker`; every byte
is moved on the worker's background loop, so a trial never waits for Drive. The
worker alone decides where a job runs: an async backup on its loop, a sync one in a
thread it abandons if it hangs.
"""

from __future__ import annotations

import logging
import os
import stat as stat_module
import time
from collections.abc import Awaitable
from pathlib import Path

import anyio

from sweepsafe._blocking import run_blocking
from sweepsafe._callbacks import (
    STUDY_DB_NAME,
    TRIALS_DIR_NAME,
    BackupProgress,
    backup_job,
    create_incremental_backup_callback,
    create_study_db_backup_callback,
    create_trial_backup_callback,
    keep_leases_alive,
    submit_initial_backup,
    trial_folder_name,
)
from sweepsafe._callbacks import BackupToDrive as BackupToDrive
from sweepsafe._callbacks import OptunaCallback as OptunaCallback
from sweepsafe._study_report import StudyBackupReport
from sweepsafe.drive import BackupBackend, BackupResult, ObjectStore, VerifyResult, check_database
from sweepsafe.drive._reserved_names import STATE_DIR_NAME, is_temp_name
from sweepsafe.drive._sqlite_inspect import is_sqlite_file
from sweepsafe.errors import StudyNotFoundError
from sweepsafe.paths import is_drive_path, is_within
from sweepsafe.worker import BackupWorker, get_default_worker

__all__ = [
    "STUDY_DB_NAME",
    "TRIALS_DIR_NAME",
    "BackupProgress",
    "StudyBackupReport",
    "backup_hpo_study_to_drive",
    "create_incremental_backup_callback",
    "create_study_db_backup_callback",
    "create_trial_backup_callback",
    "find_study_dir",
    "keep_leases_alive",
    "refuse_study_outside_store",
    "submit_initial_backup",
    "trial_folder_name",
]

logger = logging.getLogger(__name__)

_SIDE_SUFFIXES = ("-wal", "-shm", "-journal")


def find_study_dir(
    backbone_output_dir: str | os.PathLike[str], study_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Find the canonical study folder under ``backbone_output_dir``.

    The ``study_dir`` given wins; else the only ``study-*`` folder holding a
    ``study.db``; else, of several, the one whose ``study.db`` changed last (logged).

    Raises:
        StudyNotFoundError: no study folder is there.
    """
    if study_dir is not None:
        found = Path(os.path.abspath(study_dir))
        if not (found / STUDY_DB_NAME).is_file():
            raise StudyNotFoundError(
                f"{found} holds no {STUDY_DB_NAME}; pass the folder that run_sweep created "
                "(OUTPUT_DIR/study-<hash>)."
            )
        return found
    root = Path(os.path.abspath(backbone_output_dir))
    candidates = sorted(
        (path for path in root.glob("study-*") if (path / STUDY_DB_NAME).is_file()),
        key=lambda path: (path / STUDY_DB_NAME).stat().st_mtime_ns,
    )
    if not candidates:
        raise StudyNotFoundError(
            f"No study folder (study-*/{STUDY_DB_NAME}) in {root}; "
            "check the output folder, or run the sweep first."
        )
    if len(candidates) > 1:
        logger.info(
            "%d study folders in %s; backing up %s, whose %s changed last.",
            len(candidates),
            root,
            candidates[-1].name,
            STUDY_DB_NAME,
        )
    return candidates[-1]


def refuse_study_outside_store(study_dir: Path, backup_to_drive: BackupToDrive | None) -> None:
    """Refuse a study that ``backup_to_drive``, a store, could never back up.

    Raises:
        ValueError: ``study_dir`` is not inside the store's ``local_root``.
    """
    if not isinstance(backup_to_drive, BackupBackend):
        return
    root = backup_to_drive.local_root
    if is_within(study_dir, root):
        return
    raise ValueError(
        f"The study folder {study_dir} is not inside {root}, the local folder this store "
        "backs up, so none of its backups could be made. Give an output_dir under "
        f"{root}, or create the store with a local folder that holds {study_dir.parent}."
    )


def _study_targets(study_dir: Path) -> tuple[list[tuple[Path, bool]], list[str]]:
    """The backup targets of a study folder, ``study.db`` first, and entries left out.

    Each entry is its own target (``trials/`` is one), the same targets the callbacks
    use. The symlink rule of the whole study folder applies here too: a link to a file
    inside the study folder is backed up as that file; any other link is left out and
    named, and never makes the backup incomplete.
    """
    targets: list[tuple[Path, bool]] = [(study_dir / STUDY_DB_NAME, False)]
    skipped: list[str] = []
    real = os.path.realpath(study_dir)
    entries = sorted(study_dir.iterdir())
    names = {entry.name for entry in entries}
    for entry in entries:
        name = entry.name
        if name in (STUDY_DB_NAME, STATE_DIR_NAME) or is_temp_name(name):
            continue
        if _is_side_file(study_dir, name, names):
            continue
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        if stat_module.S_ISLNK(info.st_mode):
            target = os.path.realpath(entry)
            if is_within(target, real) and os.path.isfile(target):
                targets.append((entry, False))
            else:
                skipped.append(f"{name} (a link to {target}; its target is not backed up)")
        elif stat_module.S_ISDIR(info.st_mode):
            targets.append((entry, True))
        elif stat_module.S_ISREG(info.st_mode):
            targets.append((entry, False))
        else:
            skipped.append(f"{name} (not a regular file)")
    return targets, skipped


def _is_side_file(folder: Path, name: str, names: set[str]) -> bool:
    """``name`` is the ``-wal``, ``-shm`` or ``-journal`` of a database beside it (whose
    snapshot holds its content); any other name is the user's, whatever it ends with."""
    for suffix in _SIDE_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and base in names:
            return base == STUDY_DB_NAME or is_sqlite_file(str(folder / base))
    return False


def backup_hpo_study_to_drive(
    backbone_output_dir: str | os.PathLike[str],
    backup_to_drive: BackupToDrive | None,
    *,
    study_dir: str | os.PathLike[str] | None = None,
    worker: BackupWorker | None = None,
    timeout: float | None = None,
    verify: bool = True,
    release: bool = True,
    progress: BackupProgress | None = None,
) -> StudyBackupReport:
    """Back up a finished sweep to Drive and wait for it, up to ``timeout`` seconds.

    The end-of-sweep call. It finds the study folder (see :func:`find_study_dir`). If the
    folder is on Drive it only verifies its database. Otherwise it schedules ``study.db``
    (a checked snapshot, which also brings the plain Drive copy up to date) and every
    other entry of the folder (``trials/`` walked whole), waits for them and for every
    earlier per-trial job, then checks the Drive copy. With ``release``, a complete
    wait gives the study's lease back so that the next runtime starts at once. The copy
    of ``study.db`` updates ``progress``, as the per-trial copies do. Blocks the calling
    thread; never waits longer than ``timeout`` for Drive.

    Raises:
        StudyNotFoundError: no study folder in ``backbone_output_dir``.
        ValueError: the study folder is not inside the ``local_root`` of the store given
            as ``backup_to_drive``.
    """
    started = time.monotonic()
    found = find_study_dir(backbone_output_dir, study_dir)
    database = found / STUDY_DB_NAME
    store = backup_to_drive if isinstance(backup_to_drive, BackupBackend) else None
    object_store = isinstance(store, ObjectStore)
    if is_drive_path(found):
        return StudyBackupReport(
            study_dir=found,
            on_drive=True,
            verification=_verify(store, database, timeout),
            duration_s=time.monotonic() - started,
        )
    if backup_to_drive is None:
        return StudyBackupReport(
            study_dir=found,
            on_drive=False,
            error="no backup_to_drive was given, so nothing was copied to Drive",
            duration_s=time.monotonic() - started,
        )
    refuse_study_outside_store(found, backup_to_drive)
    worker = worker or get_default_worker()
    if worker.closed:
        # A closed worker drops every submit: its reports are of earlier copies.
        return StudyBackupReport(
            study_dir=found,
            on_drive=False,
            error=f"the backup worker {worker!r} was closed, so nothing was copied to Drive; "
            "pass a worker that is open (or none, for the default one)",
            duration_s=time.monotonic() - started,
        )
    targets, skipped = _study_targets(found)
    try:
        for target, is_directory in targets:
            # The end of the sweep: the database's plain copy brought up to date, and every
            # file's newest version shipped (a file still being rewritten is waited for).
            counts = progress if target == database else None
            job = backup_job(backup_to_drive, counts, final=True)
            worker.submit(target, job, is_directory=is_directory)
        logger.info(
            "Waiting %s for the backup of %s to reach %s.",
            "without a time limit" if timeout is None else f"up to {timeout:g} s",
            found,
            "the object store" if object_store else "Drive",
        )
        flush = worker.flush(timeout)
    except BaseException:
        # Ctrl-C here, or a signal handler's exception (SIGTERM turned into SystemExit),
        # gives up waiting for these backups: a flush that times out at once records
        # that, so the exit does not wait for them again, silently, for its own timeout.
        worker.flush(0)
        raise
    wanted = {target for target, _ in targets}
    reports = tuple(report for report in flush.targets if report.target in wanted)
    for report in reports:
        if isinstance(report.last_result, BackupResult):
            skipped.extend(s for s in report.last_result.skipped if s not in skipped)
    verification: VerifyResult | None = None
    remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
    if verify and store is not None and not flush.timed_out:
        verification = _verify(store, database, remaining, of=timeout)
    if release and store is not None and not flush.timed_out:
        _bounded(store.arelease(found), remaining)
    return StudyBackupReport(
        study_dir=found,
        on_drive=False,
        targets=reports,
        verification=verification,
        timed_out=flush.timed_out,
        duration_s=time.monotonic() - started,
        skipped=tuple(skipped),
        object_store=object_store,
    )


def _bounded(awaitable: Awaitable[object], timeout: float | None) -> None:
    async def run() -> None:
        with anyio.move_on_after(timeout):
            await awaitable

    run_blocking(run)


def _verify(
    store: BackupBackend | None,
    database: Path,
    timeout: float | None,
    *,
    of: float | None = None,
) -> VerifyResult:
    """Check the Drive copy of ``database`` (or ``database`` itself on Drive), bounded:
    ``timeout`` is what is left of a longer one, ``of``, when the backups used the rest."""

    async def verify_bounded() -> VerifyResult | None:
        with anyio.move_on_after(timeout):
            if store is None:
                return await check_database(database, timeout=timeout or 120.0)
            return await store.averify(database)
        return None

    # With no time left the check is not begun: begun, its first steps could finish
    # before the cancel lands, which makes the outcome depend on the machine's load.
    no_time = timeout is not None and timeout <= 0
    verification = None if no_time else run_blocking(verify_bounded)
    if verification is None:
        place = "The object store" if isinstance(store, ObjectStore) else "Google Drive"
        within = f"within {timeout:g} s"
        if of is not None and timeout is not None and timeout < of:
            within = f"in the {timeout:.1f} s the backups left of the {of:g} s timeout"
        return VerifyResult(
            path=database,
            exists=False,
            error=f"{place} did not answer {within} while checking the copy",
        )
    return verification
