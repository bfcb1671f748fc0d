"""Opening a sweep's study the safe way: the lease, the restore from Drive, stale trials.

:func:`resume_study` (and ``run_sweep`` through ``_open_study``) makes this runtime
the study's one writer on Drive, brings the study back from Drive when the local
``study.db`` is missing or older, marks the trials a dead runtime left RUNNING as FAIL,
creates or loads the study, and schedules its first backup.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from sweepsafe._blocking import run_blocking
from sweepsafe._callbacks import (
    STUDY_DB_NAME,
    TRIAL_FOLDER,
    TRIALS_DIR_NAME,
    BackupProgress,
    BackupToDrive,
    keep_leases_alive,
    submit_initial_backup,
)
from sweepsafe.backup import refuse_study_outside_store
from sweepsafe.drive import BackupBackend, DriveStore, ObjectStore
from sweepsafe.drive._local_state import local_mark
from sweepsafe.drive._restore import GOING_BACK, set_aside_trial_folders
from sweepsafe.drive._sqlite import SnapshotError, read_content, recover_hot_journal
from sweepsafe.errors import LeaseHeldError, StudyConflictError, SweepsafeError
from sweepsafe.worker import BackupWorker, get_default_worker

if TYPE_CHECKING:
    from optuna.pruners import BasePruner
    from optuna.samplers import BaseSampler
    from optuna.study import Study
    from optuna.trial import FrozenTrial

__all__ = ["Direction", "resume_study"]

logger = logging.getLogger("sweepsafe.sweep")

Direction = Union[Literal["minimize", "maximize"], "StudyDirection"]

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class _Opened:
    study: Study
    restored: bool
    resumed: int
    stale: int


def resume_study(
    study_dir: str | os.PathLike[str],
    backup_to_drive: BackupToDrive | None,
    *,
    study_name: str | None = None,
    direction: Direction | None = None,
    directions: Sequence[Direction] | None = None,
    sampler: BaseSampler | None = None,
    pruner: BasePruner | None = None,
    restore: bool = True,
    takeover: bool = False,
    worker: BackupWorker | None = None,
) -> Study:
    """Open the study in ``study_dir/study.db`` the safe way, for your own ``study.optimize``.

    In order: this runtime checks no other one writes the study on Drive (its lease,
    which the first backup takes, or at once with ``takeover`` or trials to fail); the
    study comes back from Drive if the local one is missing or older (checked, never
    over newer local work); trials a dead runtime left RUNNING are marked FAIL (not
    those this process still runs, in another thread or a cell still running); the
    study is created or loaded; and its first backup is scheduled. Pair it with
    :func:`remaining_trials`, the backup callbacks, and :func:`backup_hpo_study_to_drive`
    at the end (see the README).

    Raises:
        LeaseHeldError: another runtime is backing this study up (``takeover=True`` if
            it is gone).
        StudyConflictError: the local study and the Drive copy diverged.
        ValueError: ``study_dir`` is not inside the ``local_root`` of the store given as
            ``backup_to_drive``.
        SweepsafeError: Drive holds a copy that cannot be restored, the local
            ``study.db`` is not an Optuna study, or its study is to be optimized in
            another direction than the one given.
    """
    return _open_study(
        Path(os.path.abspath(study_dir)),
        backup_to_drive,
        study_name=study_name,
        direction=direction,
        directions=directions,
        sampler=sampler,
        pruner=pruner,
        restore=restore,
        takeover=takeover,
        worker=worker,
        progress=None,
    ).study


def _open_study(
    study_dir: Path,
    backup_to_drive: BackupToDrive | None,
    *,
    study_name: str | None,
    direction: Direction | None,
    directions: Sequence[Direction] | None,
    sampler: BaseSampler | None,
    pruner: BasePruner | None,
    restore: bool,
    takeover: bool,
    worker: BackupWorker | None,
    progress: BackupProgress | None,
) -> _Opened:
    refuse_study_outside_store(study_dir, backup_to_drive)
    _refuse_file_as_folder(study_dir)
    storage_path = study_dir / STUDY_DB_NAME
    _refuse_foreign_database(storage_path)
    store = backup_to_drive if isinstance(backup_to_drive, BackupBackend) else None
    restored = False
    # A DriveStore's lease is only checked here and written by the first backup, so the
    # sweep never waits for a Drive write to start; a takeover must land before it runs.
    deferred = isinstance(store, DriveStore) and not takeover
    if store is not None:
        needed = not storage_path.exists() and restore
        _acquire(store, study_dir, takeover, needed=needed, write=not deferred)
        going_back = local_mark(store.local_root, GOING_BACK, storage_path)
        if restore and going_back.exists():
            raise SweepsafeError(_going_back_cut_short(going_back, storage_path))
        going_back.unlink(missing_ok=True)  # restore=False: the local study is kept
        if restore:
            restored = _reconcile_with_drive(store, study_dir)
    elif restore and backup_to_drive is not None and not storage_path.exists():
        logger.info(
            "No local %s and backup_to_drive is not a DriveStore, so nothing can be "
            "restored; starting a new study.",
            storage_path,
        )
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / TRIALS_DIR_NAME).mkdir(exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{storage_path}")
    name = study_name or study_dir.name
    _refuse_second_study(storage, storage_path, name)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=direction,
        directions=directions,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    _refuse_other_directions(study, storage_path, direction, directions)
    running = _left_by_another_process(
        study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), restored=restored
    )
    if running and deferred and store is not None:
        # Only the study's one writer fails trials left RUNNING: here the lease must be
        # on Drive first, not left to the first backup as on a clean start.
        _acquire(store, study_dir, takeover, needed=False, write=True)
    stale = _fail_stale_trials(storage, study, running)
    finished = len(study.get_trials(deepcopy=False, states=_FINISHED))
    if finished or stale:
        logger.info(
            "Resuming study %s with %d finished trials%s%s.",
            study.study_name,
            finished,
            " restored from Drive" if restored else "",
            f"; {stale} trials left RUNNING by a dead runtime marked FAIL" if stale else "",
        )
    if backup_to_drive is not None:
        worker = worker or get_default_worker()
        if progress is not None:
            # A restored database holds every trial it had; a local one may be ahead.
            progress._start(trials_finished=finished, trials_backed_up=finished if restored else 0)
        keep_leases_alive(backup_to_drive, worker)
        submit_initial_backup(storage_path, backup_to_drive, worker=worker, progress=progress)
    return _Opened(study, restored, finished, stale)


def _refuse_other_directions(
    study: Study,
    database: Path,
    direction: Direction | None,
    directions: Sequence[Direction] | None,
) -> None:
    """Optuna loads an existing study whatever direction it is given: a resumed sweep
    must not go on quietly optimizing the other way from the one its caller asked for.

    Raises:
        SweepsafeError: the study in ``database`` has other directions than those given.
    """
    given = [direction] if direction is not None else directions
    if given is None:
        return
    wanted = [d if isinstance(d, StudyDirection) else StudyDirection[d.upper()] for d in given]
    if wanted == list(study.directions):
        return
    have = [d.name.lower() for d in study.directions]
    asked = [d.name.lower() for d in wanted]
    keep = (
        f"direction={have[0]!r} (--direction {have[0]} on the command)"
        if len(have) == 1
        else f"directions={have!r}"
    )
    raise SweepsafeError(
        f"{database} holds the study {study.study_name!r}, which is to {' and '.join(have)}, "
        f"not {' and '.join(asked)}. Pass {keep} to continue it, or another study key "
        "for a new study."
    )


def _refuse_file_as_folder(study_dir: Path) -> None:
    """Refuse a study folder that is a file, or lies under one, before Drive is asked.

    Raises:
        SweepsafeError: ``study_dir`` (or the nearest of its parents that exists) is not
            a folder.
    """
    blocker = study_dir
    while not blocker.exists() and blocker.parent != blocker:
        blocker = blocker.parent
    if blocker.is_dir():
        return
    if blocker == study_dir and study_dir.name == STUDY_DB_NAME:
        raise SweepsafeError(
            f"{study_dir} is a study's database, not its folder; pass the folder that "
            f"holds it: resume_study({str(study_dir.parent)!r}, ...)."
        )
    raise SweepsafeError(
        f"{blocker} is a file, so the study folder {study_dir} cannot be created there; "
        "give an output folder (or study folder) that is a folder or does not exist yet."
    )


def _refuse_second_study(storage: optuna.storages.BaseStorage, database: Path, name: str) -> None:
    """One study per study folder: its trial folders are numbered per study, so a second
    study in the same ``study.db`` would write its trial 0's files over the first's."""
    names = [study.study_name for study in storage.get_all_studies()]
    if names and name not in names:
        held = ", ".join(repr(n) for n in names)
        raise SweepsafeError(
            f"{database} holds the study {held}, not {name!r}; a second study there would "
            "write its trials' files over the first one's (trial folders are numbered per "
            f"study). Pass study_name={names[0]!r} to continue it, or another study_key for "
            "a new study."
        )


def _refuse_foreign_database(database: Path) -> None:
    """A local ``study.db`` must be an Optuna study (or absent) before Optuna opens it."""
    if not os.path.lexists(database):
        return
    recover_hot_journal(database)
    try:
        content = read_content(database, check="quick")
    except SnapshotError as exc:
        raise SweepsafeError(
            f"{exc}; sweepsafe will not open it: move it away and run again to restore the "
            "study from Drive, or to start a new one."
        ) from exc
    if not content.is_optuna and os.path.getsize(database) > 0 and _has_tables(database):
        raise SweepsafeError(
            f"{database} is an SQLite database but not an Optuna study; sweepsafe will not add "
            "Optuna's tables to it. Move it away, or choose another output folder."
        )


def _has_tables(database: Path) -> bool:
    import sqlite3

    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return bool(connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0])
    finally:
        connection.close()


def _acquire(
    store: BackupBackend, study_dir: Path, takeover: bool, *, needed: bool, write: bool
) -> None:
    """Take the study's lease, or without ``write`` (a DriveStore only) check it is free;
    a Drive that cannot be reached is fatal only if needed."""

    async def acquire() -> None:
        if isinstance(store, DriveStore) and not write:
            await store.aclaim(study_dir)
        else:
            await store.aacquire(study_dir, takeover=takeover)

    try:
        run_blocking(acquire)
    except LeaseHeldError:
        raise
    except Exception as exc:
        reason = str(exc).rstrip(".")
        if needed and isinstance(store, ObjectStore):
            raise SweepsafeError(
                f"Could not reach the copy of {study_dir} in the object store {store.url}: "
                f"{reason}. "
                "Check the URL, the credentials and the network, and run again; pass "
                "restore=False (sweepsafe run --no-restore) only to start a new study."
            ) from exc
        if needed:
            raise SweepsafeError(
                f"Could not reach the Drive copy of {study_dir}: {reason}. Fix the Drive mount "
                "and run again; pass restore=False (sweepsafe run --no-restore) only to start a "
                "new study."
            ) from exc
        logger.warning("Could not take the lease on the Drive copy of %s: %s", study_dir, exc)


def _reconcile_with_drive(store: BackupBackend, study_dir: Path) -> bool:
    """Bring the study back from Drive when the local one is missing or older; True if so."""
    database = study_dir / STUDY_DB_NAME
    existed = database.exists()
    before = _finished_here(database) if existed else None
    # Marks a restore under way: a runtime killed after the database came back but
    # before every trial's files did brings the rest back when it starts again.
    marker = _restore_marker(store, study_dir)
    interrupted = marker.exists()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    result = run_blocking(lambda: store.arestore(database))
    if not result.ok and not interrupted:
        marker.unlink(missing_ok=True)
    if not result.ok:
        if result.reason == "no-copy":
            return False
        if result.reason == "diverged":
            raise StudyConflictError(result.error or "")
        if existed:
            logger.warning("Could not compare %s with its Drive copy: %s", database, result.error)
            return False
        raise SweepsafeError(
            f"Google Drive holds a copy of {database} but it could not be restored: "
            f"{(result.error or 'unknown error').rstrip('.')}. Fix the cause and run again; pass "
            "restore=False (sweepsafe run --no-restore) only to start a new study (its backups "
            "then stop, since the Drive copy is not replaced by a worse one)."
        )
    if result.files_unchanged and not interrupted:
        marker.unlink(missing_ok=True)
        return False  # the local study holds everything the Drive copy holds
    after = _finished_here(database)
    if before is not None and after is not None:
        _set_aside_other_runtimes_trials(study_dir, before, after)
    trials = run_blocking(lambda: store.arestore(study_dir / TRIALS_DIR_NAME, is_directory=True))
    if not trials.ok and trials.reason != "no-copy":
        logger.warning("The study was restored, but not all its trial files: %s", trials.error)
    else:
        marker.unlink(missing_ok=True)
    if result.files_unchanged:
        return False  # the database was back already: only trial files were missing
    if trials.kept_local:
        logger.warning(
            "Kept %d local trial file(s) changed since their last backup instead of the Drive "
            "copies, first %s.",
            len(trials.kept_local),
            trials.kept_local[0],
        )
    verification = run_blocking(lambda: store.averify(database))
    if verification.missing_files:
        numbers = ", ".join(str(n) for n in sorted(verification.missing_files)[:10])
        logger.warning(
            "Finished trials %s of the restored study have files that never reached Drive; "
            "they are not rerun (Optuna counts them finished).",
            numbers,
        )
    logger.info(
        "Restored %s from Google Drive (generation %s, %d trial files, %.1f MB).",
        study_dir,
        result.generation,
        trials.files_copied,
        (result.bytes_copied + trials.bytes_copied) / 1e6,
    )
    return True


def _going_back_cut_short(mark: Path, database: Path) -> str:
    """What to do about a restore of an older generation that a kill cut short."""
    try:
        generation = int(json.loads(mark.read_bytes())["generation"])
    except (OSError, ValueError, KeyError, TypeError):
        generation = None
    which = f"generation {generation}" if generation is not None else "an older generation"
    again = (
        f"`sweepsafe restore {database} --generation {generation}`, or "
        f"restore({database}, generation={generation})"
        if generation is not None
        else "`sweepsafe restore` with that generation"
    )
    return (
        f"A restore of {which} of {database} was cut short: Google Drive may have gone back "
        "to it while the local study still holds the trials it undoes, and a sweep now "
        "would publish them again. Run the restore again to finish going back "
        f"({again}; the local study is set aside, not deleted), or pass restore=False "
        "(sweepsafe run --no-restore) to keep the local study, whose next backup makes it "
        "the newest on Drive again."
    )


def _restore_marker(store: BackupBackend, study_dir: Path) -> Path:
    """Where the store's local records mark a restore of ``study_dir`` under way."""
    return local_mark(store.local_root, "restoring", study_dir)


def _finished_here(database: Path) -> frozenset[tuple[str, int, str]] | None:
    """The finished trials of the local ``database``; None if it cannot be read."""
    try:
        content = read_content(database, check=None)
    except SnapshotError:
        return None
    return frozenset(content.finished) if content.is_optuna else None


def _set_aside_other_runtimes_trials(
    study_dir: Path,
    before: frozenset[tuple[str, int, str]],
    after: frozenset[tuple[str, int, str]],
) -> None:
    """Move aside the local folders of trials that only the restored study finished.

    Another runtime ran those trials and backed their files up; a local folder of the
    same number holds this runtime's files of a trial that never finished here (killed,
    failed). Left in place, they would be kept instead of the finished trial's files and
    then copied over them on Drive. They are moved, not deleted.
    """
    numbers = sorted({number for _study, number, _start in after - before})
    pattern = f"{TRIALS_DIR_NAME}/{TRIAL_FOLDER}"
    moved = set_aside_trial_folders(study_dir, pattern, numbers, time.time())
    for number, target in moved.items():
        logger.warning(
            "Trial %d finished on another runtime; this runtime's unfinished files of a "
            "trial %d were moved to %s, and the finished trial's files are restored.",
            number,
            number,
            target,
        )


_LOADED = datetime.datetime.now()
"""When this process loaded sweepsafe: Optuna stamps a trial's start in local time."""


def _left_by_another_process(running: list[FrozenTrial], *, restored: bool) -> list[FrozenTrial]:
    """The trials of ``running`` that an earlier process left RUNNING.

    The lease keeps other runtimes out, so a trial this process started is still being
    run by it: an ``optimize`` in another thread, or a notebook cell that still runs
    (Optuna marks a trial its objective raised out of, Ctrl-C too, FAIL itself). A study
    just restored from Drive holds no trial of this process.
    """
    if restored:
        return running
    return [t for t in running if t.datetime_start is None or t.datetime_start < _LOADED]


def _fail_stale_trials(
    storage: optuna.storages.RDBStorage, study: Study, stale: Sequence[FrozenTrial]
) -> int:
    """Mark ``stale``, the trials a runtime that died left RUNNING, as FAIL; return how
    many.

    Only called by the study's one writer (it holds the lease, or has no Drive copy), so
    no live runtime's trial is failed.
    """
    if not stale:
        return 0
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in stale:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return len(stale)
