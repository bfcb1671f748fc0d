"""Talk to Drive helper processes from any thread or event loop, with a deadline per step.

A :class:`HelperPool` keeps idle helpers. A call takes one exclusively
(:meth:`HelperPool.session`), drives its non-blocking pipes with ``anyio.wait_readable``
and ``anyio.wait_writable`` (so any event loop in any thread can use it), and gives it
back. A helper that misses a deadline, or whose request was cancelled half-way, is
SIGKILLed and abandoned without waiting: it may be stuck in the kernel on a stalled
mount. Abandoned processes are kept and reaped with ``poll()`` later, never waited on.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio

from sweepsafe.drive import _helper_process
from sweepsafe.drive._helper_process import FRAME_PREFIX, encode_frame

logger = logging.getLogger(__name__)

HELPER_SCRIPT = Path(_helper_process.__file__).resolve()
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031

# Helpers that were ended (closed or killed) but have not been reaped yet, with whether
# they were killed (possibly stuck). Keeping the Popen objects here means none is
# garbage-collected while running (no ResourceWarning) and none is waited on.
_unreaped: list[tuple[subprocess.Popen[bytes], bool]] = []
_unreaped_lock = threading.Lock()
_EXIT_GRACE_S = 0.5


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


class DriveHelper:
    """One helper process, used by one call at a time."""

    _handles = itertools.count()

    def __init__(self, argv: Sequence[str], anchor: str | None = None) -> None:
        self.anchor = anchor
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
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

    def new_handle(self) -> str:
        return f"h{next(self._handles)}"

    async def call(
        self, op: str, path: str, step_timeout: float, payload: bytes = b"", **fields: Any
    ) -> dict[str, Any]:
        """Send one request and return its reply; raise DriveOSError, DriveTimeout."""
        if self.broken:
            raise HelperGone(errno.EPIPE, "the Drive helper process is no longer usable")
        frame = encode_frame({"op": op, "path": path, "anchor": self.anchor, **fields}, payload)
        try:
            with anyio.fail_after(step_timeout):
                await self._send(frame)
                reply = await self._receive()
        except TimeoutError:
            self.broken = True
            raise DriveTimeout(op, path, step_timeout) from None
        except BaseException:
            # Cancelled or failed half-way: the pipe is out of step with the helper.
            self.broken = True
            raise
        if not reply.get("ok"):
            if reply.get("sqlite"):
                raise DriveOSError(errno.EIO, str(reply.get("error")), path)
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


class HelperPool:
    """Idle helper processes for one store, shared by every thread and event loop."""

    def __init__(self, argv: Sequence[str] | None = None, anchor: str | None = None) -> None:
        """``anchor``: an existing Drive folder above which no folder is ever created."""
        self.anchor = anchor
        self.argv = list(argv) if argv is not None else [sys.executable, "-I", str(HELPER_SCRIPT)]
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
            logger.warning(
                "Abandoned a Drive helper process (pid %d) that missed its deadline or was "
                "interrupted mid-request; the next copy uses a fresh one",
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
