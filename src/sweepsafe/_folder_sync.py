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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe._copy import (
    RestoreRefused,
    SnapshotError,
    abandoned_temps,
    fetch_file,
    forget_abandoned,
    new_token,
    process_tag,
    ship_path,
)
from sweepsafe._drive_helper import TEMP_MARKER, fsync_directory, is_temp_name, temp_name_for
from sweepsafe._snapshot import SIDECAR_SUFFIXES, is_sidecar, remove_quietly

if TYPE_CHECKING:
    from sweepsafe._helper_client import DriveHelper

logger = logging.getLogger(__name__)

STATE_DIR_NAME = ".sweepsafe"
"""sweepsafe's own local folder (manifests, snapshots) under the local root; never copied."""


@dataclass
class Manifest:
    """What the last backups of one folder put on Drive."""

    path: Path
    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    strays: set[str] = field(default_factory=set)
    _saved: tuple[dict[str, tuple[int, int]], set[str]] | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = {str(rel): (int(sig[0]), int(sig[1])) for rel, sig in data["files"].items()}
            strays = {str(rel) for rel in data.get("strays", [])}
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            logger.warning(
                "Ignoring unreadable backup manifest %s; the folder is copied again", path
            )
            return cls(path)
        return cls(path, files, strays, (dict(files), set(strays)))

    def save(self) -> None:
        """Write atomically (temporary, fsync, rename), unless nothing changed."""
        if self._saved == (self.files, self.strays):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(temp_name_for(self.path.name, new_token()))
        data = {
            "files": {rel: list(sig) for rel, sig in sorted(self.files.items())},
            "strays": sorted(self.strays),
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
        self._saved = (dict(self.files), set(self.strays))


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


def _never_copied(name: str) -> bool:
    return is_sidecar(name) or is_temp_name(name)


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
                if name.endswith(SIDECAR_SUFFIXES) or (name[0] == "." and TEMP_MARKER in name):
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
    helper: DriveHelper,
    folder: Path,
    drive_folder: Path,
    manifest: Manifest,
    *,
    step_timeout: float,
    scratch: Path,
    exclude: Sequence[str],
    mirror: bool,
) -> FolderOutcome:
    """Copy the files of ``folder`` that changed since the manifest to ``drive_folder``.

    Saves the manifest even when cancelled or failed, so finished copies stay recorded.
    """
    local = await anyio.to_thread.run_sync(scan_local, folder, exclude)
    changed = [rel for rel, (_, sig) in local.items() if manifest.files.get(rel) != sig]
    copied = bytes_copied = 0
    problems: list[str] = []
    try:
        if manifest.strays:
            strays = sorted(manifest.strays)
            await helper.call(
                "remove",
                str(drive_folder),
                step_timeout,
                paths=[str(drive_folder / r) for r in strays],
            )
            manifest.strays.difference_update(strays)
        await helper.call("mkdir", str(drive_folder), step_timeout)
        cleaned: set[str] = set()
        for rel in sorted(changed):
            source_name, signature = local[rel]
            source = Path(source_name)
            parent = rel.rpartition("/")[0]
            if parent not in cleaned:
                # A copy killed with its runtime leaves a temporary that no manifest
                # knows of; the next copy into the same Drive folder removes it.
                names = [r.rpartition("/")[2] for r in changed if r.rpartition("/")[0] == parent]
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
                cleaned.add(parent)
            token = new_token()
            destination = drive_folder / rel
            try:
                shipped = await ship_path(
                    helper,
                    source,
                    destination,
                    step_timeout,
                    scratch,
                    clean_strays=False,
                    token=token,
                )
            except FileNotFoundError:
                manifest.files.pop(rel, None)  # deleted since the scan: nothing to copy
                continue
            except (PermissionError, SnapshotError) as exc:
                problems.append(f"{source}: {exc}")
                manifest.files.pop(rel, None)
                continue
            except BaseException:
                if helper.broken:
                    # The helper was killed mid-copy: its temporary may stay on Drive.
                    manifest.strays.add(
                        str(Path(rel).parent / temp_name_for(Path(rel).name, token))
                    )
                raise
            copied += 1
            bytes_copied += shipped.bytes_copied
            if shipped.source_unchanged:
                manifest.files[rel] = signature
            else:
                manifest.files.pop(rel, None)
        if mirror:
            gone = sorted(set(manifest.files) - set(local))
            if gone:
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
    )


async def restore_folder(
    helper: DriveHelper,
    drive_folder: Path,
    folder: Path,
    manifest: Manifest,
    *,
    step_timeout: float,
) -> FolderOutcome | None:
    """Copy every file of ``drive_folder`` into ``folder``; None if Drive has no such folder.

    Restored files are recorded in the manifest (so the next backup copies nothing) and
    Drive-side temporaries are recorded as strays (so the next backup removes them).
    A database failing its integrity check is not restored and is named in problems.
    """
    listing = await helper.call("scan", str(drive_folder), step_timeout)
    if not listing["exists"]:
        return None
    manifest.strays.update(str(rel) for rel in listing["temps"])
    copied = bytes_copied = 0
    problems: list[str] = []
    try:
        for rel, _size in listing["files"]:
            if any(_never_copied(part) for part in str(rel).split("/")):
                continue
            target = folder.joinpath(*str(rel).split("/"))
            try:
                nbytes, signature = await fetch_file(
                    helper, drive_folder / rel, target, step_timeout
                )
            except RestoreRefused as exc:
                problems.append(f"{drive_folder / rel} failed its integrity check ({exc})")
                continue
            copied += 1
            bytes_copied += nbytes
            manifest.files[str(rel)] = signature
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(manifest.save)
            await anyio.to_thread.run_sync(fsync_directory, str(folder))
    return FolderOutcome(bytes_copied=bytes_copied, files_copied=copied, problems=tuple(problems))
