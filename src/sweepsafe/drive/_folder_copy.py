"""Copying the changed files of a scan to Drive, and committing the landed ones.

Several files go at once, each worker on its own helper process. A copied file lands
on Drive under its final name; its record is written to the manifest only once its
folder was synced, so a record never runs ahead of what Drive holds.

One bad entry costs one entry: a file that vanished is not an error, one that cannot
be read or that Drive refuses is skipped and named (with whether trying again can
help), and the rest of the folder is copied. Only a failure of Drive as a whole (a
timeout, a disconnected or full mount) stops a folder copy, since every other file
would meet it too.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._drive_errors import DriveOSError, DriveTimeout
from sweepsafe.drive._files import (
    COPY_CHUNK,
    Captured,
    NotARegularFile,
    SourceChanging,
    capture_file,
    remove_quietly,
    scratch_path,
)
from sweepsafe.drive._folder_job import EntryProblem, FolderJob
from sweepsafe.drive._local_state import Signature, database_signature
from sweepsafe.drive._sqlite import SnapshotError, snapshot_sqlite

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper
    from sweepsafe.drive._folder_scan import _Scan

# Drive refusing one name or one entry: every retry would meet the same refusal.
_NOT_ALLOWED = {errno.EACCES, errno.EPERM}
_REFUSED_FOR_GOOD = _NOT_ALLOWED | {
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
        self._watches: anyio.abc.TaskGroup | None = None

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

        async with anyio.create_task_group() as watches:
            self._watches = watches
            async with anyio.create_task_group() as group:
                for _ in range(min(max(1, self.job.concurrency), len(rels))):
                    group.start_soon(worker)
            watches.cancel_scope.cancel()

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
        spares = job.spares
        spare = spares.take(rel) if spares is not None else None
        try:
            if (
                spares is not None
                and spare is not None
                and job.manifest.get(rel) != spare.signature  # not on Drive already
                and await anyio.to_thread.run_sync(spares.ships, rel, source, spare)
            ):
                captured, spare = spare, None
            else:
                captured = await anyio.to_thread.run_sync(
                    functools.partial(
                        capture_file,
                        source,
                        capture,
                        in_memory_up_to=_IN_MEMORY,
                        # A file that keeps changing can hold a capture for seconds: a
                        # cancelled backup (the exit's deadline) stops it at once.
                        check_cancelled=anyio.from_thread.check_cancelled,
                    )
                )
            if captured is None:  # an SQLite database
                if job.publish_database is not None and await _is_optuna(source):
                    problem = await job.publish_database(source)
                    if problem is not None:
                        self.problems.append(problem)
                    return
                shipped, signature = await self._ship_snapshot(helper, source, destination)
            else:
                shipped, signature = await self._ship_capture(
                    helper, rel, source, captured, destination
                )
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
            if exc.errno in _NOT_ALLOWED:
                reason += "; check that this runtime may write there on Drive"
            elif refused:
                reason += "; rename it or move it out of the folder"
            self.problems.append(EntryProblem(rel, reason, not refused, exc))
            return
        finally:
            # The copy on the local disk, if there may be one (a small file was read
            # instead), and a kept version that was not shipped.
            leftovers = [spare.path] if spare is not None else []
            if captured is None or captured.data is None:
                leftovers.append(capture if captured is None else captured.path)
            if leftovers:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_remove_all, leftovers)
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
        self, helper: DriveHelper, rel: str, source: Path, captured: Captured, destination: Path
    ) -> tuple[int, Signature]:
        timeout = self.job.timeout
        if captured.data is not None:
            # A small file goes with its bytes in the request: no copy on the local disk.
            await helper.put_bytes(destination, captured.data, timeout, sync_folder=False)
            return len(captured.data), captured.signature
        spares, started = self.job.spares, time.monotonic()
        if spares is not None and self._watches is not None:
            # Until this folder copy ends, keep the next version at hand for the next one.
            self._watches.start_soon(spares.watch, rel, source, captured.signature, started)
        copied = await helper.put_file(
            captured.path,
            destination,
            timeout,
            size=captured.signature[0],
            chunk=COPY_CHUNK,
            sync_folder=False,
        )
        if spares is not None:
            spares.record_ship(rel, time.monotonic() - started)
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


def _remove_all(paths: Sequence[Path]) -> None:
    for path in paths:
        remove_quietly(path)


def _snapshot_with_signature(source: Path, snapshot: Path) -> Signature:
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    before = database_signature(source, os.stat(source))
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
