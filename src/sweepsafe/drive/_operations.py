"""What one backup or restore of a path does, turned into a BackupResult.

The :class:`~sweepsafe.drive.DriveStore` methods find the study folder (a
:class:`StudyUnit`) and the Drive copy of a path; these do the operation for that study
folder and say what happened in a result.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.drive._folder_job import EntryProblem, FolderOutcome, folder_prefix
from sweepsafe.drive._folder_restore import restore_folder
from sweepsafe.drive._folders import sync_file
from sweepsafe.drive._generations import database_of, history_root
from sweepsafe.drive._messages import explain_failure, summarize_problems
from sweepsafe.drive._publish import publish_database
from sweepsafe.drive._replica import read_identity
from sweepsafe.drive._restore import RestoreRefused, restore_database
from sweepsafe.drive._results import BackupResult, Kind
from sweepsafe.drive._sqlite import SnapshotError
from sweepsafe.drive._sqlite_inspect import is_sqlite_file
from sweepsafe.drive._unit import TrialFilesHeldBack
from sweepsafe.errors import LeaseHeldError, StudyConflictError
from sweepsafe.paths import is_within

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sweepsafe.drive._drive_helper import DriveHelper
    from sweepsafe.drive._helper_client import HelperPool
    from sweepsafe.drive._unit import StudyUnit

__all__ = [
    "DATABASE_SUFFIXES",
    "adopt_drive_identity",
    "backup_database",
    "backup_files",
    "combined_result",
    "restore_database_result",
    "restore_file_result",
    "restore_folder_result",
    "restore_path",
    "with_duration",
]

STUDY_DB_NAME = "study.db"
_EXPECTED = (
    OSError,
    DriveTimeout,
    SnapshotError,
    LeaseHeldError,
    StudyConflictError,
    TrialFilesHeldBack,
)

DATABASE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
"""A file restored with one of these names is taken for a database (checked, generations)."""


async def backup_database(
    unit: StudyUnit, source: Path, destination: Path, final: bool
) -> BackupResult:
    """Publish one study database (see ``_publish``)."""
    published = await publish_database(unit, source, final=final)
    work = unit.local_work.get(unit.rel_of(source))
    return BackupResult(
        True,
        source,
        destination,
        "sqlite",
        bytes_copied=published.bytes_copied,
        files_copied=0 if published.kind == "unchanged" else 1,
        files_unchanged=1 if published.kind == "unchanged" else 0,
        generation=published.generation,
        finished_trials=published.finished_trials,
        missing_files=published.missing_files,
        notes=published.notes,
        local_s=work.seconds if work is not None else 0.0,
    )


async def backup_files(
    unit: StudyUnit,
    source: Path,
    destination: Path,
    is_directory: bool,
    exclude: Sequence[str],
    mirror: bool,
    final: bool = False,
) -> BackupResult:
    """Copy a folder (or one file) of a study to Drive, one bad entry costing one entry.

    A ``final`` copy (the end of a sweep) waits for a file being rewritten and ships its
    newest version, never one kept while an older one shipped."""
    async with unit.settings.pool.session() as helper:
        await unit.prepare(helper, for_database=False)
    if not unit.shared:
        await _database_first(unit, source)

    async def publish_inner(database: Path) -> EntryProblem | None:
        destination = unit.drive / unit.rel_of(database)
        result = await backup_database(unit, database, destination, False)
        return None if result.ok else EntryProblem(unit.rel_of(database), result.error or "", True)

    job = unit.folder_job(publish_inner, final=final)
    if is_directory:
        outcome = await unit.sync(source, exclude=exclude, mirror=mirror, job=job)
    else:
        outcome = await sync_file(job, source)
    return folder_result(outcome, source, destination, "directory" if is_directory else "file")


def combined_result(
    results: Sequence[BackupResult], source: Path, destination: Path
) -> BackupResult:
    """What the backups of the entries of one folder came to, as one result."""
    failed = [r for r in results if not r.ok and r.kind != "skipped"]
    return BackupResult(
        not failed,
        source,
        destination,
        "directory",
        bytes_copied=sum(r.bytes_copied for r in results),
        files_copied=sum(r.files_copied for r in results),
        files_unchanged=sum(r.files_unchanged for r in results),
        error="; ".join(r.error or "" for r in failed) or None,
        retryable=any(r.retryable for r in failed),
        problems=tuple(p for r in results for p in r.problems),
        skipped=tuple(s for r in results for s in r.skipped),
    )


async def restore_path(
    unit: StudyUnit,
    pool: HelperPool,
    timeout: float,
    remote: Path,
    target: Path,
    is_directory: bool,
    generation: int | None,
    before: float | None,
) -> BackupResult:
    """Restore ``target`` as what Drive holds at ``remote``: a folder, a database or a file.

    A refused restore and the expected failures come back as a result.
    """
    kind: Kind = "directory" if is_directory else "file"
    try:
        await unit.load()
        async with pool.session() as helper:
            await adopt_drive_identity(unit, helper)
            info = await helper.stat(remote, timeout)
        if is_directory and (generation is not None or before is not None):
            return BackupResult(
                False,
                remote,
                target,
                kind,
                error=f"{target} is a folder; a generation (--generation, --before) is "
                f"chosen for one database: restore its database with it (e.g. "
                f"{target / 'study.db'}), then the folder without it. Nothing was restored.",
                reason="refused",
            )
        if is_directory:
            return await restore_folder_result(unit, remote, target)
        if (
            generation is not None
            or before is not None
            or not info["exists"]
            or (info.get("kind") == "file" and remote.suffix in DATABASE_SUFFIXES)
        ):
            return await restore_database_result(unit, remote, target, generation, before)
        return await restore_file_result(unit, remote, target)
    except RestoreRefused as exc:
        return BackupResult(
            False,
            remote,
            target,
            kind,
            error=f"{exc}; nothing local was replaced.",
            reason="diverged" if exc.diverged else "refused",
        )
    except _EXPECTED as exc:
        error, retryable = explain_failure(exc, target, "reading", remote)
        return BackupResult(False, remote, target, kind, error=error, retryable=retryable)


async def restore_database_result(
    unit: StudyUnit,
    remote: Path,
    target: Path,
    generation: int | None,
    before: float | None,
) -> BackupResult:
    """Restore one study database, checked (see ``_restore``)."""
    restored = await restore_database(unit, target, generation=generation, before=before)
    if restored is None:
        return BackupResult(
            False,
            remote,
            target,
            "sqlite",
            error=no_copy(target, remote),
            reason="no-copy",
        )
    notes = list(restored.notes)
    if restored.kept_local:
        notes.append(
            f"kept the local {target.name}: it holds every finished trial of the Drive copy"
        )
    if restored.set_aside is not None:
        notes.append(f"the local database was set aside as {restored.set_aside}")
    return BackupResult(
        True,
        remote,
        target,
        "sqlite",
        bytes_copied=restored.bytes_copied,
        files_copied=0 if restored.unchanged else 1,
        files_unchanged=1 if restored.unchanged else 0,
        generation=restored.generation,
        finished_trials=restored.finished_trials,
        notes=tuple(notes),
    )


async def restore_folder_result(unit: StudyUnit, remote: Path, target: Path) -> BackupResult:
    """Restore a folder, keeping local files changed since their backup.

    A database in it that Drive keeps generations of is restored as a database (its
    newest generation, checked), not as the plain copy, which is only its last base.
    """
    databases = await _databases_with_history(unit, remote)
    outcome = await restore_folder(unit.folder_job(), remote, target, leave=databases)
    if outcome is None:
        return BackupResult(
            False,
            remote,
            target,
            "directory",
            error=no_copy(target, remote),
            reason="no-copy",
        )
    if outcome.strays:
        unit.state.strays = sorted({*unit.state.strays, *outcome.strays})
        await unit.state.asave()
    result = folder_result(outcome, remote, target, "directory", action="reading")
    for rel in sorted(databases):
        try:
            restored = await restore_database_result(unit, remote / rel, target / rel, None, None)
        except RestoreRefused as exc:
            restored = BackupResult(
                False,
                remote / rel,
                target / rel,
                "sqlite",
                error=f"{exc}; the local database was not replaced",
            )
        if restored.reason == "no-copy":
            continue
        errors = [e for e in (result.error, restored.error) if e]
        result = replace(
            result,
            ok=result.ok and restored.ok,
            bytes_copied=result.bytes_copied + restored.bytes_copied,
            files_copied=result.files_copied + restored.files_copied,
            files_unchanged=result.files_unchanged + restored.files_unchanged,
            error="; ".join(errors) or None,
            notes=(*result.notes, *restored.notes),
        )
    return result


async def _databases_with_history(unit: StudyUnit, remote: Path) -> frozenset[str]:
    """The databases in the Drive folder ``remote`` that Drive keeps generations of,
    relative to it."""
    if not is_within(remote, unit.drive):
        return frozenset()
    prefix = folder_prefix(unit.drive, remote)
    async with unit.settings.pool.session() as helper:
        listing = await helper.listdir(history_root(unit.drive), unit.settings.timeout)
    found: set[str] = set()
    for entry in listing.entries:
        rel = database_of(entry.name)
        if entry.kind == "dir" and rel.startswith(prefix):
            found.add(rel[len(prefix) :])
    return frozenset(found)


async def restore_file_result(unit: StudyUnit, remote: Path, target: Path) -> BackupResult:
    """Restore one plain file, keeping a local one changed since its backup."""
    parent = remote.parent
    outcome = await restore_folder(unit.folder_job(), parent, target.parent, only=remote.name)
    if outcome is None or (
        outcome.files_copied + outcome.files_unchanged + len(outcome.kept_local) == 0
        and not outcome.problems
    ):
        return BackupResult(
            False,
            remote,
            target,
            "file",
            error=no_copy(target, remote),
            reason="no-copy",
        )
    return folder_result(outcome, remote, target, "file", action="reading")


async def adopt_drive_identity(unit: StudyUnit, helper: DriveHelper) -> None:
    """Before a restore: records of another Drive copy than this one are dropped."""
    from sweepsafe.drive._drive_helper import DriveHelper

    assert isinstance(helper, DriveHelper)
    drive_id = await read_identity(helper, unit.drive, unit.settings.timeout)
    if drive_id is not None and drive_id != unit.state.unit_id:
        unit.forget_drive_copy()
        unit.state.unit_id = drive_id
        unit.manifest.reset(drive_id)
        await unit.state.asave()


async def _database_first(unit: StudyUnit, source: Path) -> None:
    """A study's trial files go to Drive only where its database may go.

    A study the Drive copy is ahead of (a new one started over it, a stale runtime) must
    not replace that copy's trial files either, so before this runtime's first copy of
    a study's trial files its database is published, which checks it against Drive's.

    Raises:
        StudyConflictError: Drive holds finished trials the local study lacks.
    """
    if not is_within(source, unit.local / Path(unit.settings.trial_folder).parts[0]):
        return
    for _head, _tags, message in list(unit.conflicts.values()):
        raise StudyConflictError(message)
    database = unit.local / STUDY_DB_NAME
    # A shared study's workers copy their trials' files without the lease, the export
    # being the lease holder's: there, a database published once is enough.
    if unit.rel_of(database) in (unit.state.databases if unit.shared else unit.checked):
        return
    if await anyio.to_thread.run_sync(_is_database, database):
        await publish_database(unit, database, final=False)


def _is_database(path: Path) -> bool:
    return path.is_file() and is_sqlite_file(str(path))


def folder_result(
    outcome: FolderOutcome, source: Path, destination: Path, kind: Kind, *, action: str = "writing"
) -> BackupResult:
    error: str | None = None
    retryable = False
    if outcome.stopped is not None:
        local = source if action == "writing" else destination
        remote = destination if action == "writing" else source
        error, retryable = explain_failure(outcome.stopped, local, action, remote)
        if outcome.files_copied:
            error += f" {outcome.files_copied} other file(s) were copied and recorded."
    elif len(outcome.problems) == 1 and kind == "file" and outcome.problems[0].error is not None:
        local = source if action == "writing" else destination
        remote = destination if action == "writing" else source
        error, retryable = explain_failure(outcome.problems[0].error, local, action, remote)
    elif outcome.problems:
        total = outcome.files_copied + outcome.files_unchanged + len(outcome.problems)
        error, retryable = summarize_problems(outcome.problems, source, destination, total)
    return BackupResult(
        error is None,
        source,
        destination,
        kind,
        bytes_copied=outcome.bytes_copied,
        files_copied=outcome.files_copied,
        files_unchanged=outcome.files_unchanged,
        error=error,
        retryable=retryable,
        problems=tuple(str(p) for p in outcome.problems),
        skipped=outcome.skipped,
        kept_local=outcome.kept_local,
    )


def with_duration(result: BackupResult, duration: float) -> BackupResult:

    return replace(result, duration_s=duration)


def no_copy(target: Path, remote: Path) -> str:
    return f"Google Drive holds no copy of {target} (looked for {remote}); nothing was restored."
