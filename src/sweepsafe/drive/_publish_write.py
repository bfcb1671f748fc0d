"""Writing a generation of a database to Drive, and the local record that follows it.

A new generation goes as a patch on the one before it, or as a whole base (every so
often, and at the end of a sweep) that also refreshes the plain copy on Drive; a
rollback makes an older generation the newest again. The snapshot written is kept
locally as the next diff base.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from sweepsafe.drive._files import COPY_CHUNK
from sweepsafe.drive._generations import (
    BaseRecord,
    History,
    history_dir,
    list_history,
    write_base_record,
)
from sweepsafe.drive._local_state import DatabaseRecord
from sweepsafe.drive._pacing import LocalWork
from sweepsafe.drive._page_diff import PageSizeMismatch, diff_files, sha256_file
from sweepsafe.drive._patch_format import encode_patch
from sweepsafe.drive._publish_checks import _Parent, _size_and_mtime
from sweepsafe.drive._replica import this_runtime
from sweepsafe.drive._retention import thin_history

if TYPE_CHECKING:
    from sweepsafe.drive._sqlite import DatabaseContent
    from sweepsafe.drive._unit import StudyUnit

__all__ = ["Published", "publish_rollback"]

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
            parent_path = parent.path
            delta = await unit.local_work.setdefault(rel, LocalWork()).timed(
                lambda: anyio.to_thread.run_sync(diff_files, parent_path, snapshot)
            )
        except PageSizeMismatch:
            delta = None
        if delta is not None:
            sha = delta.sha256
            plain_current = record is not None and record.plain_generation == parent.generation
            # Files named missing by the last generation that reached Drive since: a new
            # generation says so, or verify and restore would name them for ever.
            missing_changed = record is not None and set(record.missing_files) != {
                str(number) for number in missing
            }
            if sha == parent.sha256 and (plain_current or not final) and not missing_changed:
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
