"""Restoring a database from Drive: only a checked study that is not worse than the local one.

The Drive copy (its newest generation, or the one asked for) is rebuilt into a local
scratch file, then must be SQLite, pass ``PRAGMA integrity_check``, be an Optuna study,
and hold every finished trial the local study holds. Only then does it replace the
local file, atomically. Asked for an older generation on purpose (to undo a bad write),
the local database is set aside under a name that says so instead of being compared.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._files import pull_new, remove_quietly, scratch_path
from sweepsafe.drive._fs_primitives import fsync_directory
from sweepsafe.drive._generations import (
    GenerationDetails,
    History,
    history_dir,
    list_history,
    read_details,
)
from sweepsafe.drive._local_state import DatabaseRecord, local_mark
from sweepsafe.drive._page_diff import sha256_file
from sweepsafe.drive._publish_write import publish_rollback
from sweepsafe.drive._rebuild import NoUsableBase, rebuild
from sweepsafe.drive._reserved_names import temp_name
from sweepsafe.drive._sqlite import (
    SIDECAR_SUFFIXES,
    DatabaseContent,
    SnapshotError,
    check_database,
    read_content,
    recover_hot_journal,
)
from sweepsafe.drive._sqlite_inspect import is_sqlite_file
from sweepsafe.errors import LeaseHeldError

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper
    from sweepsafe.drive._unit import StudyUnit

__all__ = [
    "GOING_BACK",
    "RestoreRefused",
    "Restored",
    "restore_database",
    "set_aside_trial_folders",
]

GOING_BACK = "going-back"
"""The kind of local mark a restore of an older generation leaves while under way: Drive
goes back first, then the local study; a runtime killed between the two must not let a
sweep publish the undone trials again without a word."""


class RestoreRefused(Exception):
    """The Drive copy failed a check, or is worse than the local database; nothing changed."""

    def __init__(self, message: str, *, diverged: bool = False) -> None:
        super().__init__(message)
        self.diverged = diverged


@dataclass(frozen=True)
class Restored:
    """What a database restore did."""

    generation: int | None
    bytes_copied: int
    finished_trials: int
    set_aside: Path | None = None
    """Where the local database was moved, when an older generation replaced it."""
    notes: tuple[str, ...] = ()
    unchanged: bool = False
    """Nothing was replaced: the local database held that generation, or more."""
    kept_local: bool = False
    """The local database holds every finished trial of the Drive copy, so it stayed."""


async def restore_database(
    unit: StudyUnit,
    database: Path,
    *,
    generation: int | None = None,
    before: float | None = None,
) -> Restored | None:
    """Bring ``database`` back from Drive (see the module docstring); None if Drive has none.

    Raises:
        RestoreRefused: the copy failed its checks or is worse than the local one.
        OSError, DriveTimeout: Drive failed.
    """
    rel = unit.rel_of(database)
    settings = unit.settings
    folder = history_dir(unit.drive, rel)
    chosen = generation is not None or before is not None
    async with unit.locks.get(("database", rel)):
        async with settings.pool.session() as helper:
            history = await list_history(helper, folder, settings.timeout)
            in_sync = None if chosen else await _in_sync(unit, rel, database, history)
            if in_sync is not None:
                record = unit.state.databases[rel]
                return Restored(
                    record.generation, 0, in_sync.finished_count, unchanged=True, kept_local=True
                )
            if before is not None and not history.empty:
                generation = await _generation_before(
                    helper, folder, history, before, settings.timeout
                )
            if history.empty:
                if chosen:
                    raise RestoreRefused(f"Google Drive keeps no generations of {database}")
                candidate = await _pull_plain(
                    helper, unit.drive / rel, settings.scratch, settings.timeout
                )
                if candidate is None:
                    return None
                path, number, tag, sha = candidate, None, "", None
                notes: tuple[str, ...] = ()
            else:
                if generation is not None and generation > history.head:
                    raise RestoreRefused(
                        f"generation {generation} of {database} does not exist on Drive (the "
                        f"newest is {history.head})"
                    )
                oldest = min(history.bases, default=None)
                if generation is not None and oldest is not None and generation < oldest:
                    raise RestoreRefused(
                        f"generation {generation} of {database} is not kept on Drive ("
                        + (
                            "generations are numbered from 1"
                            if generation < 1
                            else "older generations are thinned away"
                        )
                        + f"); the kept ones are {oldest} to {history.head} (see "
                        "`sweepsafe history`)"
                    )
                try:
                    rebuilt = await rebuild(
                        helper,
                        folder,
                        unit.drive / rel,
                        settings.scratch,
                        settings.timeout,
                        history=history,
                        target=generation,
                    )
                except NoUsableBase as exc:
                    raise RestoreRefused(
                        f"no generation of {unit.drive / rel} on Google Drive can be rebuilt: "
                        f"its kept copies are missing or damaged ({exc})"
                    ) from exc
                if generation is not None and rebuilt.generation != generation:
                    await anyio.to_thread.run_sync(remove_quietly, rebuilt.path)
                    raise RestoreRefused(
                        f"generation {generation} of {database} cannot be rebuilt ("
                        f"{'; '.join(rebuilt.notes)})"
                    )
                path, number, tag, notes = (
                    rebuilt.path,
                    rebuilt.generation,
                    rebuilt.tag,
                    rebuilt.notes,
                )
                sha = rebuilt.sha256
        try:
            return await _install(
                unit, rel, database, path, (number, tag, sha), notes, chosen, history.head
            )
        finally:
            await anyio.to_thread.run_sync(remove_quietly, path)


async def _generation_before(
    helper: DriveHelper, folder: Path, history: History, before: float, timeout: float
) -> int:
    details: list[GenerationDetails] = await read_details(helper, folder, history, timeout)
    eligible = [d.number for d in details if d.created is not None and d.created <= before]
    if not eligible:
        published = [d.created for d in details if d.created is not None]
        kept = f" (the oldest kept is from {_utc(min(published))})" if published else ""
        raise RestoreRefused(f"no generation on Google Drive was published by {_utc(before)}{kept}")
    return max(eligible)


def _utc(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


async def _pull_plain(
    helper: DriveHelper, plain: Path, scratch: Path, timeout: float
) -> Path | None:
    info = await helper.stat(plain, timeout)
    if not info["exists"]:
        return None
    if info["kind"] != "file":
        raise RestoreRefused(f"{plain} on Google Drive is not a file")
    work = scratch_path(scratch, "rebuild", ".db")
    await pull_new(helper, plain, work, timeout)
    return work


async def _install(
    unit: StudyUnit,
    rel: str,
    database: Path,
    candidate: Path,
    which: tuple[int | None, str, str | None],
    notes: tuple[str, ...],
    chosen: bool,
    head: int,
) -> Restored:
    """Check ``candidate`` (generation, tag and SHA-256 ``which``) and put it in place."""
    generation, tag, sha = which
    content = await _check_candidate(candidate, unit.drive / rel)
    local = await anyio.to_thread.run_sync(_local_content, database)
    set_aside: Path | None = None
    if isinstance(local, DatabaseContent) and not chosen:
        local_only = local.missing_from(content)
        drive_only = content.missing_from(local)
        if local_only and drive_only:
            raise RestoreRefused(
                f"the local {database} and its Drive copy have diverged: each holds finished "
                f"trials the other lacks ({_examples(local_only)} only here; "
                f"{_examples(drive_only)} only on Drive), so neither replaces the other. Move "
                f"{database.parent} away to continue from the Drive copy, or run with "
                "restore=False (sweepsafe run --no-restore) to keep the local study (its "
                "backups then stop until the Drive copy is moved away)",
                diverged=True,
            )
        if not drive_only:
            # The local study holds everything the Drive copy holds: it is not older.
            if local.finished == content.finished:
                await _record(unit, rel, candidate, content, generation, tag, sha)
            return Restored(
                generation, 0, local.finished_count, notes=notes, unchanged=True, kept_local=True
            )
    if not chosen and generation is not None and generation < head:
        # Drive's newest generations cannot be rebuilt. Bringing back an older one
        # quietly would let a sweep go on from it and then meet the newer Drive copy,
        # which stops its backups: going back is the user's choice, made by name.
        raise RestoreRefused(
            f"the newest generations of {database} on Google Drive cannot be rebuilt "
            f"({'; '.join(notes)}); generation {generation} is the newest that can. The "
            f"database was not restored. To continue from it, restore it by name (`sweepsafe "
            f"restore {database} --generation {generation}` with the same --local-root and "
            f"--drive-root, or generation={generation} in Python), which makes it the newest "
            "on Drive again and keeps the others in its history"
        )
    rollback: int | None = None
    mark = local_mark(unit.settings.local_root, GOING_BACK, database)
    if chosen and generation is not None and generation < head:
        # Drive first: killed before the local copy is replaced, the restore can simply
        # run again (the mark stops a sweep meanwhile); the other way round, the next
        # backup would meet a Drive copy ahead.
        if sha is None:
            sha = await anyio.to_thread.run_sync(sha256_file, candidate)
        await anyio.to_thread.run_sync(_write_mark, mark, generation)
        try:
            rollback = await publish_rollback(unit, rel, candidate, content, sha)
        except LeaseHeldError:
            await anyio.to_thread.run_sync(partial(mark.unlink, missing_ok=True))
            raise
        notes = (
            *notes,
            f"generation {generation} is the newest on Google Drive again, as generation "
            f"{rollback}; generations {generation + 1} to {head} stay in its history",
        )
    unreadable = isinstance(local, str) or (
        isinstance(local, DatabaseContent) and not local.is_optuna
    )
    if (chosen or unreadable) and os.path.lexists(database):
        # An unreadable local database may still hold trials worth rescuing by hand.
        set_aside = await anyio.to_thread.run_sync(_set_aside, database, unit.settings.clock())
        if unreadable and not chosen:
            reason = local if isinstance(local, str) else "it is not an Optuna study"
            notes = (*notes, f"the local {database.name} could not be used ({reason})")
    size = await anyio.to_thread.run_sync(_replace_local, candidate, database)
    if chosen and isinstance(local, DatabaseContent):
        undone = sorted({number for _study, number, _start in local.missing_from(content)})
        moved = await anyio.to_thread.run_sync(
            set_aside_trial_folders,
            database.parent,
            unit.settings.trial_folder,
            undone,
            unit.settings.clock(),
        )
        if moved:
            notes = (
                *notes,
                f"the files of {len(moved)} trial(s) the older generation lacks were moved "
                f"to {database.parent / 'set-aside'}, so that the trials run next under "
                "their numbers start from empty folders",
            )
    if rollback is None:
        await _record(unit, rel, database, content, generation, tag, sha)
    if chosen:
        await anyio.to_thread.run_sync(partial(mark.unlink, missing_ok=True))
    return Restored(generation, size, content.finished_count, set_aside, notes)


def _examples(trials: frozenset[tuple[str, int, str]]) -> str:
    shown = ", ".join(f"trial {n} of {s!r}" for s, n, _ in sorted(trials)[:3])
    return shown + (", ..." if len(trials) > 3 else "")


async def _in_sync(
    unit: StudyUnit, rel: str, database: Path, history: History
) -> DatabaseContent | None:
    """What the local database holds, when Drive's newest generation is the one this
    runtime last published or restored and the local database is still there: it holds
    all of it, so nothing needs restoring. None otherwise."""
    record = unit.state.databases.get(rel)
    if record is None or history.head != record.generation:
        return None
    if record.tag not in history.tags_of(record.generation):
        return None
    # The local file may have been damaged or replaced since: it is read, not assumed.
    local = await anyio.to_thread.run_sync(_local_content, database)
    if not isinstance(local, DatabaseContent) or not local.is_optuna:
        return None
    parent = unit.parent_content.get(rel)
    return local if parent is None or not parent.missing_from(local) else None


async def _check_candidate(candidate: Path, where: Path) -> DatabaseContent:
    if not await anyio.to_thread.run_sync(is_sqlite_file, os.fspath(candidate)):
        size = (await anyio.to_thread.run_sync(os.stat, candidate)).st_size
        what = "an empty file" if size == 0 else "not an SQLite database"
        raise RestoreRefused(f"the Drive copy {where} is {what}")
    # The full check and the read of the trials each take a connection of their own and
    # run side by side (SQLite works outside Python's lock): the restore waits for the
    # longer of the two, not for both. The check's verdict comes first either way.
    problems: dict[str, SnapshotError] = {}
    read: list[DatabaseContent] = []

    async def check() -> None:
        try:
            await anyio.to_thread.run_sync(check_database, candidate)
        except SnapshotError as exc:
            problems["check"] = exc

    async def read_trials() -> None:
        try:
            content = await anyio.to_thread.run_sync(partial(read_content, candidate, check=None))
            read.append(content)
        except SnapshotError as exc:
            problems["read"] = exc

    async with anyio.create_task_group() as group:
        group.start_soon(check)
        group.start_soon(read_trials)
    problem = problems.get("check") or problems.get("read")
    if problem is not None:
        raise RestoreRefused(f"the Drive copy {where} failed its check: {problem}") from problem
    content = read[0]
    if not content.is_optuna or not content.studies:
        raise RestoreRefused(
            f"the Drive copy {where} is an SQLite database but not an Optuna study"
        )
    return content


def _local_content(database: Path) -> DatabaseContent | str | None:
    """What the local database holds; a sentence if it is unreadable; None if absent."""
    if not os.path.lexists(database):
        return None
    # A writer killed mid-transaction leaves a hot journal that only a writable
    # connection rolls back; read as it is, a study ahead of Drive looks unreadable.
    recover_hot_journal(database)
    try:
        return read_content(database, check="quick")
    except SnapshotError as exc:
        return str(exc)


def _same_bytes(database: Path, candidate: Path) -> bool:
    try:
        return sha256_file(database) == sha256_file(candidate)
    except OSError:
        return False


def _set_aside(database: Path, now: float) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    aside = database.with_name(f"{database.name}.before-restore-{stamp}")
    os.replace(database, aside)
    for suffix in SIDECAR_SUFFIXES:
        side = database.with_name(database.name + suffix)
        if os.path.lexists(side):
            os.replace(side, aside.with_name(aside.name + suffix))
    return aside


def set_aside_trial_folders(
    study: Path, trial_folder: str, numbers: Sequence[int], now: float
) -> dict[int, Path]:
    """Move the local folders of trials ``numbers`` to ``study/set-aside``, never deleting
    them; where they went. A trial's new files must not meet another trial's of the same
    number: one a restore of an older generation undid (its number is given to the next
    trial), or one another runtime finished (its files are restored).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    moved: dict[int, Path] = {}
    for number in numbers:
        folder = study / trial_folder.format(number=number)
        if not folder.is_dir():
            continue
        target = study / "set-aside" / f"{folder.name}-{stamp}"
        suffix = 0
        while os.path.lexists(target):
            suffix += 1
            target = target.with_name(f"{folder.name}-{stamp}-{suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, target)
        moved[number] = target
    return moved


def _write_mark(mark: Path, generation: int) -> None:
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps({"generation": generation}))


def restore_temporary(database: Path) -> Path:
    """Where a restored database waits to replace ``database``: a sweepsafe temporary,
    so that one a kill left there is never backed up as the user's file."""
    return database.with_name(temp_name(f"restore-{database.name}"))


def _replace_local(candidate: Path, database: Path) -> int:
    database.parent.mkdir(parents=True, exist_ok=True)
    temp = restore_temporary(database)
    try:
        # The scratch folder is on the same disk as a rule: a rename, not a copy.
        os.replace(candidate, temp)
    except OSError:
        with open(candidate, "rb") as source, open(temp, "wb") as target:
            while chunk := source.read(8 << 20):
                target.write(chunk)
    with open(temp, "rb+") as written:
        os.fsync(written.fileno())
    # A WAL or journal beside the old database would be replayed into the restored one.
    for suffix in SIDECAR_SUFFIXES:
        remove_quietly(database.with_name(database.name + suffix))
    os.replace(temp, database)
    fsync_directory(str(database.parent))
    return os.stat(database).st_size


async def _record(
    unit: StudyUnit,
    rel: str,
    source: Path,
    content: DatabaseContent,
    generation: int | None,
    tag: str,
    sha: str | None = None,
) -> None:
    """Remember the restored generation as this runtime's parent, to publish patches on it."""
    # The local database is now one Drive's history holds: a refusal met before is past.
    unit.conflicts.pop(rel, None)
    if generation is None:
        unit.state.databases.pop(rel, None)
        await unit.state.asave()
        return
    shipped = unit.state.shipped_path(rel)
    shipped_sha, signature = await anyio.to_thread.run_sync(_copy_as_shipped, source, shipped, sha)
    unit.state.databases[rel] = DatabaseRecord(
        generation=generation, tag=tag, sha256=shipped_sha, shipped_signature=signature
    )
    unit.parent_content[rel] = content
    await unit.state.asave()


def _copy_as_shipped(source: Path, shipped: Path, sha: str | None) -> tuple[str, tuple[int, int]]:
    shipped.parent.mkdir(parents=True, exist_ok=True)
    temp = shipped.with_name(shipped.name + ".part")
    shutil.copyfile(source, temp)
    os.replace(temp, shipped)
    info = os.stat(shipped)
    return sha or sha256_file(shipped), (info.st_size, info.st_mtime_ns)
