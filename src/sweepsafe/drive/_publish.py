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
   named and does not hold the database back; one still being retried does);
5. the pages that changed since that generation, as one patch; every so often (and at
   the end of a sweep) a whole base, which also refreshes the plain ``study.db`` that
   Optuna and optuna-dashboard open as is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from sweepsafe.drive._files import COPY_CHUNK, remove_quietly, scratch_path
from sweepsafe.drive._generations import (
    BaseRecord,
    History,
    history_dir,
    list_history,
    write_base_record,
)
from sweepsafe.drive._local_state import DatabaseRecord
from sweepsafe.drive._page_diff import PageSizeMismatch, diff_files, sha256_file
from sweepsafe.drive._patch_format import encode_patch
from sweepsafe.drive._rebuild import NoUsableBase, rebuild
from sweepsafe.drive._replica import this_runtime
from sweepsafe.drive._retention import thin_history
from sweepsafe.drive._sqlite import DatabaseContent, SnapshotError, read_content, snapshot_sqlite
from sweepsafe.errors import StudyConflictError

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper
    from sweepsafe.drive._unit import StudyUnit

__all__ = ["Published", "publish_database", "publish_rollback"]

logger = logging.getLogger("sweepsafe.drive")

_ARCHIVE_INTERVAL_S = 3600.0
"""A base is also archived (kept as a whole file in the history) at most this often."""


@dataclass(frozen=True)
class Published:
    """What one database backup put on Drive."""

    kind: Literal["patch", "base", "plain", "unchanged"]
    """``plain``: not an Optuna study, copied whole with no history."""
    generation: int | None
    bytes_copied: int
    finished_trials: int | None
    """Finished trials in the Drive copy now (Optuna databases)."""
    missing_files: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    """Finished trials whose files (named) Drive refused or that keep changing."""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Parent:
    generation: int
    sha256: str
    path: Path | None
    """A local file holding that generation, to diff against; None to ship a base."""
    content: DatabaseContent


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
        snapshot = scratch_path(settings.scratch, "snapshot", ".db")
        try:
            await anyio.to_thread.run_sync(_take_snapshot, database, snapshot)
            content = await anyio.to_thread.run_sync(lambda: read_content(snapshot, check=None))
            if not content.is_optuna:
                return await _ship_plain(unit, snapshot, rel)
            return await _publish_generation(unit, rel, snapshot, content, database, final)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_quietly, snapshot)


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
    content: DatabaseContent,
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
        if parent is not None:
            _check_monotonic(unit, rel, history, parent, content)
        record = unit.state.databases.get(rel)
        new_trials = sorted(
            content.trial_numbers() - (parent.content.trial_numbers() if parent else set())
        )
        recheck = [int(n) for n in (record.missing_files if record else {})]
        missing = await unit.sync_trial_folders(database.parent, sorted({*new_trials, *recheck}))
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


def _refuse_known_conflict(unit: StudyUnit, rel: str, history: History) -> None:
    known = unit.conflicts.get(rel)
    if known is not None and known[:2] == (history.head, frozenset(history.tags_of(history.head))):
        raise StudyConflictError(known[2])


async def _find_parent(
    unit: StudyUnit, helper: DriveHelper, rel: str, history: History
) -> tuple[_Parent | None, tuple[str, ...]]:
    """The generation the snapshot follows: ours if Drive is where we left it, else Drive's."""
    settings = unit.settings
    record = unit.state.databases.get(rel)
    shipped = unit.state.shipped_path(rel)
    if (
        record is not None
        and history.head == record.generation
        and record.tag in history.tags_of(record.generation)
    ):
        signature = await anyio.to_thread.run_sync(_size_and_mtime, shipped)
        cached = unit.parent_content.get(rel)
        if signature == record.shipped_signature:
            if cached is None:
                cached = await anyio.to_thread.run_sync(lambda: read_content(shipped, check=None))
                unit.parent_content[rel] = cached
            return _Parent(record.generation, record.sha256, shipped, cached), ()
    plain = unit.drive / rel
    if history.empty:
        return await _legacy_parent(unit, helper, plain), ()
    try:
        rebuilt = await rebuild(
            helper,
            history_dir(unit.drive, rel),
            plain,
            settings.scratch,
            settings.timeout,
            history=history,
        )
    except NoUsableBase as exc:
        logger.warning(
            "No generation of %s on Google Drive can be rebuilt (%s); a new base replaces it.",
            plain,
            exc,
        )
        return None, ("the Drive history could not be rebuilt; a new base was written",)
    try:
        parent_content = await anyio.to_thread.run_sync(
            lambda: read_content(rebuilt.path, check="quick")
        )
    except SnapshotError:
        await anyio.to_thread.run_sync(remove_quietly, rebuilt.path)
        return None, (f"generation {rebuilt.generation} on Drive is not a sound database",)
    return _Parent(rebuilt.generation, rebuilt.sha256, rebuilt.path, parent_content), rebuilt.notes


async def _legacy_parent(unit: StudyUnit, helper: DriveHelper, plain: Path) -> _Parent | None:
    """A Drive copy with no history (first backup, or an older sweepsafe): compare with it."""
    settings = unit.settings
    info = await helper.stat(plain, settings.timeout)
    if not info["exists"]:
        return None
    local = scratch_path(settings.scratch, "rebuild", ".db")
    await anyio.to_thread.run_sync(lambda: local.parent.mkdir(parents=True, exist_ok=True))
    await anyio.to_thread.run_sync(lambda: local.write_bytes(b""))
    await helper.pull(plain, local, settings.timeout)
    try:
        parent_content = await anyio.to_thread.run_sync(lambda: read_content(local, check="quick"))
    except SnapshotError as exc:
        await anyio.to_thread.run_sync(remove_quietly, local)
        logger.warning(
            "%s on Google Drive is not a sound database (%s); it is replaced.", plain, exc
        )
        return None
    sha = await anyio.to_thread.run_sync(sha256_file, local)
    return _Parent(0, sha, local, parent_content)


def _check_monotonic(
    unit: StudyUnit, rel: str, history: History, parent: _Parent, content: DatabaseContent
) -> None:
    lost = parent.content.missing_from(content)
    if not lost:
        return
    examples = ", ".join(
        f"trial {number} of study {study!r}" for study, number, _ in sorted(lost)[:3]
    )
    message = (
        f"the Drive copy of {unit.local / rel} holds {len(lost)} finished trial(s) that this "
        f"runtime's study lacks ({examples}{', ...' if len(lost) > 3 else ''}): another "
        "runtime wrote it, so the Drive copy is ahead of this runtime. Nothing on Drive was "
        "replaced and this study's backups stopped; the sweep goes on locally. To continue "
        f"from the Drive copy, move {unit.local} away and run again."
    )
    unit.conflicts[rel] = (history.head, frozenset(history.tags_of(history.head)), message)
    raise StudyConflictError(message)


def _size_and_mtime(path: Path) -> tuple[int, int]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return (-1, -1)
    return (info.st_size, info.st_mtime_ns)


async def _write_generation(
    unit: StudyUnit,
    rel: str,
    snapshot: Path,
    content: DatabaseContent,
    parent: _Parent | None,
    history: History,
    missing: dict[int, list[str]],
    notes: tuple[str, ...],
    final: bool,
) -> Published:
    settings = unit.settings
    record = unit.state.databases.get(rel)
    size = (await anyio.to_thread.run_sync(os.stat, snapshot)).st_size
    generation = max(parent.generation if parent else 0, history.head) + 1
    tag = this_runtime().id
    meta = _meta(content, missing)
    patch: bytes | None = None
    sha: str | None = None
    if parent is not None and parent.path is not None:
        try:
            delta = await anyio.to_thread.run_sync(diff_files, parent.path, snapshot)
        except PageSizeMismatch:
            delta = None
        if delta is not None:
            sha = delta.sha256
            plain_current = record is not None and record.plain_generation == parent.generation
            if sha == parent.sha256 and (plain_current or not final):
                return Published(
                    "unchanged", parent.generation, 0, content.finished_count, _frozen(missing)
                )
        # A patch chains only onto the generation just before it: one that follows an
        # older generation (later ones on Drive are damaged or missing) starts afresh.
        if delta is not None and parent.generation + 1 == generation:
            patch = encode_patch(
                delta,
                generation=generation,
                parent_generation=parent.generation,
                parent_sha256=parent.sha256,
                created=settings.clock(),
                meta=meta,
            )
    if sha is None:
        sha = await anyio.to_thread.run_sync(sha256_file, snapshot)
    patch_bytes = (
        record.patch_bytes if record and parent and parent.generation == record.generation else 0
    )
    base = patch is None or final or patch_bytes + len(patch) > settings.compact_fraction * size
    folder = history_dir(unit.drive, rel)
    written = 0
    archived = False
    async with settings.pool.session() as helper:
        await unit.ensure_lease(helper)
        if patch is not None:
            await helper.put_bytes(
                folder / f"{generation:08d}-{tag}.patch", patch, settings.timeout
            )
            written += len(patch)
        if base:
            archived = (
                record is None or settings.clock() - record.archived_at >= _ARCHIVE_INTERVAL_S
            )
            if archived:
                written += await helper.put_file(
                    snapshot,
                    folder / f"{generation:08d}-{tag}.db",
                    settings.timeout,
                    size=size,
                    chunk=COPY_CHUNK,
                )
            written += await helper.put_file(
                snapshot, unit.drive / rel, settings.timeout, size=size, chunk=COPY_CHUNK
            )
            base_record = BaseRecord(
                generation, sha, size, settings.clock(), "archive" if archived else "plain", meta
            )
            await write_base_record(helper, folder, tag, base_record, settings.timeout)
            thinned = await list_history(helper, folder, settings.timeout)
            await thin_history(
                helper,
                folder,
                thinned,
                keep=settings.keep_generations,
                clock=settings.clock,
                timeout=settings.timeout,
            )
    await _remember(
        unit, rel, snapshot, content, generation, tag, sha, patch, base, archived, missing
    )
    return Published(
        "base" if base else "patch",
        generation,
        written,
        content.finished_count,
        _frozen(missing),
        notes,
    )


async def _remember(
    unit: StudyUnit,
    rel: str,
    snapshot: Path,
    content: DatabaseContent,
    generation: int,
    tag: str,
    sha: str,
    patch: bytes | None,
    base: bool,
    archived: bool,
    missing: dict[int, list[str]],
) -> None:
    """Keep the snapshot as the next diff base, and record the new generation."""
    previous = unit.state.databases.get(rel)
    shipped = unit.state.shipped_path(rel)
    await anyio.to_thread.run_sync(_keep_as_shipped, snapshot, shipped)
    now = unit.settings.clock()
    unit.state.databases[rel] = DatabaseRecord(
        generation=generation,
        tag=tag,
        sha256=sha,
        shipped_signature=await anyio.to_thread.run_sync(_size_and_mtime, shipped),
        full_generation=generation if base else (previous.full_generation if previous else 0),
        patch_bytes=0 if base else (previous.patch_bytes if previous else 0) + len(patch or b""),
        plain_generation=generation if base else (previous.plain_generation if previous else 0),
        archived_at=now if archived else (previous.archived_at if previous else 0.0),
        missing_files={str(n): files for n, files in missing.items()},
    )
    unit.parent_content[rel] = content
    unit.conflicts.pop(rel, None)
    await unit.state.asave()


async def publish_rollback(
    unit: StudyUnit, rel: str, source: Path, content: DatabaseContent, sha: str
) -> int:
    """Make the older generation in ``source`` Drive's newest again; its new number.

    Asked for on purpose (a restore of a chosen generation), so the monotonic rule does
    not apply: the generations it passes over stay in the history, where a later restore
    can bring them back. It is written as an archived base that also refreshes the plain
    copy, so it needs no chain, and the local record follows it, so the next backups are
    patches on it. Takes the study's lease for the write, and gives it back if this
    runtime did not hold it before.

    Raises:
        LeaseHeldError: another runtime is backing the study up.
        OSError, DriveTimeout: Drive failed.
    """
    settings = unit.settings
    folder = history_dir(unit.drive, rel)
    held = unit.holds_lease
    size = (await anyio.to_thread.run_sync(os.stat, source)).st_size
    tag = this_runtime().id
    async with settings.pool.session() as helper:
        await unit.prepare(helper)
        history = await list_history(helper, folder, settings.timeout)
        generation = history.head + 1
        written = await helper.put_file(
            source,
            folder / f"{generation:08d}-{tag}.db",
            settings.timeout,
            size=size,
            chunk=COPY_CHUNK,
        )
        written += await helper.put_file(
            source, unit.drive / rel, settings.timeout, size=size, chunk=COPY_CHUNK
        )
        record = BaseRecord(generation, sha, size, settings.clock(), "archive", _meta(content, {}))
        await write_base_record(helper, folder, tag, record, settings.timeout)
        await thin_history(
            helper,
            folder,
            await list_history(helper, folder, settings.timeout),
            keep=settings.keep_generations,
            clock=settings.clock,
            timeout=settings.timeout,
        )
        if not held:
            await unit.release(helper)
    shipped = unit.state.shipped_path(rel)
    await anyio.to_thread.run_sync(_copy_file, source, shipped)
    now = settings.clock()
    unit.state.databases[rel] = DatabaseRecord(
        generation=generation,
        tag=tag,
        sha256=sha,
        shipped_signature=await anyio.to_thread.run_sync(_size_and_mtime, shipped),
        full_generation=generation,
        plain_generation=generation,
        archived_at=now,
    )
    unit.parent_content[rel] = content
    unit.conflicts.pop(rel, None)
    await unit.state.asave()
    return generation


def _copy_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(target.name + ".part")
    with open(source, "rb") as reader, open(temp, "wb") as writer:
        while chunk := reader.read(COPY_CHUNK):
            writer.write(chunk)
    os.replace(temp, target)


def _keep_as_shipped(snapshot: Path, shipped: Path) -> None:
    shipped.parent.mkdir(parents=True, exist_ok=True)
    os.replace(snapshot, shipped)


def _meta(content: DatabaseContent, missing: dict[int, list[str]]) -> dict[str, Any]:
    return {
        "finished": content.finished_count,
        "studies": list(content.studies),
        "missing_files": {str(number): files for number, files in sorted(missing.items())},
    }


def _frozen(missing: dict[int, list[str]]) -> dict[int, tuple[str, ...]]:
    return {number: tuple(files) for number, files in missing.items()}
