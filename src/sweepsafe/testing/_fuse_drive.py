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

This module owns the mount: it starts the daemon (``_fuse_daemon.py``, run by file
path), waits for the mount, asks for the daemon's counters, kills it and unmounts, and
reads the mount table. How the daemon acts on each field of the plan, and what it
counts, is told in ``_fuse_ops``.

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

This module imports only the standard library, so a script can load it by file path
without importing sweepsafe; the daemon loads it that way too, for the mount table.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
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
import time
from pathlib import Path
from types import TracebackType
from typing import Any

_FSNAME_PREFIX = "sweepsafe-fusedrive."
_START_POLL_S = 0.02
_STATS_POLL_S = 0.005
_INSTALL_HINT = (
    "on Debian or Ubuntu run `apt-get install fuse3 libfuse2`, then `pip install fusepy`"
)
_UNMOUNT_COMMANDS = (("fusermount3", "-u", "-z"), ("fusermount", "-u", "-z"), ("umount", "-l"))
_DAEMON_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fuse_daemon.py")


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
            _DAEMON_SCRIPT,
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
