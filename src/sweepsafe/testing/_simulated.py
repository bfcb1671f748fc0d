"""A slow, failing or stalled Google Drive, for tests, demos and fault campaigns.

A stand-in helper serves the real helper protocol over a real local folder and
injects the faults of a :class:`FaultPlan`, which it re-reads from a JSON file before
every operation, so faults can change while a sweep runs::

    plan_file = tmp_path / "plan.json"
    FaultPlan(latency_s=0.1).write(plan_file)
    store = simulated_store(tmp_path / "local", tmp_path / "drive", plan_file)
    FaultPlan(disconnected=True).write(plan_file)   # Drive drops out
    FaultPlan().write(plan_file)                    # ... and comes back

Run as a script (by file path, like the real helper) this module serves requests;
its top level imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sweepsafe.drive import DriveStore


@dataclass(frozen=True)
class FaultPlan:
    """The faults a simulated Drive injects."""

    latency_s: float = 0.0
    """Delay per file committed, so one file copy takes about this long."""
    latency_per_mib_s: float = 0.0
    """Further delay per MiB written."""
    fail_every_kth_write: int = 0
    """Fail every k-th chunk write with EIO (0: never)."""
    enospc: bool = False
    """Every write fails with ENOSPC (Drive full)."""
    disconnected: bool = False
    """Every operation fails with ENOTCONN ("Transport endpoint is not connected")."""
    fail_paths: tuple[tuple[str, str], ...] = ()
    """``(pattern, errno name)`` pairs: committing a Drive file whose path matches the
    ``fnmatch`` pattern fails with that error (``"EIO"``, ``"ENAMETOOLONG"``...)."""
    fail_read_paths: tuple[tuple[str, str], ...] = ()
    """``(pattern, errno name)`` pairs: reading a Drive file whose path matches fails
    with that error, as a Drive file that cannot be downloaded does (``"EIO"``)."""
    fail_remove_paths: tuple[tuple[str, str], ...] = ()
    """``(pattern, errno name)`` pairs: removing a Drive file whose path matches fails
    with that error, as a file Drive will not let this account delete does (``"EACCES"``)."""
    hang: bool = False
    """Every operation blocks forever, like a stalled FUSE mount."""
    pause_fifo: str = ""
    """A named pipe; before committing each file the helper reads one byte from it.

    Opening the pipe for writing returns once a copy is in flight (the helper has
    opened it), so a test can act at that moment and then let the copy finish.
    """

    def write(self, path: str | os.PathLike[str]) -> None:
        """Store the plan atomically where simulated helpers read it."""
        target = Path(path)
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(dataclasses.asdict(self), file)
        os.replace(temp, target)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> FaultPlan:
        """The plan stored at ``path``; no faults if the file is missing."""
        try:
            data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {key: value for key, value in data.items() if key in names}
        for pairs in ("fail_paths", "fail_read_paths", "fail_remove_paths"):
            if pairs in fields:
                fields[pairs] = tuple(tuple(pair) for pair in fields[pairs])
        return cls(**fields)


def helper_argv(plan_path: str | os.PathLike[str]) -> list[str]:
    """The command that starts a simulated helper obeying the plan at ``plan_path``."""
    return [sys.executable, "-I", os.path.abspath(__file__), os.path.abspath(plan_path)]


def simulated_store(
    local_root: str | os.PathLike[str],
    drive_root: str | os.PathLike[str],
    plan: FaultPlan | str | os.PathLike[str],
    **store_kwargs: Any,
) -> DriveStore:
    """A real DriveStore whose Drive side is a simulated Drive folder at ``drive_root``.

    ``plan`` is a plan file (rewrite it to change faults later) or a FaultPlan, which is
    then written beside ``drive_root`` as ``.{name}.fault-plan.json``.
    """
    from sweepsafe.drive import DriveStore

    if isinstance(plan, FaultPlan):
        drive = Path(os.path.abspath(drive_root))
        drive.parent.mkdir(parents=True, exist_ok=True)
        plan_path = drive.parent / f".{drive.name}.fault-plan.json"
        plan.write(plan_path)
    else:
        plan_path = Path(plan)
    return DriveStore(local_root, drive_root, helper_command=helper_argv(plan_path), **store_kwargs)


def _serve(plan_path: str) -> int:
    # Loaded by file path: this process must not import the sweepsafe package.
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    helper_file = os.path.join(package, "drive", "_helper_process.py")
    spec = importlib.util.spec_from_file_location("_helper_process", helper_file)
    assert spec is not None
    assert spec.loader is not None
    drive_helper: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drive_helper)

    class PlannedFaults:
        """Faults from the plan file, re-read before every operation."""

        def __init__(self) -> None:
            self._writes = 0

        def _plan(self) -> FaultPlan:
            plan = FaultPlan.read(plan_path)
            if plan.hang:
                threading.Event().wait()  # blocks forever, as a stalled mount does
            if plan.disconnected:
                raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
            return plan

        def before(self, op: str, path: str) -> None:
            plan = self._plan()
            if op == "read":
                _fail_if_listed(plan.fail_read_paths, path)
            elif op == "remove":
                _fail_if_listed(plan.fail_remove_paths, path)

        def on_write(self, path: str, nbytes: int) -> None:
            plan = self._plan()
            self._writes += 1
            if plan.enospc:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            if plan.fail_every_kth_write and self._writes % plan.fail_every_kth_write == 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO), path)
            if plan.latency_per_mib_s:
                time.sleep(plan.latency_per_mib_s * nbytes / (1 << 20))

        def on_commit(self, path: str) -> None:
            plan = self._plan()
            _fail_if_listed(plan.fail_paths, path)
            if plan.latency_s:
                time.sleep(plan.latency_s)
            if plan.pause_fifo:
                with open(plan.pause_fifo, "rb") as gate:
                    gate.read(1)

    result: int = drive_helper.serve(PlannedFaults())
    return result


def _fail_if_listed(failing: tuple[tuple[str, str], ...], path: str) -> None:
    for pattern, name in failing:
        if fnmatch.fnmatch(path, pattern):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code), path)


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1]))
