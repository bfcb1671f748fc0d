"""The byte-moving primitives: atomic chunked copies to and from Drive through a helper.

Every Drive-side file is written under a temporary name beside its target, fsynced and
then renamed over it, so the target is always the previous complete version or the
new complete one. Each step is one helper request with its own deadline; a cancelled
or failed copy leaves its temporary for the next backup of the same target to remove.
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._helper_client import DriveOSError
from sweepsafe.drive._helper_process import SOURCE_CHANGED_ERRNO, fsync_directory, temp_name_for
from sweepsafe.drive._sqlite import (
    SnapshotError,
    check_integrity,
    is_sqlite_file,
    remove_quietly,
    snapshot_sqlite,
)

if TYPE_CHECKING:
    from sweepsafe.drive._helper_client import DriveHelper

__all__ = [
    "COPY_CHUNK",
    "RestoreRefused",
    "Shipped",
    "SnapshotError",
    "abandoned_temps",
    "fetch_file",
    "file_signature",
    "forget_abandoned",
    "new_token",
    "process_tag",
    "remember_abandoned",
    "ship_file",
    "ship_path",
]

COPY_CHUNK = 8 << 20
"""Bytes per copy request: the granularity of cancellation and of per-step deadlines."""


@dataclass(frozen=True)
class Shipped:
    """What one file copy to Drive moved."""

    bytes_copied: int
    source_unchanged: bool
    """The source's (size, mtime_ns) was the same before and after the copy."""


# Every temporary name this process writes starts with this tag. A stray clean-up
# removes the temporaries of other tags (left by a runtime that died) and, of its own,
# only those abandoned by a killed helper: never one of a concurrent copy of the same
# file in this process.
_process_tag = secrets.token_hex(4)
_abandoned: set[str] = set()
_abandoned_lock = threading.Lock()


def _start_new_process_tag() -> None:
    global _process_tag
    _process_tag = secrets.token_hex(4)
    with _abandoned_lock:
        _abandoned.clear()


os.register_at_fork(after_in_child=_start_new_process_tag)


def process_tag() -> str:
    """The tag that starts every temporary name this process writes."""
    return _process_tag


def new_token() -> str:
    """A random suffix for a temporary name, starting with this process's tag."""
    return _process_tag + secrets.token_hex(6)


def abandoned_temps(folder: Path) -> list[str]:
    """Temporaries in the Drive folder ``folder`` left by this process's killed helpers."""
    with _abandoned_lock:
        return [temp for temp in _abandoned if os.path.dirname(temp) == str(folder)]


def remember_abandoned(temp: str) -> None:
    """Note a temporary that a killed helper may have left, for the next clean-up."""
    with _abandoned_lock:
        _abandoned.add(temp)


def forget_abandoned(temps: list[str]) -> None:
    """Forget abandoned temporaries once a clean-up has removed them."""
    with _abandoned_lock:
        _abandoned.difference_update(temps)


def file_signature(path: Path) -> tuple[int, int]:
    """(size, mtime_ns): what the incremental folder sync compares."""
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


async def ship_file(
    helper: DriveHelper,
    source: Path,
    destination: Path,
    step_timeout: float,
    *,
    clean_strays: bool,
    token: str | None = None,
    stream: bool = False,
) -> int:
    """Copy the local file ``source`` to ``destination`` on Drive, atomically.

    By default the helper reads the local file itself (``copy_file_range``: no bytes
    cross the pipe or this process's memory); it runs at ``cp`` speed, where streaming
    the bytes through the pipe (``stream``, read here in a worker thread) measured
    about half as fast (tools/bench_copy.py). Cancellation still lands between chunks.
    Returns the bytes copied.
    """
    token = token or new_token()
    try:
        return await _ship_to_temp(
            helper, source, destination, step_timeout, token, clean_strays, stream
        )
    except BaseException:
        if helper.broken:
            # The helper was killed mid-copy: its temporary may stay behind on Drive.
            remember_abandoned(str(destination.parent / temp_name_for(destination.name, token)))
        raise


async def _ship_to_temp(
    helper: DriveHelper,
    source: Path,
    destination: Path,
    step_timeout: float,
    token: str,
    clean_strays: bool,
    stream: bool,
) -> int:
    handle = helper.new_handle()
    dest = str(destination)
    info = await anyio.to_thread.run_sync(os.stat, source)
    size = info.st_size
    # The helper checks the source again before it commits: a file rewritten during
    # its copy must not replace the last good copy on Drive.
    expect = [info.st_size, info.st_mtime_ns]
    abandoned = abandoned_temps(destination.parent) if clean_strays else []
    if not stream and size <= COPY_CHUNK:
        # One round trip for the common small file: create, copy, fsync, rename.
        reply = await helper.call(
            "put",
            dest,
            step_timeout,
            handle=handle,
            token=token,
            clean=clean_strays,
            own_tag=_process_tag,
            abandoned=abandoned,
            source=str(source),
            offset=0,
            length=size,
            expect=expect,
        )
        forget_abandoned(abandoned)
        return int(reply["copied"])
    await helper.call(
        "open",
        dest,
        step_timeout,
        handle=handle,
        token=token,
        clean=clean_strays,
        own_tag=_process_tag,
        abandoned=abandoned,
    )
    forget_abandoned(abandoned)
    try:
        copied = 0
        if stream:
            async with await anyio.open_file(source, "rb") as reader:
                while chunk := await reader.read(COPY_CHUNK):
                    await helper.call("write", dest, step_timeout, chunk, handle=handle)
                    copied += len(chunk)
        else:
            while copied < size:
                length = min(COPY_CHUNK, size - copied)
                reply = await helper.call(
                    "copy",
                    dest,
                    step_timeout,
                    handle=handle,
                    source=str(source),
                    offset=copied,
                    length=length,
                )
                if not reply["copied"]:
                    break  # the source shrank; the caller sees it changed
                copied += int(reply["copied"])
        await helper.call(
            "commit", dest, step_timeout, handle=handle, source=str(source), expect=expect
        )
    except BaseException:
        if not helper.broken:
            with anyio.CancelScope(shield=True), anyio.move_on_after(step_timeout):
                await helper.call("abort", dest, step_timeout, handle=handle)
        raise
    return copied


async def ship_path(
    helper: DriveHelper,
    source: Path,
    destination: Path,
    step_timeout: float,
    scratch: Path,
    *,
    clean_strays: bool,
    token: str | None = None,
    stream: bool = False,
    keep_if_changed: bool = False,
) -> Shipped:
    """Copy a file to Drive; an SQLite database goes as a checked snapshot.

    A file that changes during its copy is never committed: the Drive copy keeps its
    previous version. With ``keep_if_changed`` that is reported as a copy whose source
    changed (the folder sync then copies it again next time); otherwise it raises.

    Raises SnapshotError for a database that cannot be snapshotted soundly (nothing is
    shipped then), OSError for local failures, and the helper's errors for Drive ones.
    """
    before = await anyio.to_thread.run_sync(file_signature, source)
    if await anyio.to_thread.run_sync(is_sqlite_file, source):
        snapshot = scratch / f"snapshot-{os.getpid()}-{new_token()}.db"
        try:
            await anyio.to_thread.run_sync(_snapshot_into, source, snapshot)
            copied = await ship_file(
                helper,
                snapshot,
                destination,
                step_timeout,
                clean_strays=clean_strays,
                token=token,
                stream=stream,
            )
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_quietly, snapshot)
    else:
        try:
            copied = await ship_file(
                helper,
                source,
                destination,
                step_timeout,
                clean_strays=clean_strays,
                token=token,
                stream=stream,
            )
        except DriveOSError as exc:
            if keep_if_changed and exc.errno == SOURCE_CHANGED_ERRNO:
                return Shipped(bytes_copied=0, source_unchanged=False)
            raise
    after = await anyio.to_thread.run_sync(_signature_or_none, source)
    return Shipped(bytes_copied=copied, source_unchanged=after == before)


def _snapshot_into(source: Path, snapshot: Path) -> None:
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_snapshots(snapshot.parent)
    snapshot_sqlite(source, snapshot)


def _remove_orphaned_snapshots(folder: Path) -> None:
    """Remove snapshots left by processes that died mid-copy (named by their pid)."""
    for path in folder.glob("snapshot-*.db*"):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            remove_quietly(path)
        except PermissionError:
            pass  # alive, another user's


def _signature_or_none(path: Path) -> tuple[int, int] | None:
    try:
        return file_signature(path)
    except OSError:
        return None


def _local_temp_for(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / temp_name_for(target.name, new_token())
    temp.touch(exist_ok=False)
    return temp


class RestoreRefused(Exception):
    """A Drive copy failed its integrity check; nothing local was replaced."""


def _install_local(temp: Path, target: Path) -> tuple[int, int]:
    """Check a pulled file and move it over ``target``; return its signature."""
    try:
        if is_sqlite_file(temp):
            problem = check_integrity(temp)
            if problem is not None:
                raise RestoreRefused(problem)
            # A stale WAL or journal beside the old database would be replayed into
            # the restored one; it belongs to the file being replaced.
            for suffix in ("-wal", "-shm", "-journal"):
                remove_quietly(target.with_name(target.name + suffix))
        os.replace(temp, target)
        fsync_directory(str(target.parent))
    except BaseException:
        remove_quietly(temp)
        raise
    return file_signature(target)


async def fetch_file(
    helper: DriveHelper, source: Path, target: Path, step_timeout: float
) -> tuple[int, tuple[int, int]]:
    """Copy the Drive file ``source`` over the local ``target``, atomically and checked.

    A database must pass ``PRAGMA integrity_check`` before it replaces anything
    (else RestoreRefused). Returns the bytes copied and the new local signature.
    """
    temp = await anyio.to_thread.run_sync(_local_temp_for, target)
    try:
        reply = await helper.call("pull", str(source), step_timeout, target=str(temp))
    except BaseException:
        # A killed helper may still hold the file open; removing the name is still safe.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove_quietly, temp)
        raise
    signature = await anyio.to_thread.run_sync(_install_local, temp, target)
    return int(reply["copied"]), signature
