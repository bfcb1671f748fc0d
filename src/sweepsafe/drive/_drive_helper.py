"""One Drive helper process, driven over non-blocking pipes with a deadline per step.

A :class:`DriveHelper` has one typed method per operation of the helper protocol. It
drives its pipes with ``anyio.wait_readable`` and ``anyio.wait_writable``, so any event
loop in any thread can use it. A request that misses its deadline, or that was cancelled
half-way, leaves the helper ``broken``: it is then abandoned, never reused.

A helper inherits none of the caller's file descriptors but its two pipes, and runs in
a session of its own: one stuck on a stalled mount must not hold the caller's terminal,
its ``| tee`` or a notebook cell's output open after the caller exits.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from sweepsafe.drive._drive_errors import DriveOSError, DriveTimeout, HelperGone
from sweepsafe.drive._helper_reaping import _abandon
from sweepsafe.drive._helper_wire import FRAME_PREFIX, encode_frame
from sweepsafe.drive._runtime_temps import (
    _remember_abandoned,
    abandoned_in,
    forget_abandoned,
    new_token,
    process_tag,
)

__all__ = ["DriveEntry", "DriveHelper", "DriveListing"]

_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031


@dataclass(frozen=True)
class DriveEntry:
    """One entry of a Drive folder listing."""

    name: str
    kind: str
    """``"file"``, ``"dir"`` or ``"other"``."""
    size: int
    mtime: float


@dataclass(frozen=True)
class DriveListing:
    """A Drive folder's entries; ``exists`` false when there is no such folder."""

    exists: bool
    entries: tuple[DriveEntry, ...] = ()
    temps: tuple[str, ...] = ()


class DriveHelper:
    """One helper process, used by one call at a time; one typed method per operation."""

    _handles = itertools.count()

    def __init__(
        self,
        argv: Sequence[str],
        anchor: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        place: str | None = None,
        place_root: str | None = None,
        commit_s_per_mib: float = 0.0,
    ) -> None:
        """``env``: variables added to the helper's environment (an object store's
        settings, kept off its command line); ``place``: the object store's URL, which
        every error this helper raises carries; ``place_root``: the virtual root the
        store's paths start with, shown as ``place`` in errors; ``commit_s_per_mib``:
        added to a commit's deadline per MiB written (an object store uploads then)."""
        self.anchor = anchor
        self.place = place
        self.place_root = place_root
        self.commit_s_per_mib = commit_s_per_mib
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
            bufsize=0,
            env=None if env is None else {**os.environ, **env},
        )
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self._to_helper = self.process.stdin.fileno()
        self._from_helper = self.process.stdout.fileno()
        for fd in (self._to_helper, self._from_helper):
            os.set_blocking(fd, False)
            # A larger pipe is only faster, never required.
            with suppress(OSError):
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        self._buffer = bytearray()
        self.broken = False

    # -- typed operations -------------------------------------------------------------------
    async def stat(self, path: Path, timeout: float) -> dict[str, Any]:
        """``exists``, and for an existing path ``kind``, ``size`` and ``mtime``."""
        return await self._call("stat", path, timeout)

    async def read(
        self, path: Path, timeout: float, *, limit: int = 1 << 20, head: bool = False
    ) -> bytes | None:
        """The content of a small Drive file (its first ``limit`` bytes with ``head``).

        None if it does not exist. Without ``head`` a larger file is an error (EFBIG).
        """
        reply = await self._call("read", path, timeout, limit=limit, head=head)
        return bytes(reply.get("payload", b"")) if reply["exists"] else None

    async def read_versioned(
        self, path: Path, timeout: float, *, limit: int = 1 << 20
    ) -> tuple[bytes | None, str | None]:
        """A small object's content and the version it had when read (for
        :meth:`put_bytes_if`); ``(None, None)`` if it does not exist. Object stores with
        conditional writes only (``HelperPool.conditional_writes``)."""
        reply = await self._call("read_versioned", path, timeout, limit=limit)
        if not reply["exists"]:
            return None, None
        return bytes(reply.get("payload", b"")), str(reply["version"])

    async def put_bytes_if(
        self, destination: Path, data: bytes, version: str | None, timeout: float
    ) -> bool:
        """Write ``data`` whole to ``destination`` only if it is still at ``version`` (as
        :meth:`read_versioned` gave it), or still absent for None; False if it changed.
        Object stores with conditional writes only."""
        reply = await self._call("put_if", destination, timeout, data, version=version)
        return bool(reply["written"])

    async def read_many(
        self, paths: Sequence[Path], timeout: float, *, limit: int = 1 << 20
    ) -> list[bytes | None]:
        """The contents of several small Drive files in one request (None: missing).

        Any file larger than ``limit`` fails the whole request (EFBIG).
        """
        if not paths:
            return []
        reply = await self._call(
            "read_many", paths[0], timeout, paths=[str(p) for p in paths], limit=limit
        )
        data = memoryview(bytes(reply.get("payload", b"")))
        found: list[bytes | None] = []
        offset = 0
        for size in reply["sizes"]:
            if size < 0:
                found.append(None)
                continue
            found.append(bytes(data[offset : offset + size]))
            offset += size
        return found

    async def listdir(self, path: Path, timeout: float) -> DriveListing:
        """The entries of one Drive folder."""
        reply = await self._call("listdir", path, timeout)
        return DriveListing(
            exists=bool(reply["exists"]),
            entries=tuple(
                DriveEntry(str(n), str(k), int(s), float(m)) for n, k, s, m in reply["entries"]
            ),
            temps=tuple(str(name) for name in reply["temps"]),
        )

    async def scan(
        self, path: Path, timeout: float
    ) -> tuple[bool, list[tuple[str, int]], list[str]]:
        """(exists, files as (relative path, size), temporaries) under a Drive folder."""
        reply = await self._call("scan", path, timeout)
        files = [(str(rel), int(size)) for rel, size in reply["files"]]
        return bool(reply["exists"]), files, [str(rel) for rel in reply["temps"]]

    async def inspect(self, path: Path, timeout: float, *, sha256: bool = False) -> dict[str, Any]:
        """Size, mtime and, for a database, its integrity and Optuna studies (and hash)."""
        return await self._call("inspect", path, timeout, hash=sha256)

    async def pull(self, path: Path, target: Path, timeout: float) -> int:
        """Copy a Drive file into the existing local file ``target``; bytes copied."""
        reply = await self._call("pull", path, timeout, target=str(target))
        return int(reply["copied"])

    async def remove(self, paths: Sequence[Path], timeout: float) -> None:
        """Remove Drive files or whole folders; missing ones are fine."""
        if paths:
            await self._call("remove", paths[0], timeout, paths=[str(p) for p in paths])

    async def clean(self, folder: Path, timeout: float, *, uploads: bool = False) -> int:
        """Remove stray temporaries (other runtimes', our abandoned ones) from a folder;
        with ``uploads``, also abort the unfinished uploads under it (object stores)."""
        abandoned = abandoned_in(folder)
        reply = await self._call(
            "clean", folder, timeout, own_tag=process_tag(), abandoned=abandoned, uploads=uploads
        )
        forget_abandoned(folder, abandoned)
        return int(reply["removed"])

    async def sync_folders(self, folders: Sequence[Path], timeout: float) -> None:
        """fsync Drive folders whose renames were committed without it."""
        if folders:
            await self._call("sync_folders", folders[0], timeout, folders=[str(f) for f in folders])

    async def put_bytes(
        self, destination: Path, data: bytes, timeout: float, *, sync_folder: bool = True
    ) -> None:
        """Write ``data`` to ``destination`` atomically: temporary, fsync, rename."""
        await self._write_atomically(destination, timeout, sync_folder, data=data)

    async def put_file(
        self,
        source: Path,
        destination: Path,
        timeout: float,
        *,
        size: int,
        chunk: int,
        sync_folder: bool = True,
    ) -> int:
        """Copy a local file to ``destination`` atomically; every step has ``timeout``.

        A small file goes in one request; a large one in ``chunk``-sized steps, so a copy
        can be cancelled, and a slow mount detected, between them. The helper reads the
        local file itself (``copy_file_range``): no byte crosses the pipe.
        """
        if size <= chunk:
            return await self._write_atomically(
                destination, timeout, sync_folder, source=source, length=size
            )
        return await self._write_in_steps(source, destination, timeout, size, chunk, sync_folder)

    async def _write_atomically(
        self,
        destination: Path,
        timeout: float,
        sync_folder: bool,
        *,
        data: bytes = b"",
        source: Path | None = None,
        length: int = 0,
    ) -> int:
        token = new_token()
        fields: dict[str, Any] = {
            "handle": self._new_handle(),
            "token": token,
            "sync_folder": sync_folder,
        }
        if source is not None:
            fields.update(source=str(source), offset=0, length=length)
        try:
            reply = await self._call("put", destination, timeout, data, **fields)
        except BaseException:
            if self.broken:
                _remember_abandoned(destination, token)
            raise
        return int(reply["copied"])

    async def _write_in_steps(
        self,
        source: Path,
        destination: Path,
        timeout: float,
        size: int,
        chunk: int,
        sync_folder: bool,
    ) -> int:
        token = new_token()
        handle = self._new_handle()
        try:
            await self._call("open", destination, timeout, handle=handle, token=token)
            try:
                copied = 0
                while copied < size:
                    reply = await self._call(
                        "copy",
                        destination,
                        timeout,
                        handle=handle,
                        source=str(source),
                        offset=copied,
                        length=min(chunk, size - copied),
                    )
                    if not reply["copied"]:
                        raise DriveOSError(
                            errno.EIO, "the local file shrank while it was copied", str(source)
                        )
                    copied += int(reply["copied"])
                allowance = self.commit_s_per_mib * copied / (1 << 20)
                await self._call(
                    "commit",
                    destination,
                    timeout + allowance,
                    handle=handle,
                    sync_folder=sync_folder,
                )
            except BaseException:
                if not self.broken:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(timeout):
                        await self._call("abort", destination, timeout, handle=handle)
                raise
        except BaseException:
            if self.broken:
                _remember_abandoned(destination, token)
            raise
        return copied

    # -- the wire ---------------------------------------------------------------------------
    def _new_handle(self) -> str:
        return f"h{next(self._handles)}"

    async def _call(
        self, op: str, path: Path, timeout: float, payload: bytes = b"", **fields: Any
    ) -> dict[str, Any]:
        """Send one request and return its reply; raise DriveOSError, DriveTimeout."""
        try:
            return await self._request(op, path, timeout, payload, **fields)
        except DriveTimeout as exc:
            if self.place is None or self.place_root is None:
                raise
            shown = self.place + str(path)[len(self.place_root) :]
            timed_out = DriveTimeout(exc.op, shown, exc.timeout)
            timed_out.place = self.place
            raise timed_out from None
        except (DriveOSError, HelperGone) as exc:
            exc.place = self.place
            raise

    async def _request(
        self, op: str, path: Path, timeout: float, payload: bytes, **fields: Any
    ) -> dict[str, Any]:
        if self.broken:
            raise HelperGone(errno.EPIPE, "the Drive helper process is no longer usable")
        frame = encode_frame(
            {"op": op, "path": str(path), "anchor": self.anchor, **fields}, payload
        )
        try:
            with anyio.fail_after(timeout):
                await self._send(frame)
                reply = await self._receive()
        except TimeoutError:
            self.broken = True
            raise DriveTimeout(op, str(path), timeout) from None
        except BaseException:
            # Cancelled or failed half-way: the pipe is out of step with the helper.
            self.broken = True
            raise
        if not reply.get("ok"):
            if reply.get("sqlite"):
                raise DriveOSError(errno.EIO, str(reply.get("error")), str(path))
            raise DriveOSError(
                int(reply.get("errno") or errno.EIO),
                str(reply.get("error")),
                str(reply.get("path") or path),
            )
        return reply

    async def _send(self, frame: bytes) -> None:
        view = memoryview(frame)
        while view:
            try:
                written = os.write(self._to_helper, view)
            except BlockingIOError:
                await anyio.wait_writable(self._to_helper)
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                self.broken = True
                raise HelperGone(errno.EPIPE, "the Drive helper process exited") from exc
            view = view[written:]

    async def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            try:
                data = os.read(self._from_helper, max(_PIPE_SIZE, count - len(self._buffer)))
            except BlockingIOError:
                await anyio.wait_readable(self._from_helper)
                continue
            if not data:
                self.broken = True
                raise HelperGone(errno.EPIPE, "the Drive helper process exited")
            self._buffer += data
        chunk = bytes(self._buffer[:count])
        del self._buffer[:count]
        return chunk

    async def _receive(self) -> dict[str, Any]:
        header_length, payload_length = FRAME_PREFIX.unpack(
            await self._read_exactly(FRAME_PREFIX.size)
        )
        reply: dict[str, Any] = json.loads(await self._read_exactly(header_length))
        if payload_length:
            reply["payload"] = await self._read_exactly(payload_length)
        return reply

    def end(self, *, kill: bool) -> None:
        """Close the pipes (an idle helper then exits); SIGKILL a possibly stuck one."""
        _abandon(self.process, kill=kill)
