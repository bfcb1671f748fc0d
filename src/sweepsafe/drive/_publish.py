"""Publishing a database to Drive: checked, never backwards, never ahead of its trials' files.

One backup of an Optuna database, in order:

1. a consistent snapshot on local disk (SQLite's online backup, ``quick_check``);
2. the generation it follows: the one this runtime last published, when Drive's newest
   generation is still that one (the common case: one small listing); otherwise Drive's
   newest generation is rebuilt locally and compared;
3. the monotonic rule: every finished trial of that generation must be in the snapshot,
   else nothing is replaced and the refusal says which trials;
4. the folders of the trials the snapshot newly holds are copied first, so Drive never
   lists a finished trial whose files are not there (a file Drive refuses for good is
   named and does not hold the database back; one still being retried does, for a
   minute at most, and not at the end of a sweep);
5. the pages that changed since that generation, as one patch; every so often (and at
   the end of a sweep) a whole base, which also refreshes the plain ``study.db`` that
   Optuna and optuna-dashboard open as is.

Steps 2 and 3 live in ``_publish_checks``, step 5 in ``_publish_write``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._files import COPY_CHUNK, remove_quietly, scratch_path
from sweepsafe.drive._generations import history_dir, list_history
from sweepsafe.drive._pacing import LocalWork
from sweepsafe.drive._publish_checks import (
    _check_monotonic,
    _find_parent,
    _Parent,
    _refuse_known_conflict,
)
from sweepsafe.drive._publish_write import Published, _write_generation
from sweepsafe.drive._sqlite import (
    DatabaseContent,
    is_optuna_database,
    read_content,
    read_content_since,
    snapshot_sqlite,
)

if TYPE_CHECKING:
    from sweepsafe.drive._unit import StudyUnit

__all__ = ["publish_database"]


async def publish_database(unit: StudyUnit, database: Path, *, final: bool) -> Published:
    """Back up one database of ``unit`` (see the module docstring).

    Raises:
        StudyConflictError: Drive holds finished trials the snapshot lacks.
        LeaseHeldError: another runtime owns the study on Drive.
        TrialFilesHeldBack: files of newly finished trials are still failing.
        SnapshotError: the local database cannot be snapshotted soundly.
        OSError, DriveTimeout: Drive or the local disk failed.
    """
    rel = unit.rel_of(database)
    settings = unit.settings
    async with unit.locks.get(("database", rel)):
        work = unit.local_work[rel] = LocalWork()
        snapshot = scratch_path(settings.scratch, "snapshot", ".db")
        try:
            await work.timed(lambda: anyio.to_thread.run_sync(_take_snapshot, database, snapshot))
            if not await anyio.to_thread.run_sync(is_optuna_database, snapshot):
                return await _ship_plain(unit, snapshot, rel)
            return await _publish_generation(unit, rel, snapshot, database, final)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_quietly, snapshot)


def _read_snapshot(snapshot: Path, parent: _Parent | None) -> DatabaseContent:
    """What the snapshot holds; read as its difference from the parent's file if there is one."""
    if parent is None or parent.path is None:
        return read_content(snapshot, check=None)
    return read_content_since(snapshot, parent.path, parent.content)


def _take_snapshot(database: Path, snapshot: Path) -> None:
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot_sqlite(database, snapshot)


async def _ship_plain(unit: StudyUnit, snapshot: Path, rel: str) -> Published:
    settings = unit.settings
    size = (await anyio.to_thread.run_sync(os.stat, snapshot)).st_size
    async with settings.pool.session() as helper:
        await unit.prepare(helper, for_database=False)
        copied = await helper.put_file(
            snapshot, unit.drive / rel, settings.timeout, size=size, chunk=COPY_CHUNK
        )
    return Published("plain", None, copied, None)


async def _publish_generation(
    unit: StudyUnit,
    rel: str,
    snapshot: Path,
    database: Path,
    final: bool,
) -> Published:
    settings = unit.settings
    folder = history_dir(unit.drive, rel)
    async with settings.pool.session() as helper:
        await unit.prepare(helper)
        history = await list_history(helper, folder, settings.timeout)
        _refuse_known_conflict(unit, rel, history)
        parent, notes = await _find_parent(unit, helper, rel, history)
    try:
        content = await unit.local_work[rel].timed(
            lambda: anyio.to_thread.run_sync(_read_snapshot, snapshot, parent)
        )
        if parent is not None:
            _check_monotonic(unit, rel, history, parent, content)
        unit.checked.add(rel)
        record = unit.state.databases.get(rel)
        earlier = parent.content.finished if parent is not None else frozenset()
        new_trials = sorted({number for _study, number, _start in content.finished - earlier})
        recheck = [int(n) for n in (record.missing_files if record else {})]
        missing = await unit.sync_trial_folders(
            database.parent, sorted({*new_trials, *recheck}), final=final
        )
        return await _write_generation(
            unit, rel, snapshot, content, parent, history, missing, notes, final
        )
    finally:
        if (
            parent is not None
            and parent.path is not None
            and parent.path.name.startswith("rebuild")
        ):
            await anyio.to_thread.run_sync(remove_quietly, parent.path)
