"""Before a database is published: the generation it follows, and the monotonic rule.

The snapshot follows the generation this runtime last published when Drive's newest
generation is still that one (one small listing); otherwise Drive's newest generation
is rebuilt locally (or, with no history, the plain copy is pulled). Every finished
trial of that generation must be in the snapshot, else nothing is replaced and the
study's conflict is remembered, so that its next backups are refused at once for as
long as Drive's newest generation stays the same.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._files import remove_quietly, scratch_path
from sweepsafe.drive._generations import History, history_dir
from sweepsafe.drive._page_diff import sha256_file
from sweepsafe.drive._rebuild import NoUsableBase, rebuild
from sweepsafe.drive._sqlite import DatabaseContent, SnapshotError, read_content
from sweepsafe.errors import StudyConflictError

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper
    from sweepsafe.drive._unit import StudyUnit

logger = logging.getLogger("sweepsafe.drive")


@dataclass(frozen=True)
class _Parent:
    generation: int
    sha256: str
    path: Path | None
    """A local file holding that generation, to diff against; None to ship a base."""
    content: DatabaseContent


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
        # The plain copy still holds finished trials the new base must keep.
        return await _legacy_parent(unit, helper, plain), (
            "the Drive history could not be rebuilt; a new base was written",
        )
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
