"""The Drive copy of a study as a replica: its identity and its one owner (a lease).

Each study folder on Drive holds ``.sweepsafe/identity.json`` (who it is: a random id
made when it was first backed up) and ``.sweepsafe/lease.json`` (which runtime may write
it, and when that runtime last said it was alive). Both are small JSON files written
atomically like every other Drive file. See ``docs/drive-layout.md``.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweepsafe.drive._reserved_names import STATE_DIR_NAME
from sweepsafe.drive._runtime_temps import process_tag
from sweepsafe.errors import LeaseHeldError

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper

__all__ = [
    "IDENTITY_NAME",
    "LEASE_NAME",
    "Lease",
    "Runtime",
    "acquire_lease",
    "check_lease",
    "read_identity",
    "read_lease",
    "release_lease",
    "this_runtime",
    "write_identity",
]

IDENTITY_NAME = "identity.json"
LEASE_NAME = "lease.json"
_FORMAT = 1
_STARTED = time.time()


@dataclass(frozen=True)
class Runtime:
    """A process that writes to Drive: where it runs and since when."""

    id: str
    host: str
    pid: int
    boot_id: str
    started: float

    def describe(self, clock: Callable[[], float] = time.time) -> str:
        """``host myhost, process 1234, started 3 min ago``."""
        return f"host {self.host}, process {self.pid}, started {_ago(clock() - self.started)}"

    def is_same_process(self, other: Runtime) -> bool:
        """Both describe one process (another store of it, or this one)."""
        return (self.host, self.boot_id, self.pid) == (other.host, other.boot_id, other.pid)

    def is_dead_here(self) -> bool:
        """It ran on this machine since its last boot, and its process is gone."""
        me = this_runtime()
        if (self.host, self.boot_id) != (me.host, me.boot_id) or not self.boot_id:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _process_started_after(self.pid, self.started)


def _process_started_after(pid: int, started: float) -> bool:
    """The pid was reused by a process started after ``started``: the owner is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])
        with open("/proc/stat", encoding="ascii") as file:
            boot = next(int(line.split()[1]) for line in file if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return boot + ticks / os.sysconf("SC_CLK_TCK") > started + 1.0


def this_runtime() -> Runtime:
    """This process as a Drive writer."""
    return Runtime(
        id=process_tag(),
        host=socket.gethostname(),
        pid=os.getpid(),
        boot_id=_boot_id(),
        started=_STARTED,
    )


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            return file.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Lease:
    """Who may write a study folder on Drive, and when it last renewed that right."""

    owner: Runtime
    acquired: float
    heartbeat: float
    released: bool = False

    def is_live(self, clock: Callable[[], float], timeout: float) -> bool:
        """Held, renewed within ``timeout`` seconds, and not by a process known dead."""
        if self.released or clock() - self.heartbeat > timeout:
            return False
        return not self.owner.is_dead_here()

    def to_json(self) -> bytes:
        """The lease file's content."""
        data = {"format": _FORMAT, **asdict(self)}
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Lease | None:
        """A lease read from Drive; None if unreadable (then it protects nothing)."""
        try:
            data: dict[str, Any] = json.loads(raw)
            owner = Runtime(**{k: data["owner"][k] for k in Runtime.__dataclass_fields__})
            return cls(
                owner=owner,
                acquired=float(data["acquired"]),
                heartbeat=float(data["heartbeat"]),
                released=bool(data.get("released", False)),
            )
        except (ValueError, KeyError, TypeError):
            return None


def state_dir(unit_drive: Path) -> Path:
    """The ``.sweepsafe`` folder of a study folder on Drive."""
    return unit_drive / STATE_DIR_NAME


async def read_identity(helper: DriveHelper, unit_drive: Path, timeout: float) -> str | None:
    """The study folder's id on Drive; None when it has none (new, or deleted)."""
    raw = await helper.read(state_dir(unit_drive) / IDENTITY_NAME, timeout, limit=64 << 10)
    if raw is None:
        return None
    try:
        value = json.loads(raw)["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(value) if value else None


async def write_identity(
    helper: DriveHelper, unit_drive: Path, timeout: float, clock: Callable[[], float]
) -> str:
    """Give the study folder on Drive a new id; return the id that landed."""
    identity = secrets.token_hex(16)
    body = {"format": _FORMAT, "id": identity, "created": clock(), "by": asdict(this_runtime())}
    await helper.put_bytes(
        state_dir(unit_drive) / IDENTITY_NAME, json.dumps(body, indent=1).encode(), timeout
    )
    # Two first backups may race; both adopt whichever id landed.
    landed = await read_identity(helper, unit_drive, timeout)
    return landed or identity


async def read_lease(helper: DriveHelper, unit_drive: Path, timeout: float) -> Lease | None:
    """The lease on Drive, or None when there is none (or it cannot be read)."""
    raw = await helper.read(state_dir(unit_drive) / LEASE_NAME, timeout, limit=64 << 10)
    return None if raw is None else Lease.from_json(raw)


async def _read_lease_to_replace(
    helper: DriveHelper, unit_drive: Path, timeout: float, conditional: bool
) -> tuple[Lease | None, str | None]:
    """The lease, and with ``conditional`` the version a write replacing it must match."""
    if not conditional:
        return await read_lease(helper, unit_drive, timeout), None
    path = state_dir(unit_drive) / LEASE_NAME
    raw, version = await helper.read_versioned(path, timeout, limit=64 << 10)
    return (None if raw is None else Lease.from_json(raw)), version


async def acquire_lease(
    helper: DriveHelper,
    unit_drive: Path,
    *,
    timeout: float,
    lease_timeout: float,
    takeover: bool,
    clock: Callable[[], float],
    conditional: bool = False,
) -> Lease:
    """Make this runtime the owner of the study folder on Drive, or refuse.

    A lease held by this process, released, expired, or owned by a process known to
    have died on this machine is taken; a live one of another runtime only with
    ``takeover``. Also renews a lease this runtime holds. With ``conditional`` (an
    object store that has conditional writes) the lease is written only if it is still
    the one read, so of two runtimes taking it at once exactly one succeeds, and a
    renewal never overwrites a takeover that came between its read and its write.

    Raises:
        LeaseHeldError: another runtime holds a live lease (and not ``takeover``), or
            wrote one between this runtime's read and its write.
    """
    me = this_runtime()
    path = state_dir(unit_drive) / LEASE_NAME
    current, version = await _read_lease_to_replace(helper, unit_drive, timeout, conditional)
    if not takeover:
        _refuse_if_held(unit_drive, current, clock, lease_timeout)
    now = clock()
    mine = current is not None and current.owner.is_same_process(me) and not current.released
    lease = Lease(owner=me, acquired=current.acquired if mine and current else now, heartbeat=now)
    if conditional and not await helper.put_bytes_if(path, lease.to_json(), version, timeout):
        landed = await read_lease(helper, unit_drive, timeout)
        if landed is not None and landed.owner.is_same_process(me) and not landed.released:
            # This process holds it: the write landed but its answer was lost (the
            # client's retry refused, the lease no longer the one read), or another of
            # its tasks (a renewal, a restore's take) wrote it in between.
            return landed
        if landed is None:
            raise LeaseHeldError(
                f"the lease on {unit_drive} changed while this runtime took it; run again"
            )
        raise LeaseHeldError(_held_message(unit_drive, landed, clock, lease_timeout))
    if not conditional:
        await helper.put_bytes(path, lease.to_json(), timeout)
    landed = await read_lease(helper, unit_drive, timeout)
    if landed is not None and not landed.owner.is_same_process(me):
        # Another runtime wrote its lease at the same moment and landed last.
        raise LeaseHeldError(_held_message(unit_drive, landed, clock, lease_timeout))
    return lease


async def check_lease(
    helper: DriveHelper,
    unit_drive: Path,
    *,
    timeout: float,
    lease_timeout: float,
    clock: Callable[[], float],
) -> None:
    """Refuse, writing nothing, if another runtime holds a live lease on the study folder.

    A sweep checks this before it starts and leaves writing its own lease to its first
    backup, so that it never waits for a Drive write; :func:`acquire_lease` then decides
    between two runtimes that both found the lease free.

    Raises:
        LeaseHeldError: another runtime holds a live lease.
    """
    _refuse_if_held(unit_drive, await read_lease(helper, unit_drive, timeout), clock, lease_timeout)


def _refuse_if_held(
    unit_drive: Path,
    current: Lease | None,
    clock: Callable[[], float],
    lease_timeout: float,
) -> None:
    """Raise :class:`LeaseHeldError` if ``current`` is another runtime's live lease."""
    if (
        current is not None
        and not current.owner.is_same_process(this_runtime())
        and current.is_live(clock, lease_timeout)
    ):
        raise LeaseHeldError(_held_message(unit_drive, current, clock, lease_timeout))


async def release_lease(
    helper: DriveHelper,
    unit_drive: Path,
    timeout: float,
    clock: Callable[[], float],
    *,
    conditional: bool = False,
) -> None:
    """Mark this runtime's lease released, so the next runtime starts at once. With
    ``conditional``, a lease another runtime wrote since it was read is left alone."""
    path = state_dir(unit_drive) / LEASE_NAME
    current, version = await _read_lease_to_replace(helper, unit_drive, timeout, conditional)
    if current is None or not current.owner.is_same_process(this_runtime()) or current.released:
        return
    released = Lease(current.owner, current.acquired, clock(), released=True)
    if conditional:
        await helper.put_bytes_if(path, released.to_json(), version, timeout)
    else:
        await helper.put_bytes(path, released.to_json(), timeout)


def _held_message(
    unit_drive: Path, lease: Lease, clock: Callable[[], float], lease_timeout: float
) -> str:
    since = clock() - lease.heartbeat
    expires = max(0.0, lease_timeout - since)
    return (
        f"{unit_drive} is being backed up by another runtime ({lease.owner.describe(clock)}; "
        f"it took the study {_ago(clock() - lease.acquired)}, last heartbeat {_ago(since)}). "
        f"Stop that runtime, or wait {expires:.0f} s for its lease to expire, or, if that "
        "runtime is gone, take over with takeover=True (on the command line: --takeover, "
        "with sweepsafe run, backup or restore)."
    )


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"
