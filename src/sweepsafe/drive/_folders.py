"""Incremental folder backup and checked folder restore, driven by the study's manifest.

Paths in the manifest are relative to the study folder, so a backup of one trial's
folder, of ``trials/`` or of the whole study folder all read and update the same
records, and each costs a scan of the folder it was given, not of the whole study.

One bad entry costs one entry: a file that vanished is not an error, one that cannot
be read or that Drive refuses is skipped and named (with whether trying again can
help), and the rest of the folder is copied. Only a failure of Drive as a whole (a
timeout, a disconnected or full mount) stops a folder copy, since every other file
would meet it too.
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import os
import re
import stat as stat_module
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._drive_errors import DriveOSError, DriveTimeout, HelperGone
from sweepsafe.drive._files import (
    COPY_CHUNK,
    Captured,
    NotARegularFile,
    RestoreRefused,
    SourceChanging,
    capture_file,
    fetch_file,
    remove_quietly,
    scratch_path,
)
from sweepsafe.drive._local_state import Signature, file_signature
from sweepsafe.drive._reserved_names import STATE_DIR_NAME, is_temp_name
from sweepsafe.drive._sqlite import SIDECAR_SUFFIXES, SnapshotError, snapshot_sqlite
from sweepsafe.drive._sqlite_inspect import is_sqlite_file
from sweepsafe.paths import is_within, safe_relative_path

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper
    from sweepsafe.drive._helper_client import HelperPool
    from sweepsafe.drive._local_state import Manifest

__all__ = [
    "EntryProblem",
    "FolderJob",
    "FolderOutcome",
    "PublishDatabase",
    "restore_folder",
    "sync_file",
    "sync_folder",
    "sync_folders",
]

# Drive refusing one name or one entry: every retry would meet the same refusal.
_REFUSED_FOR_GOOD = {
    errno.ENAMETOOLONG,
    errno.EINVAL,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EFBIG,
    errno.EILSEQ,
    errno.ENOTEMPTY,
}
# Drive failing as a whole: every other file would meet it too.
_DRIVE_WIDE = {errno.ENOTCONN, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENODEV, errno.EPIPE}
_SYNC_BATCH = 64
# Files up to this size are read into memory and sent with their copy request, so a
# small file costs one request to the helper and no copy on the local disk.
_IN_MEMORY = 1 << 20


@dataclass(frozen=True)
class EntryProblem:
    """One entry that did not reach Drive (or was not restored), and why."""

    rel: str
    """Relative to the study folder."""
    reason: str
    retryable: bool
    error: BaseException | None = field(default=None, compare=False, repr=False)
    """What was raised, when one exception says it all."""

    def __str__(self) -> str:
        return f"{self.rel} ({self.reason})"


@dataclass(frozen=True)
class FolderOutcome:
    """What a folder backup or restore did."""

    files_copied: int = 0
    bytes_copied: int = 0
    files_unchanged: int = 0
    problems: tuple[EntryProblem, ...] = ()
    skipped: tuple[str, ...] = ()
    """Entries left out by rule (links that lead elsewhere, FIFOs), named once each."""
    kept_local: tuple[str, ...] = ()
    """Restore only: local files changed since their last backup, left as they were."""
    strays: tuple[str, ...] = ()
    """Restore only: temporaries of killed copies seen on Drive (relative to the study)."""
    stopped: BaseException | None = None
    """A failure of Drive as a whole that ended the copy early."""


@dataclass(frozen=True)
class _LocalFile:
    path: str
    signature: Signature


@dataclass
class _Scan:
    files: dict[str, _LocalFile] = field(default_factory=dict)
    problems: list[EntryProblem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


PublishDatabase = Callable[[Path], Awaitable["EntryProblem | None"]]
"""Backs up an Optuna database met inside a folder the way a database target is."""


@dataclass(frozen=True)
class FolderJob:
    """Where a folder copy runs: one study folder, locally and on Drive."""

    pool: HelperPool
    unit_local: Path
    unit_drive: Path
    manifest: Manifest
    timeout: float
    scratch: Path
    concurrency: int
    publish_database: PublishDatabase | None = None
    file_lock: Callable[[str], anyio.Lock] | None = None
    """One lock per file of the study: two jobs never copy the same file at once."""
    landing: dict[str, Signature] | None = None
    """Files of the study on Drive whose folder is not yet synced, shared by its jobs."""


def scan_local(unit_local: Path, folder: Path, exclude: Sequence[str]) -> _Scan:
    """The files of ``folder`` to back up, keyed by path relative to the study folder.

    Blocking. Skips sweepsafe's own folders and temporaries, ``exclude`` matches
    (patterns relative to ``folder``) and the side files of SQLite databases. A symlink
    to a file inside the study folder is backed up as that file; any other link (to a
    folder, out of the study folder, or dangling) is skipped and named, as are FIFOs and
    sockets. An unreadable folder is named; entries that vanish meanwhile are ignored.
    """
    scan = _Scan()
    unit_real = os.path.realpath(unit_local)
    excluded = (
        re.compile("|".join(fnmatch.translate(p) for p in exclude)).match if exclude else None
    )
    unit_prefix = os.path.relpath(folder, unit_local).replace(os.sep, "/")
    unit_prefix = "" if unit_prefix == "." else unit_prefix + "/"
    pending = [(str(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as found:
                entries = list(found)
        except FileNotFoundError:
            continue
        except OSError as exc:
            rel = (unit_prefix + prefix).rstrip("/") or "."
            scan.problems.append(
                EntryProblem(rel, f"folder cannot be read: {exc.strerror or exc}", False)
            )
            continue
        names = {entry.name for entry in entries}
        for entry in entries:
            name = entry.name
            if name == STATE_DIR_NAME or is_temp_name(name):
                continue
            rel = prefix + name
            if excluded is not None and excluded(rel):
                continue
            if name.endswith(SIDECAR_SUFFIXES) and _is_database_side_file(directory, name, names):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            unit_rel = unit_prefix + rel
            if stat_module.S_ISDIR(info.st_mode):
                pending.append((entry.path, rel + "/"))
            elif stat_module.S_ISREG(info.st_mode):
                scan.files[unit_rel] = _LocalFile(entry.path, file_signature(info))
            elif stat_module.S_ISLNK(info.st_mode):
                _scan_link(entry.path, unit_rel, unit_real, scan)
            else:
                scan.skipped.append(f"{unit_rel} (not a regular file)")
    return scan


def _scan_link(path: str, unit_rel: str, unit_real: str, scan: _Scan) -> None:
    target = os.path.realpath(path)
    if not is_within(target, unit_real):
        scan.skipped.append(f"{unit_rel} (a link to {target}, outside the study folder)")
        return
    try:
        info = os.stat(target)
    except OSError:
        scan.skipped.append(f"{unit_rel} (a dangling link)")
        return
    if stat_module.S_ISREG(info.st_mode):
        scan.files[unit_rel] = _LocalFile(path, file_signature(info))
    else:
        scan.skipped.append(f"{unit_rel} (a link to a folder; its target is backed up as itself)")


def _is_database_side_file(directory: str, name: str, names: set[str]) -> bool:
    """``name`` is the ``-wal``, ``-shm`` or ``-journal`` of a database beside it."""
    for suffix in SIDECAR_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if base in names and is_sqlite_file(os.path.join(directory, base)):
                return True
    return False


class _Copier:
    """The state of one folder backup: its files, what they came to, when to stop."""

    def __init__(self, job: FolderJob, scan: _Scan) -> None:
        self.job = job
        self.scan = scan
        self.copied = 0
        self.bytes = 0
        self.problems: list[EntryProblem] = list(scan.problems)
        self.stopped: BaseException | None = None
        self.unchanged_meanwhile = 0
        self._landed: list[tuple[str, Signature]] = []  # renamed on Drive, folder not synced
        self._cleaned: set[str] = set()

    async def copy_all(self, rels: Sequence[str]) -> None:
        """Copy every file of ``rels``, several at once, each worker on its own helper."""
        queue = iter(rels)

        async def worker() -> None:
            try:
                async with self.job.pool.session() as helper:
                    for rel in queue:
                        if self.stopped is not None:
                            return
                        await self._copy_one(helper, rel)
                        if len(self._landed) >= _SYNC_BATCH:
                            await self._commit_landed(helper)
                    await self._commit_landed(helper)
            except (OSError, DriveTimeout) as exc:
                self.stopped = self.stopped or exc

        async with anyio.create_task_group() as group:
            for _ in range(min(max(1, self.job.concurrency), len(rels))):
                group.start_soon(worker)

    async def _copy_one(self, helper: DriveHelper, rel: str) -> None:
        if self.job.file_lock is None:
            await self._copy_unlocked(helper, rel)
            return
        async with self.job.file_lock(rel):
            signature = self.scan.files[rel].signature
            if self.job.manifest.get(rel) == signature:
                self.unchanged_meanwhile += 1  # another job copied this very version
                return
            if self.job.landing is not None and self.job.landing.get(rel) == signature:
                # Another job copied it and has yet to sync its folder: sync it here
                # too rather than copy it again, so this job's record is as durable.
                self.unchanged_meanwhile += 1
                self._landed.append((rel, signature))
                return
            await self._copy_unlocked(helper, rel)

    async def _copy_unlocked(self, helper: DriveHelper, rel: str) -> None:
        job = self.job
        local = self.scan.files[rel]
        destination = job.unit_drive / rel
        parent = str(destination.parent)
        if parent not in self._cleaned:
            # A copy killed with its runtime leaves a temporary no record knows of.
            self._cleaned.add(parent)
            await helper.clean(destination.parent, job.timeout)
        source = Path(local.path)
        capture = scratch_path(job.scratch, "capture")
        captured: Captured | None = None
        try:
            captured = await anyio.to_thread.run_sync(
                functools.partial(capture_file, source, capture, in_memory_up_to=_IN_MEMORY)
            )
            if captured is None:  # an SQLite database
                if job.publish_database is not None and await _is_optuna(source):
                    problem = await job.publish_database(source)
                    if problem is not None:
                        self.problems.append(problem)
                    return
                shipped, signature = await self._ship_snapshot(helper, source, destination)
            else:
                shipped, signature = await self._ship_capture(helper, captured, destination)
        except FileNotFoundError:
            job.manifest.forget(rel)  # deleted since the scan: nothing to copy
            return
        except (PermissionError, NotARegularFile, SnapshotError) as exc:
            self.problems.append(EntryProblem(rel, _local_reason(exc), False, exc))
            return
        except SourceChanging:
            self.problems.append(
                EntryProblem(rel, "changing faster than it can be captured", retryable=True)
            )
            return
        except DriveOSError as exc:
            if exc.errno in _DRIVE_WIDE:
                raise
            refused = exc.errno in _REFUSED_FOR_GOOD
            reason = f"Google Drive refused it: {exc.strerror or exc}"
            if refused:
                reason += "; rename it or move it out of the folder"
            self.problems.append(EntryProblem(rel, reason, not refused, exc))
            return
        finally:
            if captured is None or captured.data is None:
                # A copy on the local disk may be there (a small file was read instead).
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(remove_quietly, capture)
        self.copied += 1
        self.bytes += shipped
        for stale in job.manifest.under(rel):
            if stale != rel:  # a folder that became this file took its files with it
                job.manifest.forget(stale)
        self._forget_file_ancestors(rel)
        self._landed.append((rel, signature))
        if job.landing is not None:
            job.landing[rel] = signature

    def _forget_file_ancestors(self, rel: str) -> None:
        # A file that became a folder was replaced on Drive by the folder.
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            self.job.manifest.forget("/".join(parts[:depth]))

    async def _ship_capture(
        self, helper: DriveHelper, captured: Captured, destination: Path
    ) -> tuple[int, Signature]:
        timeout = self.job.timeout
        if captured.data is not None:
            # A small file goes with its bytes in the request: no copy on the local disk.
            await helper.put_bytes(destination, captured.data, timeout, sync_folder=False)
            return len(captured.data), captured.signature
        copied = await helper.put_file(
            captured.path,
            destination,
            timeout,
            size=captured.signature[0],
            chunk=COPY_CHUNK,
            sync_folder=False,
        )
        return copied, captured.signature

    async def _ship_snapshot(
        self, helper: DriveHelper, source: Path, destination: Path
    ) -> tuple[int, Signature]:
        snapshot = scratch_path(self.job.scratch, "snapshot", ".db")
        try:
            signature = await anyio.to_thread.run_sync(_snapshot_with_signature, source, snapshot)
            size = (await anyio.to_thread.run_sync(os.stat, snapshot)).st_size
            copied = await helper.put_file(
                snapshot,
                destination,
                self.job.timeout,
                size=size,
                chunk=COPY_CHUNK,
                sync_folder=False,
            )
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_quietly, snapshot)
        return copied, signature

    async def _commit_landed(self, helper: DriveHelper) -> None:
        """Make the renames durable, then record the files: a record never runs ahead."""
        if not self._landed:
            return
        landed, self._landed = self._landed, []
        folders = sorted({str((self.job.unit_drive / rel).parent) for rel, _ in landed})
        await helper.sync_folders([Path(folder) for folder in folders], self.job.timeout)
        for rel, signature in landed:
            self.job.manifest.record(rel, signature)
            if self.job.landing is not None and self.job.landing.get(rel) == signature:
                self.job.landing.pop(rel, None)


def _snapshot_with_signature(source: Path, snapshot: Path) -> Signature:
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    before = file_signature(os.stat(source))
    snapshot_sqlite(source, snapshot)
    return before


async def _is_optuna(path: Path) -> bool:
    from sweepsafe.drive._sqlite import read_content

    try:
        content = await anyio.to_thread.run_sync(lambda: read_content(path, check=None))
    except SnapshotError:
        return False
    return content.is_optuna


def _local_reason(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return "cannot be read: permission denied; make it readable by this process"
    if isinstance(exc, NotARegularFile):
        return "not a regular file"
    return f"not a sound SQLite database ({exc}); check it with PRAGMA integrity_check"


async def sync_folder(
    job: FolderJob, folder: Path, *, exclude: Sequence[str] = (), mirror: bool = False
) -> FolderOutcome:
    """Copy the files of ``folder`` changed since the manifest to their place on Drive.

    Saves the manifest even when cancelled or stopped, so finished copies stay recorded.
    """
    scan = await anyio.to_thread.run_sync(scan_local, job.unit_local, folder, exclude)
    return await _copy_changed(job, scan, folder if mirror else None)


async def sync_folders(job: FolderJob, folders: Sequence[Path]) -> FolderOutcome:
    """Copy the changed files of several folders of the study as one copy.

    Their files share the ``job``'s concurrency, so many folders of a few files each go
    at Drive's pace for many files at once, not for one folder after another.
    """

    def scan_all() -> _Scan:
        merged = _Scan()
        for folder in folders:
            scan = scan_local(job.unit_local, folder, ())
            merged.files.update(scan.files)
            merged.problems.extend(scan.problems)
            merged.skipped.extend(scan.skipped)
        return merged

    return await _copy_changed(job, await anyio.to_thread.run_sync(scan_all), None)


async def sync_file(job: FolderJob, path: Path) -> FolderOutcome:
    """Copy one file of the study folder, if it changed since the manifest."""
    rel = path.relative_to(job.unit_local).as_posix()
    info = await anyio.to_thread.run_sync(os.stat, path)
    scan = _Scan(files={rel: _LocalFile(str(path), file_signature(info))})
    return await _copy_changed(job, scan, None)


async def _copy_changed(job: FolderJob, scan: _Scan, mirror: Path | None) -> FolderOutcome:
    changed = sorted(
        rel for rel, local in scan.files.items() if job.manifest.get(rel) != local.signature
    )
    copier = _Copier(job, scan)
    try:
        await copier.copy_all(changed)
        if mirror is not None and copier.stopped is None:
            await _remove_deleted(job, mirror, scan)
    except (OSError, DriveTimeout) as exc:
        copier.stopped = exc
    finally:
        with anyio.CancelScope(shield=True):
            await job.manifest.asave()
    return FolderOutcome(
        files_copied=copier.copied,
        bytes_copied=copier.bytes,
        files_unchanged=len(scan.files) - len(changed) + copier.unchanged_meanwhile,
        problems=tuple(copier.problems),
        skipped=tuple(scan.skipped),
        stopped=copier.stopped,
    )


async def _remove_deleted(job: FolderJob, folder: Path, scan: _Scan) -> None:
    prefix = os.path.relpath(folder, job.unit_local).replace(os.sep, "/")
    gone = [
        rel for rel in job.manifest.under("" if prefix == "." else prefix) if rel not in scan.files
    ]
    if not gone:
        return
    async with job.pool.session() as helper:
        await helper.remove([job.unit_drive / rel for rel in gone], job.timeout)
    for rel in gone:
        job.manifest.forget(rel)


async def restore_folder(
    job: FolderJob, drive_folder: Path, folder: Path, *, only: str | None = None
) -> FolderOutcome | None:
    """Copy the files of ``drive_folder`` into ``folder``; None if Drive has no such folder.

    A local file changed since its last backup (or never backed up) is kept as it is and
    named; one that still is the version last backed up is replaced by Drive's when
    they differ. Paths read from Drive never lead outside ``folder`` (nor through a
    local symlink), and sweepsafe's own folders are never brought in. Restored files are
    recorded in the manifest, so the next backup copies nothing.
    """
    async with job.pool.session() as helper:
        temps: list[str] = []
        if only is None:
            exists, files, temps = await helper.scan(drive_folder, job.timeout)
        else:
            info = await helper.stat(drive_folder / only, job.timeout)
            exists = bool(info["exists"]) and info["kind"] == "file"
            files = [(only, int(info["size"]))] if exists else []
    if not exists:
        return None
    prefix = os.path.relpath(folder, job.unit_local).replace(os.sep, "/")
    prefix = "" if prefix == "." else prefix + "/"
    plan = await anyio.to_thread.run_sync(_plan_restore, job, folder, prefix, files)
    copied = nbytes = 0
    problems = list(plan.problems)

    async def fetch(helper: DriveHelper, rel: str) -> None:
        nonlocal copied, nbytes
        try:
            got, signature = await fetch_file(helper, drive_folder / rel, folder / rel, job.timeout)
        except RestoreRefused as exc:
            problems.append(EntryProblem(prefix + rel, f"failed its integrity check: {exc}", False))
            return
        copied += 1
        nbytes += got
        job.manifest.record(prefix + rel, signature)

    stopped: BaseException | None = None
    try:
        stopped = await _for_each(job, plan.fetch, fetch)
    finally:
        with anyio.CancelScope(shield=True):
            await job.manifest.asave()
    return FolderOutcome(
        files_copied=copied,
        bytes_copied=nbytes,
        files_unchanged=plan.unchanged,
        problems=tuple(problems),
        kept_local=tuple(plan.kept),
        strays=tuple(prefix + rel for rel in temps if safe_relative_path(rel)),
        stopped=stopped,
    )


@dataclass
class _RestorePlan:
    fetch: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    problems: list[EntryProblem] = field(default_factory=list)
    unchanged: int = 0


def _plan_restore(
    job: FolderJob, folder: Path, prefix: str, files: list[tuple[str, int]]
) -> _RestorePlan:
    plan = _RestorePlan()
    folder_real = os.path.realpath(folder)
    for rel, size in files:
        if safe_relative_path(rel) is None or any(
            part == STATE_DIR_NAME or is_temp_name(part) for part in rel.split("/")
        ):
            continue
        target = folder / rel
        if not _stays_inside(folder, folder_real, rel):
            plan.problems.append(
                EntryProblem(
                    prefix + rel, "its local place is behind a link out of the folder", False
                )
            )
            continue
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            plan.fetch.append(rel)
            continue
        except NotADirectoryError:
            plan.kept.append(prefix + rel)
            continue
        if not stat_module.S_ISREG(info.st_mode):
            plan.kept.append(prefix + rel)
        elif job.manifest.get(prefix + rel) != file_signature(info):
            plan.kept.append(prefix + rel)  # changed since its backup: the newer work wins
        elif info.st_size == size:
            plan.unchanged += 1
        else:
            plan.fetch.append(rel)
    return plan


def _stays_inside(folder: Path, folder_real: str, rel: str) -> bool:
    """No existing component of ``folder/rel`` is a link leading out of ``folder``."""
    current = folder
    for part in rel.split("/")[:-1]:
        current = current / part
        if os.path.islink(current) and not is_within(os.path.realpath(current), folder_real):
            return False
    return True


async def _for_each(
    job: FolderJob, rels: Sequence[str], fetch: Callable[[DriveHelper, str], Awaitable[None]]
) -> BaseException | None:
    queue: Iterator[str] = iter(rels)
    failure: list[BaseException] = []

    async def worker() -> None:
        try:
            async with job.pool.session() as helper:
                for rel in queue:
                    if failure:
                        return
                    await fetch(helper, rel)
        except (OSError, DriveTimeout, HelperGone) as exc:
            failure.append(exc)

    async with anyio.create_task_group() as group:
        for _ in range(min(max(1, job.concurrency), len(rels))):
            group.start_soon(worker)
    return failure[0] if failure else None
