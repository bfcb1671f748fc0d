"""Talk to Drive helper processes from any thread or event loop, with a deadline per step.

A :class:`HelperPool` keeps idle helpers. A call takes one exclusively
(:meth:`HelperPool.session`), drives its non-blocking pipes with ``anyio.wait_readable``
and ``anyio.wait_writable`` (so any event loop in any thread can use it), and gives it
back. A helper that misses a deadline, or whose request was cancelled half-way, is
SIGKILLed and abandoned without waiting: it may be stuck in the kernel on a stalled
mount. Abandoned processes are kept and reaped with ``poll()`` later, never waited on.

A helper inherits none of the caller's file descriptors but its two pipes, and runs in
a session of its own: one stuck on a stalled mount must not hold the caller's terminal,
its ``| tee`` or a notebook cell's output open after the caller exits.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import itertools
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from sweepsafe.drive import _helper_process, _reserved_names
from sweepsafe.drive._helper_wire import FRAME_PREFIX, encode_frame
from sweepsafe.drive._reserved_names import temp_name

logger = logging.getLogger(__name__)

HELPER_SCRIPT = Path(_helper_process.__file__).resolve()
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
_EXIT_GRACE_S = 0.5

# Helpers that were ended (closed or killed) but have not been reaped yet, with whether
# they were killed (possibly stuck). Keeping the Popen objects here means none is
# garbage-collected while running (no ResourceWarning) and none is waited on.
_unreaped: list[tuple[subprocess.Popen[bytes], bool]] = []
_unreaped_lock = threading.Lock()


class DriveOSError(OSError):
    """A Drive-side system call failed in the helper."""


class DriveTimeout(Exception):
    """A Drive-side step did not finish within its deadline; the helper was abandoned."""

    def __init__(self, op: str, path: str, timeout: float) -> None:
        super().__init__(f"{op} {path} did not finish within {timeout:g} s")
        self.op = op
        self.path = path
        self.timeout = timeout


class HelperGone(OSError):
    """The helper process exited or closed its pipes unexpectedly."""


# -- temporaries of this runtime ----------------------------------------------------------
# Every temporary name this process writes starts with this tag. A stray clean-up removes
# the temporaries of other tags (left by a runtime that died) and, of its own, only those
# abandoned by a killed helper: never one of a concurrent copy in this process.
_process_tag = secrets.token_hex(4)
_abandoned: dict[str, set[str]] = {}  # Drive folder -> temporary names
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
    """A random token for a temporary name, starting with this process's tag."""
    return _reserved_names.new_token(_process_tag)


def _remember_abandoned(destination: Path, token: str) -> None:
    with _abandoned_lock:
        _abandoned.setdefault(str(destination.parent), set()).add(temp_name(token))


def abandoned_in(folder: Path) -> list[str]:
    """Temporaries in the Drive folder ``folder`` that killed helpers of ours may have left."""
    with _abandoned_lock:
        return sorted(_abandoned.get(str(folder), ()))


def folders_with_abandoned() -> list[Path]:
    """Drive folders where killed helpers of ours may have left temporaries."""
    with _abandoned_lock:
        return [Path(folder) for folder in _abandoned]


def forget_abandoned(folder: Path, names: Sequence[str]) -> None:
    """Forget abandoned temporaries once a clean-up has removed them."""
    with _abandoned_lock:
        left = _abandoned.get(str(folder))
        if left is not None:
            left.difference_update(names)
            if not left:
                del _abandoned[str(folder)]


# -- helper processes ---------------------------------------------------------------------
def reap_ended_helpers() -> None:
    """Forget ended helpers that have exited; never blocks."""
    with _unreaped_lock:
        _unreaped[:] = [entry for entry in _unreaped if entry[0].poll() is None]


@atexit.register
def _reap_at_exit() -> None:
    """Give helpers that were closed normally a moment to exit; never wait on killed ones.

    A killed helper may be stuck in the kernel on a stalled mount; it is left to init.
    """
    deadline = time.monotonic() + _EXIT_GRACE_S
    with _unreaped_lock:
        entries = list(_unreaped)
    for process, killed in entries:
        if killed:
            process.poll()
            continue
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    reap_ended_helpers()


def _abandon(process: subprocess.Popen[bytes], *, kill: bool) -> None:
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()
    if kill and process.poll() is None:
        with suppress(ProcessLookupError):
            process.kill()
    if process.poll() is None:
        with _unreaped_lock:
            _unreaped.append((process, kill))


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

    def __init__(self, argv: Sequence[str], anchor: str | None = None) -> None:
        self.anchor = anchor
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,
            bufsize=0,
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

    async def clean(self, folder: Path, timeout: float) -> int:
        """Remove stray temporaries (other runtimes', our abandoned ones) from a folder."""
        abandoned = abandoned_in(folder)
        reply = await self._call(
            "clean", folder, timeout, own_tag=_process_tag, abandoned=abandoned
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
                await self._call(
                    "commit", destination, timeout, handle=handle, sync_folder=sync_folder
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


def default_helper_argv() -> list[str]:
    """The command that starts a real helper."""
    return [sys.executable, "-I", str(HELPER_SCRIPT)]


class HelperPool:
    """Idle helper processes for one store, shared by every thread and event loop."""

    def __init__(self, argv: Sequence[str] | None = None, anchor: str | None = None) -> None:
        """``anchor``: an existing Drive folder above which no folder is ever created."""
        self.anchor = anchor
        self.argv = list(argv) if argv is not None else default_helper_argv()
        self._idle: list[DriveHelper] = []
        self._lock = threading.Lock()
        self._closed = False

    def _take(self) -> DriveHelper:
        reap_ended_helpers()
        while True:
            with self._lock:
                if not self._idle:
                    break
                helper = self._idle.pop()
            if helper.process.poll() is None:
                return helper
            helper.end(kill=False)  # it died while idle (OOM killer, kill by hand)
        return DriveHelper(self.argv, self.anchor)

    def _give_back(self, helper: DriveHelper) -> None:
        if helper.broken:
            # Only a detail: whoever was waiting for it reports the failure in its own words.
            logger.info(
                "Abandoned a Drive helper process (pid %d) that missed its deadline or was "
                "interrupted mid-request; it exits once the Drive mount answers",
                helper.process.pid,
            )
            helper.end(kill=True)
            return
        with self._lock:
            if not self._closed:
                self._idle.append(helper)
                return
        helper.end(kill=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[DriveHelper]:
        """Hold one helper exclusively for a sequence of requests."""
        helper = await anyio.to_thread.run_sync(self._take) if not self._idle else self._take()
        try:
            yield helper
        finally:
            self._give_back(helper)

    def close(self) -> None:
        """End idle helpers without waiting for them; helpers in use end when released."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for helper in idle:
            helper.end(kill=False)
        reap_ended_helpers()
