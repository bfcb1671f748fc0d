"""Checked folder restore: Drive's copy of a folder back into the study folder.

A local file changed since its last backup is never replaced, paths read from Drive
never lead outside the folder, and restored files are recorded in the manifest.
"""

from __future__ import annotations

import os
import stat as stat_module
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._drive_errors import DriveTimeout, HelperGone
from sweepsafe.drive._files import RestoreRefused, fetch_file
from sweepsafe.drive._folder_job import EntryProblem, FolderJob, FolderOutcome, folder_prefix
from sweepsafe.drive._local_state import file_signature
from sweepsafe.drive._reserved_names import STATE_DIR_NAME, is_temp_name
from sweepsafe.paths import is_within, safe_relative_path

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper

__all__ = ["restore_folder"]


async def restore_folder(
    job: FolderJob,
    drive_folder: Path,
    folder: Path,
    *,
    only: str | None = None,
    leave: frozenset[str] = frozenset(),
) -> FolderOutcome | None:
    """Copy the files of ``drive_folder`` into ``folder``; None if Drive has no such folder.

    A local file changed since its last backup (or never backed up) is kept as it is and
    named; one that still is the version last backed up is replaced by Drive's when
    they differ. Paths read from Drive never lead outside ``folder`` (nor through a
    local symlink), and sweepsafe's own folders are never brought in. Restored files are
    recorded in the manifest, so the next backup copies nothing. The files named in
    ``leave`` (relative to ``drive_folder``) are left to the caller: the databases Drive
    keeps generations of, whose plain copy may be older than their newest generation.
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
    prefix = folder_prefix(job.unit_local, folder)
    files = [(rel, size) for rel, size in files if rel not in leave]
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
