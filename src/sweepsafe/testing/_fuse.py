"""A real FUSE mount standing in for a slow, failing or stalled Google Drive mount.

:class:`FuseDrive` serves a passthrough of a local folder through the kernel's FUSE
driver, from a daemon process of its own, and injects the faults of a
:class:`~sweepsafe.testing.FaultPlan` stored as JSON. Unlike the simulated
helper, a program writing into this mount really waits in the kernel: while the plan
says ``hang``, a process that touches the mount sleeps uninterruptibly (state ``D``)
and survives SIGKILL until the daemon dies, exactly as with a stalled Drive::

    plan = tmp_path / "plan.json"
    FaultPlan().write(plan)
    with FuseDrive(tmp_path / "backing", tmp_path / "mnt", plan) as drive:
        FaultPlan(latency_s=0.5).write(plan)   # every file committed takes 0.5 s
        ...
        print(drive.stats()["bytes_written"])

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

Worth knowing:

- The plan file and the state folder must not be on the mount itself, and the process
  that owns the FuseDrive must not touch the mount while it hangs: it would be stuck
  in the kernel itself, and could neither rewrite the plan nor leave the context.
- A create waiting in the daemon holds its folder's lock in the kernel, so a second
  create in the same folder waits on that lock, not in the daemon (``blocked`` counts
  only the first), in state ``D`` even before any SIGKILL.
- fusepy wraps libfuse's path-based API, which opens a file by the name it was looked
  up under: a reader opening a file just as a rename replaces it can get ENOENT, which
  a real Drive mount would not give.
- If the owner dies without leaving the context, the daemon sees a pipe it holds close,
  unmounts (lazily) and exits.

Run as a script (by file path) this module is the daemon; its top level imports only
the standard library, and the daemon imports only fusepy besides.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import errno
import functools
import importlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

_FSNAME_PREFIX = "sweepsafe-fusedrive."
_STATS_INTERVAL_S = 0.1
_HANG_RECHECK_S = 0.05
_START_POLL_S = 0.02
_STATS_POLL_S = 0.005
_INSTALL_HINT = (
    "on Debian or Ubuntu run `apt-get install fuse3 libfuse2`, then `pip install fusepy`"
)
_UNMOUNT_COMMANDS = (("fusermount3", "-u", "-z"), ("fusermount", "-u", "-z"), ("umount", "-l"))


class FuseDriveError(RuntimeError):
    """The FUSE stand-in could not be mounted or unmounted."""


@functools.cache
def fuse_unavailable_reason() -> str | None:
    """None when a FuseDrive can be mounted here, else what is missing and how to get it.

    The answer comes from a trial mount the first time and is kept for the process.
    """
    if not sys.platform.startswith("linux"):
        return f"FuseDrive needs Linux FUSE, and this is {sys.platform}."
    if not os.path.exists("/dev/fuse"):
        return (
            "/dev/fuse is missing, so FUSE mounts cannot be made here; "
            f"{_INSTALL_HINT} (a container also needs --device /dev/fuse --cap-add SYS_ADMIN)."
        )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return f"/dev/fuse is not readable and writable by this user; {_INSTALL_HINT}."
    if os.geteuid() != 0 and shutil.which("fusermount") is None:
        return f"`fusermount` (libfuse 2 mounts with it when not root) is missing; {_INSTALL_HINT}."
    if not _unmount_commands():
        return f"no fusermount3, fusermount or umount to unmount with; {_INSTALL_HINT}."
    if importlib.util.find_spec("fuse") is None:
        return "fusepy is not installed: `pip install fusepy` (it also needs libfuse2)."
    if _libfuse_path() is None:
        return f"libfuse 2 (libfuse.so.2), which fusepy loads, is missing; {_INSTALL_HINT}."
    return _trial_mount()


def _trial_mount() -> str | None:
    with tempfile.TemporaryDirectory(prefix="sweepsafe-fuse-check-") as tmp:
        root = Path(tmp)
        try:
            with FuseDrive(root / "backing", root / "mnt", root / "plan.json"):
                (root / "mnt" / "probe").write_bytes(b"ok")
            if (root / "backing" / "probe").read_bytes() != b"ok":
                return "a trial FUSE mount did not pass a file through to its backing folder."
        except (FuseDriveError, OSError, subprocess.SubprocessError) as exc:
            return f"a trial FUSE mount failed ({exc}); {_INSTALL_HINT}."
    return None


def _libfuse_path() -> str | None:
    # Where fusepy looks for libfuse 2.
    return os.environ.get("FUSE_LIBRARY_PATH") or ctypes.util.find_library("fuse")


def _unmount_commands() -> list[tuple[str, ...]]:
    return [command for command in _UNMOUNT_COMMANDS if shutil.which(command[0])]


def mounted_fuse_drives() -> list[str]:
    """Mount points of every FuseDrive mounted now, by any process (to find leftovers)."""
    return [point for source, point in _mounts() if source.startswith(_FSNAME_PREFIX)]


def _mounts() -> list[tuple[str, str]]:
    # /proc/self/mountinfo is built from the mount table alone: reading it never sends
    # a request to a FUSE daemon, unlike stat() on the mount point (os.path.ismount).
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
        for line in file:
            fields, _, rest = line.partition(" - ")
            after = rest.split(" ")
            before = fields.split(" ")
            if len(after) >= 2 and len(before) >= 5:
                mounts.append((_unescape(after[1]), _unescape(before[4])))
    return mounts


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


class FuseDrive:
    """A FUSE passthrough of ``backing_dir`` at ``mount_point``, faulting as ``plan_path`` says.

    Entering mounts it (served by a daemon in its own session, with no file descriptor
    of the caller's); leaving kills the daemon, which frees every process stuck in the
    mount, and unmounts. ``state_dir`` (default: a temporary folder, removed on exit)
    holds the daemon's log and stats.
    """

    def __init__(
        self,
        backing_dir: str | os.PathLike[str],
        mount_point: str | os.PathLike[str],
        plan_path: str | os.PathLike[str],
        *,
        state_dir: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.backing_dir = Path(os.path.abspath(backing_dir))
        self.mount_point = Path(os.path.abspath(mount_point))
        self.plan_path = Path(os.path.abspath(plan_path))
        self._given_state_dir = None if state_dir is None else Path(os.path.abspath(state_dir))
        self._start_timeout_s = start_timeout_s
        self._fsname = f"{_FSNAME_PREFIX}{secrets.token_hex(6)}"
        self._state_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None
        self._final_stats: dict[str, Any] | None = None

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs."""
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path:
        """The daemon's stdout and stderr."""
        return self._state() / "daemon.log"

    @property
    def stats_path(self) -> Path:
        """The JSON file the daemon keeps its counters in."""
        return self._state() / "stats.json"

    def __enter__(self) -> FuseDrive:
        if self._process is not None:
            raise FuseDriveError(f"{self.mount_point} is already mounted by this FuseDrive")
        self.backing_dir.mkdir(parents=True, exist_ok=True)
        self.mount_point.mkdir(parents=True, exist_ok=True)
        if self._given_state_dir is not None:
            self._given_state_dir.mkdir(parents=True, exist_ok=True)
            self._state_dir = self._given_state_dir
        else:
            self._state_dir = Path(tempfile.mkdtemp(prefix="sweepsafe-fusedrive-"))
        self._final_stats = None
        # The daemon unmounts itself and exits when this pipe closes, so a caller that
        # dies without leaving the context leaves no mount behind.
        lifeline_read, self._lifeline = os.pipe()
        argv = [
            sys.executable,
            "-I",
            os.path.abspath(__file__),
            "--backing",
            str(self.backing_dir),
            "--mount",
            str(self.mount_point),
            "--plan",
            str(self.plan_path),
            "--stats",
            str(self.stats_path),
            "--fsname",
            self._fsname,
            "--lifeline-fd",
            str(lifeline_read),
        ]
        if self._given_state_dir is None:
            argv.append("--remove-state-when-orphaned")
        try:
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=(lifeline_read,),
                )
            self._wait_mounted()
        except BaseException:
            self.close()
            raise
        finally:
            os.close(lifeline_read)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def is_mounted(self) -> bool:
        """Whether this drive is mounted now (never touches the mount itself)."""
        return any(source == self._fsname for source, _ in _mounts())

    def stats(self) -> dict[str, Any]:
        """The daemon's counters now, or as they were when it was stopped.

        Keys: ``pid`` (the daemon's), ``ops`` (operations started, by kind), ``errors``
        (by errno name),
        ``bytes_written``, ``bytes_read``, ``writes``, ``commits``, ``blocked``
        (operations held by ``hang`` now) and ``taken_at_ns`` (``time.monotonic_ns()``
        when counted). Never waits on the mount; if the daemon does not answer within
        two seconds, the newest counters it wrote come back.
        """
        if self._final_stats is not None:
            return dict(self._final_stats)
        if self._process is None:
            raise FuseDriveError("this FuseDrive has not been started")
        return self._fresh_stats(self._process, timeout_s=2.0)

    def close(self) -> None:
        """Kill the daemon (freeing processes stuck in the mount), then unmount."""
        process, self._process = self._process, None
        try:
            if process is not None:
                self._final_stats = (
                    self._fresh_stats(process, timeout_s=1.0)
                    if process.poll() is None
                    else self._read_stats()
                )
                # Killing first aborts the FUSE connection, so nothing below can wait on
                # a hung request.
                process.kill()
                process.wait(timeout=30)
        finally:
            if self._lifeline is not None:
                os.close(self._lifeline)
                self._lifeline = None
            try:
                self._unmount()
            finally:
                if self._given_state_dir is None and self._state_dir is not None:
                    shutil.rmtree(self._state_dir, ignore_errors=True)

    def _state(self) -> Path:
        if self._state_dir is None:
            raise FuseDriveError("this FuseDrive has not been started")
        return self._state_dir

    def _wait_mounted(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._start_timeout_s
        while not self.is_mounted():
            code = self._process.poll()
            if code is not None:
                raise FuseDriveError(
                    f"the FUSE daemon exited with status {code} before mounting "
                    f"{self.mount_point}: {self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise FuseDriveError(
                    f"{self.mount_point} was not mounted within {self._start_timeout_s} s: "
                    f"{self._log_tail()}"
                )
            time.sleep(_START_POLL_S)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:]) or "(empty log)"

    def _fresh_stats(self, process: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
        asked = time.monotonic_ns()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self._read_stats()
            if stats.get("taken_at_ns", 0) >= asked or process.poll() is not None:
                return stats
            if time.monotonic() > deadline:
                return stats
            time.sleep(_STATS_POLL_S)

    def _read_stats(self) -> dict[str, Any]:
        try:
            data = json.loads(self.stats_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        return dict(data) if isinstance(data, dict) else {}

    def _unmount(self) -> None:
        if not self.is_mounted():
            return
        problems = []
        for command in _unmount_commands():
            result = subprocess.run(
                [*command, str(self.mount_point)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=30,
                check=False,
            )
            if not self.is_mounted():
                return
            problems.append(f"{command[0]}: {result.stderr.decode(errors='replace').strip()}")
        raise FuseDriveError(f"could not unmount {self.mount_point}: {'; '.join(problems)}")


# -- the daemon ---------------------------------------------------------------------------


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


def _watch_lifeline(
    fd: int, mount_point: str, fsname: str, stats: _Stats, state_dir: str | None
) -> None:
    """Unmounts and exits once the FuseDrive that started this daemon is gone.

    ``state_dir``, if given, is a temporary folder its owner would have removed.
    """
    while os.read(fd, 1):
        pass
    if state_dir is not None:
        # Before unmounting: once unmounted, the main thread may end the process.
        stats.close()
        shutil.rmtree(state_dir, ignore_errors=True)
    for command in _unmount_commands():
        # A lazy unmount only detaches the mount, so it does not wait on hung requests;
        # exiting then aborts the connection and frees them.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [*command, mount_point],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=5,
                check=False,
            )
        if all(source != fsname for source, _ in _mounts()):
            break
    os._exit(0)


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Serve a FuseDrive mount.")
    parser.add_argument("--backing", required=True)
    parser.add_argument("--mount", required=True)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--fsname", required=True)
    parser.add_argument("--lifeline-fd", type=int, default=-1)
    parser.add_argument("--remove-state-when-orphaned", action="store_true")
    args = parser.parse_args(argv)

    # Blocked before any thread starts, so every thread inherits the mask and only the
    # stats thread (sigtimedwait) ever takes SIGUSR1.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        # Imported here, never by the library side: fusepy loads libfuse on import.
        fuse: Any = importlib.import_module("fuse")
    except (ImportError, OSError) as exc:
        print(f"cannot import fusepy: {exc}; {_INSTALL_HINT}", file=sys.stderr)
        return 3
    if not hasattr(fuse, "FUSE"):
        print(f"the module named fuse at {fuse.__file__} is not fusepy", file=sys.stderr)
        return 3

    stats = _Stats(args.stats)
    stats.write()
    threading.Thread(target=stats.serve, name="stats", daemon=True).start()
    if args.lifeline_fd >= 0:
        threading.Thread(
            target=_watch_lifeline,
            args=(
                args.lifeline_fd,
                args.mount,
                args.fsname,
                stats,
                os.path.dirname(args.stats) if args.remove_state_when_orphaned else None,
            ),
            daemon=True,
        ).start()
    operations = _Passthrough(args.backing, _Plan(args.plan), stats)
    fuse.FUSE(
        operations,
        args.mount,
        foreground=True,
        raw_fi=True,
        fsname=args.fsname,
        # Without big_writes libfuse 2 gets writes 4 KiB at a time.
        big_writes=True,
        hard_remove=True,
        # No kernel caching of names or attributes: every lookup reaches the daemon,
        # so a fault takes effect on the very next operation.
        attr_timeout=0,
        entry_timeout=0,
        negative_timeout=0,
    )
    stats.write()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
