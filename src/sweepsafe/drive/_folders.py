"""Incremental folder backup and restore, driven by a manifest kept on local disk.

The manifest records, per file, the (size, mtime_ns) of the version last copied to
Drive, so an unchanged folder costs one local scan and no Drive-side listing. A file
that changes while it is copied is not recorded and goes again next time. Drive-side
temporaries left by a killed copy (seen by a restore, or known from an abandoned
copy) are recorded as strays and removed by the next backup.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._files import (
    RestoreRefused,
    SnapshotError,
    abandoned_temps,
    fetch_file,
    forget_abandoned,
    new_token,
    process_tag,
    remember_abandoned,
    ship_path,
)
from sweepsafe.drive._helper_process import (
    TEMP_MARKER,
    fsync_directory,
    is_temp_name,
    temp_name_for,
)
from sweepsafe.drive._sqlite import SIDECAR_SUFFIXES, is_sidecar, remove_quietly

if TYPE_CHECKING:
    from sweepsafe.drive._helper_client import DriveHelper, HelperPool

logger = logging.getLogger(__name__)

STATE_DIR_NAME = ".sweepsafe"
"""sweepsafe's own local folder (manifests, snapshots) under the local root; never copied."""

MARKER_NAME = ".sweepsafe-id"
"""A file in the store's Drive root holding an id that folder manifests record: a
different or missing id means the backup was deleted or replaced behind our back."""


@dataclass
class Manifest:
    """What the last backups of one folder put on Drive."""

    path: Path
    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    strays: set[str] = field(default_factory=set)
    folder_id: str | None = None
    """The id in the Drive folder's marker file when these files were copied there."""
    _saved: object = field(default=None, repr=False)

    def _state(self) -> tuple[dict[str, tuple[int, int]], set[str], str | None]:
        return dict(self.files), set(self.strays), self.folder_id

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = {str(rel): (int(sig[0]), int(sig[1])) for rel, sig in data["files"].items()}
            strays = {str(rel) for rel in data.get("strays", [])}
            folder_id = data.get("folder_id")
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            logger.warning(
                "Ignoring unreadable backup manifest %s; the folder is copied again", path
            )
            return cls(path)
        manifest = cls(path, files, strays, str(folder_id) if folder_id else None)
        manifest._saved = manifest._state()
        return manifest

    def save(self) -> None:
        """Write atomically (temporary, fsync, rename), unless nothing changed."""
        if self._saved == self._state():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(temp_name_for(self.path.name, new_token()))
        data = {
            "files": {rel: list(sig) for rel, sig in sorted(self.files.items())},
            "strays": sorted(self.strays),
            "folder_id": self.folder_id,
        }
        try:
            with open(temp, "w", encoding="utf-8") as file:
                json.dump(data, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
        except BaseException:
            remove_quietly(temp)
            raise
        self._saved = self._state()


def manifest_path(state_dir: Path, drive_folder: Path, relative: str) -> Path:
    """Where the manifest of one (local folder, Drive folder) pair lives."""
    digest = hashlib.sha256(f"{drive_folder}\0{relative}".encode()).hexdigest()[:32]
    return state_dir / "manifests" / f"{digest}.json"


@dataclass(frozen=True)
class FolderOutcome:
    """What a folder backup or restore did."""

    bytes_copied: int = 0
    files_copied: int = 0
    files_unchanged: int = 0
    problems: tuple[str, ...] = ()
    failed_file: str | None = None
    """The file (relative to the folder) whose copy failed and ended the operation."""
    failure: Exception | None = None
    """Why ``failed_file`` failed; the files listed as copied were still recorded."""


def _never_copied(name: str) -> bool:
    return is_sidecar(name) or is_temp_name(name) or name == MARKER_NAME


def scan_local(folder: Path, exclude: Sequence[str]) -> dict[str, tuple[str, tuple[int, int]]]:
    """Files to back up: relative POSIX path -> (path, (size, mtime_ns)).

    Skips SQLite sidecars, temporaries, ``.sweepsafe`` folders, ``exclude`` matches and
    symlinks that lead out of the folder; symlinked folders are not descended. This is
    the whole cost of backing up an unchanged folder, so it stays lean: one ``stat``
    per file and no per-file objects beyond the result.
    """
    root = os.path.realpath(folder)
    excluded = (
        re.compile("|".join(fnmatch.translate(p) for p in exclude)).match if exclude else None
    )
    found: dict[str, tuple[str, tuple[int, int]]] = {}
    pending = [(str(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if name[0] == "." and (TEMP_MARKER in name or name == MARKER_NAME):
                    continue
                if name.endswith(SIDECAR_SUFFIXES):
                    continue
                rel = prefix + name
                if excluded is not None and excluded(rel):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if name != STATE_DIR_NAME:
                        pending.append((entry.path, rel + "/"))
                    continue
                if not entry.is_file(follow_symlinks=False) and not (
                    entry.is_symlink() and _is_file_inside(entry.path, root)
                ):
                    continue  # a symlink out of the folder, a socket, a FIFO...
                try:
                    info = entry.stat()
                except FileNotFoundError:
                    continue
                found[rel] = (entry.path, (info.st_size, info.st_mtime_ns))
    return found


def _is_file_inside(link: str, root: str) -> bool:
    target = os.path.realpath(link)
    return os.path.commonpath([root, target]) == root and os.path.isfile(target)


async def sync_folder(
    pool: HelperPool,
    folder: Path,
    drive_folder: Path,
    manifest: Manifest,
    *,
    marker: Path,
    step_timeout: float,
    scratch: Path,
    exclude: Sequence[str],
    mirror: bool,
    file_concurrency: int,
) -> FolderOutcome:
    """Copy the files of ``folder`` that changed since the manifest to ``drive_folder``.

    Up to ``file_concurrency`` files are copied at once, each by its own helper. A
    failed file is returned in the outcome (``failed_file``, ``failure``) after the
    copies in flight finish; the files copied so far stay recorded. Saves the manifest
    even when cancelled or failed, so finished copies stay recorded.
    """
    local = await anyio.to_thread.run_sync(scan_local, folder, exclude)
    copied = bytes_copied = 0
    problems: list[str] = []
    changed: list[str] = []
    names_by_parent: dict[str, list[str]] = {}

    async def copy_one(helper: DriveHelper, rel: str) -> None:
        nonlocal copied, bytes_copied
        source_name, signature = local[rel]
        source = Path(source_name)
        parent = rel.rpartition("/")[0]
        names = names_by_parent.pop(parent, None)
        if names is not None:
            # A copy killed with its runtime leaves a temporary that no manifest knows
            # of; the first copy into each Drive folder removes those of the files it
            # is about to copy. Copies of this process running meanwhile in the same
            # folder are safe: their temporaries carry this process's tag.
            target_folder = drive_folder / parent
            abandoned = abandoned_temps(target_folder)
            await helper.call(
                "clean",
                str(target_folder),
                step_timeout,
                names=names,
                own_tag=process_tag(),
                abandoned=abandoned,
            )
            forget_abandoned(abandoned)
        token = new_token()
        try:
            shipped = await ship_path(
                helper,
                source,
                drive_folder / rel,
                step_timeout,
                scratch,
                clean_strays=False,
                token=token,
                keep_if_changed=True,
            )
        except FileNotFoundError:
            manifest.files.pop(rel, None)  # deleted since the scan: nothing to copy
            return
        except (PermissionError, SnapshotError) as exc:
            problems.append(f"{source}: {exc}")
            manifest.files.pop(rel, None)
            return
        except BaseException:
            if helper.broken:
                # The helper was killed mid-copy: its temporary may stay on Drive.
                manifest.strays.add(str(Path(rel).parent / temp_name_for(Path(rel).name, token)))
            raise
        copied += 1
        bytes_copied += shipped.bytes_copied
        if shipped.source_unchanged:
            manifest.files[rel] = signature
        else:
            manifest.files.pop(rel, None)

    failed: tuple[str | None, Exception] | None = None
    try:
        async with pool.session() as helper:
            await _check_drive_identity(helper, marker, drive_folder, manifest, step_timeout)
            changed = sorted(
                rel for rel, (_, sig) in local.items() if manifest.files.get(rel) != sig
            )
            if manifest.strays:
                strays = sorted(manifest.strays)
                await helper.call(
                    "remove",
                    str(drive_folder),
                    step_timeout,
                    paths=[str(drive_folder / r) for r in strays],
                )
                manifest.strays.difference_update(strays)
        for rel in changed:
            parent, _, name = rel.rpartition("/")
            names_by_parent.setdefault(parent, []).append(name)
        failed = await for_each_file(pool, changed, file_concurrency, copy_one)
        if mirror and failed is None:
            gone = sorted(set(manifest.files) - set(local))
            if gone:
                async with pool.session() as helper:
                    await helper.call(
                        "remove",
                        str(drive_folder),
                        step_timeout,
                        paths=[str(drive_folder / r) for r in gone],
                    )
                for rel in gone:
                    del manifest.files[rel]
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(manifest.save)
    return FolderOutcome(
        bytes_copied=bytes_copied,
        files_copied=copied,
        files_unchanged=len(local) - len(changed),
        problems=tuple(problems),
        failed_file=failed[0] if failed else None,
        failure=failed[1] if failed else None,
    )


async def for_each_file(
    pool: HelperPool,
    files: Sequence[str],
    concurrency: int,
    copy: Callable[[DriveHelper, str], Awaitable[None]],
) -> tuple[str | None, Exception] | None:
    """Run ``copy`` on every file, at most ``concurrency`` at once, each on its own helper.

    Each copy pays Drive's per-file latency (create, write, fsync, rename on FUSE),
    which overlaps across files. A fixed set of workers pulling from one iterator bounds
    the concurrency as a capacity limiter would, without a pending task per file, and
    lets each worker keep its helper from file to file. The first failure stops new
    copies; those in flight finish (and are recorded) before it is returned as (file,
    error), the file None when no helper could be started. Cancellation stops every
    copy in flight (their helpers are abandoned; destinations keep their previous
    complete version).
    """
    pending = iter(files)
    failures: list[tuple[str | None, Exception]] = []

    async def worker() -> None:
        current: str | None = None
        try:
            async with pool.session() as helper:
                for current in pending:
                    if failures:
                        return
                    await copy(helper, current)
        except Exception as exc:  # noqa: BLE001 - returned with its file; the caller reports it
            failures.append((current, exc))

    async with anyio.create_task_group() as group:
        for _ in range(min(max(1, concurrency), len(files))):
            group.start_soon(worker)
    return failures[0] if failures else None


async def _read_marker(helper: DriveHelper, marker: Path, step_timeout: float) -> str | None:
    reply = await helper.call("read", str(marker), step_timeout)
    if not reply["exists"]:
        return None
    return bytes(reply.get("payload", b"")).decode("ascii", "replace").strip() or None


async def _check_drive_identity(
    helper: DriveHelper, marker: Path, drive_folder: Path, manifest: Manifest, step_timeout: float
) -> None:
    """Start the manifest afresh if the Drive root is not the one it describes.

    The manifest saves listing Drive, but a backup folder deleted or replaced behind
    sweepsafe's back would then never get its files again; the Drive root's marker
    file tells.
    """
    drive_id = await _read_marker(helper, marker, step_timeout)
    if drive_id is not None and drive_id == manifest.folder_id:
        return
    if manifest.files:
        logger.info(
            "%s is not the Drive folder last backed up to (deleted or replaced?); "
            "copying every file again",
            drive_folder,
        )
    manifest.files.clear()
    if drive_id is None:
        await _write_marker(helper, marker, new_token(), step_timeout)
        # Two first backups may race to write it; both adopt whichever landed.
        drive_id = await _read_marker(helper, marker, step_timeout)
    manifest.folder_id = drive_id


async def _write_marker(
    helper: DriveHelper, marker: Path, folder_id: str, step_timeout: float
) -> None:
    handle = helper.new_handle()
    target = str(marker)
    token = new_token()
    await helper.call(
        "open",
        target,
        step_timeout,
        handle=handle,
        token=token,
        clean=True,
        own_tag=process_tag(),
        abandoned=abandoned_temps(marker.parent),
    )
    try:
        await helper.call("write", target, step_timeout, folder_id.encode(), handle=handle)
        await helper.call("commit", target, step_timeout, handle=handle)
    except BaseException:
        if helper.broken:
            remember_abandoned(str(marker.parent / temp_name_for(marker.name, token)))
        else:
            with anyio.CancelScope(shield=True), anyio.move_on_after(step_timeout):
                await helper.call("abort", target, step_timeout, handle=handle)
        raise


async def restore_folder(
    pool: HelperPool,
    drive_folder: Path,
    folder: Path,
    manifest: Manifest,
    *,
    marker: Path,
    step_timeout: float,
    file_concurrency: int,
) -> FolderOutcome | None:
    """Copy every file of ``drive_folder`` into ``folder``; None if Drive has no such folder.

    Up to ``file_concurrency`` files are copied at once; a failed file ends the restore
    as in :func:`sync_folder`. Restored files are recorded in the manifest (so the next
    backup copies nothing) and Drive-side temporaries are recorded as strays (so the
    next backup removes them). A database failing its integrity check is not restored
    and is named in problems.
    """
    async with pool.session() as helper:
        listing = await helper.call("scan", str(drive_folder), step_timeout)
        if not listing["exists"]:
            return None
        manifest.strays.update(str(rel) for rel in listing["temps"])
        manifest.folder_id = await _read_marker(helper, marker, step_timeout)
    copied = bytes_copied = 0
    problems: list[str] = []

    async def fetch_one(helper: DriveHelper, rel: str) -> None:
        nonlocal copied, bytes_copied
        target = folder.joinpath(*rel.split("/"))
        try:
            nbytes, signature = await fetch_file(helper, drive_folder / rel, target, step_timeout)
        except RestoreRefused as exc:
            problems.append(f"{drive_folder / rel} failed its integrity check ({exc})")
            return
        copied += 1
        bytes_copied += nbytes
        manifest.files[rel] = signature

    wanted = [
        str(rel)
        for rel, _size in listing["files"]
        if not any(_never_copied(part) for part in str(rel).split("/"))
    ]
    try:
        failed = await for_each_file(pool, wanted, file_concurrency, fetch_one)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(manifest.save)
            await anyio.to_thread.run_sync(fsync_directory, str(folder))
    return FolderOutcome(
        bytes_copied=bytes_copied,
        files_copied=copied,
        problems=tuple(problems),
        failed_file=failed[0] if failed else None,
        failure=failed[1] if failed else None,
    )
