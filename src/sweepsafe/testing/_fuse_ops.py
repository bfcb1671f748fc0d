"""The file system operations of the FuseDrive daemon, with the faults of its plan.

The daemon re-reads the plan file before every operation (a ``stat`` when it has not
changed) and ignores keys it does not know. How each field acts:

- ``latency_s`` is charged once per file *committed*: when a handle that was written
  to is made durable, at its first ``fsync`` after writes or, if it was never synced,
  when it is closed (FUSE ``flush``, which ``close()`` waits for; ``release`` comes
  too late, the kernel sends it after ``close()`` has returned). So writing a file
  atomically (temporary, write, fsync, close, rename) costs ``latency_s`` once, and
  renames, directory operations and reads cost nothing.
- ``latency_per_mib_s`` delays each write request in proportion to its size.
- ``fail_every_kth_write`` fails every k-th write request with EIO, counting the write
  requests since the plan file last changed. The kernel sends at most 128 KiB per
  request and ends one at a partly written first page, so one ``write()`` can be two
  or more requests.
- ``enospc`` fails every write request with ENOSPC and reports no free space.
- ``disconnected`` fails every operation with ENOTCONN.
- ``hang`` blocks every operation in the daemon until the plan no longer says so.
- ``pause_fifo``, if set, is a named pipe from which the daemon reads one byte before
  each commit, as the simulated helper does.

Counters (operations by kind, errors by name, bytes read and written, commits, and
operations blocked right now) go to a JSON file in the state folder, rewritten
atomically at most every 0.1 s when they change; :meth:`FuseDrive.stats` asks the
daemon for a fresh copy with SIGUSR1, which a thread of its own answers even while
every file operation hangs.

The daemon (``_fuse_daemon.py``) loads this module by file path: it imports only the
standard library.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from typing import Any

_STATS_INTERVAL_S = 0.1
_HANG_RECHECK_S = 0.05


class _Plan:
    """The fault plan file, re-read only when it changes."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._plan: dict[str, Any] = {}
        self._writes = 0

    def current(self) -> dict[str, Any]:
        try:
            info = os.stat(self._path)
            key: tuple[int, int, int] | None = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            key = None
        with self._lock:
            if key != self._key:
                self._key = key
                self._writes = 0
                self._plan = self._load() if key is not None else {}
            return self._plan

    def count_write(self) -> int:
        """Counts a write request; returns how many came since the plan changed."""
        with self._lock:
            self._writes += 1
            return self._writes

    def _load(self) -> dict[str, Any]:
        try:
            with open(self._path, encoding="utf-8") as file:
                data = json.load(file)
        except (OSError, ValueError):
            return self._plan  # being rewritten in place: keep the last good plan
        return data if isinstance(data, dict) else self._plan


class _Stats:
    """The daemon's counters, and the thread that writes them to the stats file."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._changed = threading.Event()
        self._counts: dict[str, Any] = {
            "pid": os.getpid(),
            "ops": {},
            "errors": {},
            "bytes_written": 0,
            "bytes_read": 0,
            "writes": 0,
            "commits": 0,
            "blocked": 0,
        }

    def op(self, name: str) -> None:
        with self._lock:
            ops = self._counts["ops"]
            ops[name] = ops.get(name, 0) + 1
        self._changed.set()

    def error(self, code: int | None) -> None:
        name = errno.errorcode.get(code or 0, str(code))
        with self._lock:
            errors = self._counts["errors"]
            errors[name] = errors.get(name, 0) + 1
        self._changed.set()

    def add(self, field: str, amount: int) -> None:
        with self._lock:
            self._counts[field] += amount
        self._changed.set()

    def write(self) -> None:
        temp = f"{self._path}.{os.getpid()}.tmp"
        with self._write_lock:  # the stats thread and, at start and end, the main thread
            if self._closed:
                return
            with self._lock:
                text = json.dumps({**self._counts, "taken_at_ns": time.monotonic_ns()})
            with open(temp, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temp, self._path)

    def close(self) -> None:
        """Writes no more (the state folder is going away)."""
        with self._write_lock:
            self._closed = True

    def serve(self) -> None:
        """Writes the counters when asked (SIGUSR1), and when they changed, every 0.1 s."""
        while True:
            asked = signal.sigtimedwait([signal.SIGUSR1], _STATS_INTERVAL_S)
            if asked is not None or self._changed.is_set():
                self._changed.clear()
                self.write()


class _Passthrough:
    """fusepy operations: each one passes through to the backing folder after the plan's faults.

    fusepy calls ``self(op, *args)`` for every operation this class has a method for;
    the others are absent on purpose, so the kernel gets ENOSYS for them.
    """

    use_ns = True
    # Handle-based operations use only the file handle, so an open file that was
    # unlinked (hard_remove) keeps working with no path.
    flag_nullpath_ok = True

    def __init__(self, root: str, plan: _Plan, stats: _Stats) -> None:
        self._root = root
        self._plan = plan
        self._stats = stats
        self._dirty: set[int] = set()
        self._dirty_lock = threading.Lock()

    def __call__(self, op: str, *args: Any) -> Any:
        self._stats.op(op)
        try:
            plan = self._wait_while_hung()
            if op == "release":
                return self.release(*args)  # closes our descriptor even when disconnected
            if plan.get("disconnected"):
                raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
            return getattr(self, op)(plan, *args)
        except OSError as exc:
            self._stats.error(exc.errno)
            raise

    def _wait_while_hung(self) -> dict[str, Any]:
        plan = self._plan.current()
        if not plan.get("hang"):
            return plan
        self._stats.add("blocked", 1)
        try:
            while plan.get("hang"):
                time.sleep(_HANG_RECHECK_S)
                plan = self._plan.current()
        finally:
            self._stats.add("blocked", -1)
        return plan

    def _real(self, path: str) -> str:
        return os.path.join(self._root, path.lstrip("/"))

    def _commit(self, plan: dict[str, Any], fd: int) -> None:
        with self._dirty_lock:
            if fd not in self._dirty:
                return
            self._dirty.discard(fd)
        self._stats.add("commits", 1)
        latency = float(plan.get("latency_s") or 0.0)
        if latency > 0:
            time.sleep(latency)
        fifo = plan.get("pause_fifo")
        if fifo:
            with open(fifo, "rb") as gate:
                gate.read(1)

    # -- metadata ---------------------------------------------------------------------
    def getattr(self, plan: dict[str, Any], path: str | None, fh: Any = None) -> dict[str, int]:
        # fusepy passes a NULL pointer (falsy), not None, when there is no handle.
        info = os.fstat(fh.fh) if fh else os.lstat(self._real(path or "/"))
        return {
            "st_mode": info.st_mode,
            "st_nlink": info.st_nlink,
            "st_uid": info.st_uid,
            "st_gid": info.st_gid,
            "st_size": info.st_size,
            "st_blocks": info.st_blocks,
            "st_blksize": info.st_blksize,
            "st_atime": info.st_atime_ns,
            "st_mtime": info.st_mtime_ns,
            "st_ctime": info.st_ctime_ns,
        }

    def access(self, plan: dict[str, Any], path: str, mode: int) -> int:
        if not os.access(self._real(path), mode):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return 0

    def readdir(self, plan: dict[str, Any], path: str | None, fh: int) -> list[str]:
        if path is None:
            return [".", ".."]
        return [".", "..", *os.listdir(self._real(path))]

    def statfs(self, plan: dict[str, Any], path: str) -> dict[str, int]:
        info = os.statvfs(self._real(path))
        full = bool(plan.get("enospc"))
        return {
            "f_bsize": info.f_bsize,
            "f_frsize": info.f_frsize,
            "f_blocks": info.f_blocks,
            "f_bfree": 0 if full else info.f_bfree,
            "f_bavail": 0 if full else info.f_bavail,
            "f_files": info.f_files,
            "f_ffree": info.f_ffree,
            "f_favail": info.f_favail,
            "f_flag": info.f_flag,
            "f_namemax": info.f_namemax,
        }

    def mkdir(self, plan: dict[str, Any], path: str, mode: int) -> int:
        os.mkdir(self._real(path), mode)
        return 0

    def rmdir(self, plan: dict[str, Any], path: str) -> int:
        os.rmdir(self._real(path))
        return 0

    def unlink(self, plan: dict[str, Any], path: str) -> int:
        os.unlink(self._real(path))
        return 0

    def rename(self, plan: dict[str, Any], old: str, new: str) -> int:
        os.rename(self._real(old), self._real(new))
        return 0

    def link(self, plan: dict[str, Any], path: str, existing: str) -> int:
        os.link(self._real(existing), self._real(path))
        return 0

    def symlink(self, plan: dict[str, Any], path: str, target: str) -> int:
        os.symlink(target, self._real(path))
        return 0

    def readlink(self, plan: dict[str, Any], path: str) -> str:
        return os.readlink(self._real(path))

    def chmod(self, plan: dict[str, Any], path: str, mode: int) -> int:
        os.chmod(self._real(path), mode)
        return 0

    def chown(self, plan: dict[str, Any], path: str, uid: int, gid: int) -> int:
        os.lchown(self._real(path), uid, gid)
        return 0

    def utimens(self, plan: dict[str, Any], path: str, times: tuple[int, int] | None = None) -> int:
        if times is None:
            os.utime(self._real(path), follow_symlinks=False)  # now
        else:
            os.utime(self._real(path), ns=times, follow_symlinks=False)
        return 0

    def truncate(self, plan: dict[str, Any], path: str | None, length: int, fh: Any = None) -> int:
        if fh:
            os.ftruncate(fh.fh, length)
        else:
            os.truncate(self._real(path or "/"), length)
        return 0

    # -- files (raw_fi: ``fi`` is the kernel's fuse_file_info; ``fi.fh`` our descriptor) --
    def create(self, plan: dict[str, Any], path: str, mode: int, fi: Any) -> int:
        fi.fh = os.open(self._real(path), fi.flags | os.O_CREAT, mode)
        return 0

    def open(self, plan: dict[str, Any], path: str, fi: Any) -> int:
        fi.fh = os.open(self._real(path), fi.flags)
        return 0

    def read(
        self, plan: dict[str, Any], path: str | None, size: int, offset: int, fi: Any
    ) -> bytes:
        data = os.pread(fi.fh, size, offset)
        self._stats.add("bytes_read", len(data))
        return data

    def write(
        self, plan: dict[str, Any], path: str | None, data: bytes, offset: int, fi: Any
    ) -> int:
        count = self._plan.count_write()
        self._stats.add("writes", 1)
        if plan.get("enospc"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        every = int(plan.get("fail_every_kth_write") or 0)
        if every > 0 and count % every == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        per_mib = float(plan.get("latency_per_mib_s") or 0.0)
        if per_mib > 0:
            time.sleep(per_mib * len(data) / (1 << 20))
        written = os.pwrite(fi.fh, data, offset)
        with self._dirty_lock:
            self._dirty.add(fi.fh)
        self._stats.add("bytes_written", written)
        return written

    def flush(self, plan: dict[str, Any], path: str | None, fi: Any) -> int:
        self._commit(plan, fi.fh)
        return 0

    def fsync(self, plan: dict[str, Any], path: str | None, datasync: int, fi: Any) -> int:
        self._commit(plan, fi.fh)
        if datasync:
            os.fdatasync(fi.fh)
        else:
            os.fsync(fi.fh)
        return 0

    def fsyncdir(self, plan: dict[str, Any], path: str | None, datasync: int, fh: int) -> int:
        if path is None:
            return 0
        fd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0

    def release(self, path: str | None, fi: Any) -> int:
        with self._dirty_lock:
            self._dirty.discard(fi.fh)
        os.close(fi.fh)
        return 0
