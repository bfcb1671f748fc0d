"""Incremental folder backup, driven by the study's manifest.

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

import os
from collections.abc import Sequence
from pathlib import Path

import anyio

from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.drive._folder_copy import _Copier
from sweepsafe.drive._folder_job import FolderJob, FolderOutcome, folder_prefix
from sweepsafe.drive._folder_scan import _LocalFile, _Scan, scan_local
from sweepsafe.drive._local_state import database_signature

__all__ = ["sync_file", "sync_folder", "sync_folders"]


async def sync_folder(
    job: FolderJob, folder: Path, *, exclude: Sequence[str] = (), mirror: bool = False
) -> FolderOutcome:
    """Copy the files of ``folder`` changed since the manifest to their place on Drive.

    Saves the manifest even when cancelled or stopped, so finished copies stay recorded.
    """
    scan = await anyio.to_thread.run_sync(scan_local, job.unit_local, folder, exclude)
    if job.check_drive:
        prefix = folder_prefix(job.unit_local, folder)
        drive_folder = job.unit_drive / prefix
        async with job.pool.session() as helper:
            _exists, files, temps = await helper.scan(drive_folder, job.timeout)
            # Copies killed with a runtime leave temporaries where no copy may come again.
            for parent in sorted({(drive_folder / rel).parent for rel in temps}):
                await helper.clean(parent, job.timeout)
        _forget_missing(job, scan, {prefix + rel: size for rel, size in files})
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
    scan = _Scan(files={rel: _LocalFile(str(path), database_signature(path, info))})
    if job.check_drive and job.manifest.get(rel) is not None:
        async with job.pool.session() as helper:
            found = await helper.stat(job.unit_drive / rel, job.timeout)
        _forget_missing(job, scan, {rel: int(found["size"])} if found["exists"] else {})
    return await _copy_changed(job, scan, None)


def _forget_missing(job: FolderJob, scan: _Scan, on_drive: dict[str, int]) -> None:
    """Forget the copies the manifest records of scanned files Drive no longer has, or
    has at another size than the one copied (cut short or replaced by hand or by a sync
    client), so that they are copied again."""
    for rel, local in scan.files.items():
        recorded = job.manifest.get(rel)
        if recorded is None:
            continue
        size = on_drive.get(rel)
        if size is None or (size != recorded[0] and not _is_snapshot_shipped(local.path)):
            job.manifest.forget(rel)


def _is_snapshot_shipped(path: str) -> bool:
    # A database in WAL mode goes to Drive as a snapshot holding its -wal content, so
    # the size of its copy need not be its main file's.
    return os.path.exists(path + "-wal")


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
    prefix = folder_prefix(job.unit_local, folder).rstrip("/")
    gone = [rel for rel in job.manifest.under(prefix) if rel not in scan.files]
    if not gone:
        return
    async with job.pool.session() as helper:
        await helper.remove([job.unit_drive / rel for rel in gone], job.timeout)
    for rel in gone:
        job.manifest.forget(rel)
