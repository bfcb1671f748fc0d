"""The FUSE stand-in for Drive behaves like a real mount, stalls included."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sweepsafe.testing import FaultPlan
from sweepsafe.testing import _fuse_drive as fuse_module
from sweepsafe.testing._fuse_drive import FuseDrive, fuse_unavailable_reason, mounted_fuse_drives

# Mounts a FuseDrive, prints its daemon's pid and its temporary state folder, and dies
# without unmounting. Loads the module by file path, as a script that does not import
# sweepsafe could.
ABANDONING_OWNER = f"""
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("fuse_drive", {fuse_module.__file__!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
drive = module.FuseDrive(*sys.argv[1:4]).__enter__()
print(drive.pid, drive.stats_path.parent, flush=True)
os._exit(0)
"""

# A process that writes one file into the mount; it blocks there while the plan hangs.
WRITER = "import sys; open(sys.argv[1], 'wb').write(b'x' * 4096)"

# Starts a writer as a sweepsafe helper would be started, prints its pid and exits:
# "isolated" in a session of its own with no inherited descriptors, "inherited" with
# this process's stderr.
PARENT = f"""
import subprocess, sys
writer = [sys.executable, "-I", "-c", {WRITER!r}, sys.argv[2]]
if sys.argv[1] == "isolated":
    child = subprocess.Popen(
        writer, start_new_session=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
else:
    child = subprocess.Popen(writer, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
print(child.pid)
"""


def drive_context(tmp_path: Path) -> FuseDrive:
    """A FuseDrive over ``tmp_path/backing`` at ``tmp_path/mnt``, not yet mounted, no faults."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    plan = tmp_path / "plan.json"
    FaultPlan().write(plan)
    return FuseDrive(tmp_path / "backing", tmp_path / "mnt", plan)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[FuseDrive]:
    """A mounted FuseDrive; afterwards, neither its mount nor its daemon is left."""
    fuse_drive = drive_context(tmp_path)
    with fuse_drive:
        daemon = fuse_drive.pid
        yield fuse_drive
    assert not fuse_drive.is_mounted()
    assert daemon is not None
    assert process_state(daemon) == "gone"


def set_faults(mounted: FuseDrive, plan: FaultPlan) -> None:
    plan.write(mounted.plan_path)


def write_atomically(path: Path, data: bytes) -> None:
    """Temporary, write, fsync, close, rename: how sweepsafe commits a file on Drive."""
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)


def process_state(pid: int) -> str:
    """The state letter in /proc/<pid>/stat (``D``: uninterruptible), or ``gone``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return stat.rpartition(")")[2].split()[0]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {timeout_s} s")
        time.sleep(0.01)


def start_writer(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", "-c", WRITER, str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def at_eof(pipe: int, timeout_s: float) -> bool:
    """Whether the pipe is closed by every writer (read gives b"") within the timeout."""
    readable, _, _ = select.select([pipe], [], [], timeout_s)
    return bool(readable) and os.read(pipe, 4096) == b""


def test_files_pass_through_to_the_backing_folder(mounted: FuseDrive) -> None:
    mount, backing = mounted.mount_point, mounted.backing_dir
    (mount / "trials" / "trial-1").mkdir(parents=True)
    write_atomically(mount / "trials" / "trial-1" / "model.bin", b"weights" * 1000)
    write_atomically(mount / "study.db", b"SQLite format 3\x00")

    assert (backing / "trials" / "trial-1" / "model.bin").read_bytes() == b"weights" * 1000
    assert (mount / "study.db").read_bytes() == b"SQLite format 3\x00"
    assert sorted(os.listdir(mount)) == sorted(os.listdir(backing)) == ["study.db", "trials"]
    assert os.listdir(mount / "trials" / "trial-1") == ["model.bin"]
    folder = os.open(mount / "trials", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)

    with open(mount / "study.db-journal", "w+b") as journal:  # unlinked while open
        os.unlink(mount / "study.db-journal")
        journal.write(b"rollback")
        journal.seek(0)
        assert journal.read() == b"rollback"
    assert sorted(os.listdir(backing)) == ["study.db", "trials"]

    os.unlink(mount / "trials" / "trial-1" / "model.bin")
    (mount / "trials" / "trial-1").rmdir()
    assert os.listdir(backing / "trials") == []


def test_rename_replaces_a_file_atomically(mounted: FuseDrive) -> None:
    target = mounted.mount_point / "study.db"
    write_atomically(target, bytes([0]) * 65536)
    seen: list[bytes] = []
    problems: list[str] = []
    done = threading.Event()

    def read_while_replaced() -> None:
        while not done.is_set():
            if "study.db" not in os.listdir(mounted.mount_point):
                problems.append("study.db missing from the listing")
                return
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                # An artifact of libfuse's path-based API, which fusepy wraps: it opens
                # the looked-up file by name, and a rename landing in between has given
                # that name to the new file, leaving the looked-up one nameless.
                continue
            if len(data) != 65536 or len(set(data)) != 1:
                problems.append(f"a torn copy: {len(data)} bytes, {len(set(data))} values")
                return
            seen.append(data[:1])

    reader = threading.Thread(target=read_while_replaced)
    reader.start()
    try:
        for version in range(1, 31):
            write_atomically(target, bytes([version]) * 65536)
    finally:
        done.set()
        reader.join()

    assert problems == []
    assert seen
    assert target.read_bytes() == bytes([30]) * 65536
    assert os.listdir(mounted.backing_dir) == ["study.db"]


def test_latency_s_is_charged_once_per_file_committed(mounted: FuseDrive) -> None:
    set_faults(mounted, FaultPlan(latency_s=0.3))
    started = time.monotonic()
    write_atomically(mounted.mount_point / "study.db", b"x" * 10000)
    assert time.monotonic() - started >= 0.3
    assert mounted.stats()["commits"] == 1  # the fsync, not the close or the rename too

    set_faults(mounted, FaultPlan())
    with open(mounted.mount_point / "notes.txt", "wb") as file:  # no fsync: charged on close
        file.write(b"notes")
    assert mounted.stats()["commits"] == 2


def test_enospc_fails_writes_and_reports_no_free_space(mounted: FuseDrive) -> None:
    set_faults(mounted, FaultPlan(enospc=True))
    fd = os.open(mounted.mount_point / "study.db", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)) as raised:
            os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
    assert raised.value.errno == errno.ENOSPC
    assert os.statvfs(mounted.mount_point).f_bavail == 0


def test_disconnected_fails_every_operation_until_it_reconnects(mounted: FuseDrive) -> None:
    set_faults(mounted, FaultPlan(disconnected=True))
    not_connected = os.strerror(errno.ENOTCONN)
    with pytest.raises(OSError, match=not_connected) as raised:
        (mounted.mount_point / "study.db").write_bytes(b"x")
    assert raised.value.errno == errno.ENOTCONN
    with pytest.raises(OSError, match=not_connected) as raised:
        os.listdir(mounted.mount_point)
    assert raised.value.errno == errno.ENOTCONN

    set_faults(mounted, FaultPlan())
    (mounted.mount_point / "study.db").write_bytes(b"x")
    assert os.listdir(mounted.mount_point) == ["study.db"]


def test_fail_every_kth_write_fails_that_write_with_eio(mounted: FuseDrive) -> None:
    set_faults(mounted, FaultPlan(fail_every_kth_write=3))
    fd = os.open(mounted.mount_point / "study.db", os.O_WRONLY | os.O_CREAT, 0o644)
    outcomes = []
    try:
        for _ in range(6):
            try:
                os.write(fd, b"x" * 4096)
                outcomes.append("ok")
            except OSError as exc:
                outcomes.append(errno.errorcode[exc.errno or 0])
    finally:
        os.close(fd)
    assert outcomes == ["ok", "ok", "EIO", "ok", "ok", "EIO"]


def test_stats_count_bytes_written(mounted: FuseDrive) -> None:
    before = mounted.stats()
    fd = os.open(mounted.mount_point / "study.db", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (100_000, 28_000, 5):
            assert os.write(fd, b"x" * size) == size
    finally:
        os.close(fd)
    after = mounted.stats()
    assert after["bytes_written"] - before["bytes_written"] == 128_005
    # The kernel may split one write(): here the write starting mid-page.
    assert after["writes"] - before["writes"] >= 3
    assert after["ops"]["create"] == before["ops"].get("create", 0) + 1
    assert after["blocked"] == 0


def test_hung_writer_resumes_when_the_hang_clears(mounted: FuseDrive) -> None:
    set_faults(mounted, FaultPlan(hang=True))
    writer = start_writer(mounted.mount_point / "study.db")
    try:
        wait_until(lambda: mounted.stats()["blocked"] >= 1, "blocked in the daemon")
        assert writer.poll() is None
        set_faults(mounted, FaultPlan())
        assert writer.wait(timeout=10) == 0
    finally:
        writer.kill()
        writer.wait()
    assert (mounted.backing_dir / "study.db").read_bytes() == b"x" * 4096


def test_hung_writer_survives_sigkill_in_state_d_until_the_drive_goes(tmp_path: Path) -> None:
    with drive_context(tmp_path) as fuse_drive:
        set_faults(fuse_drive, FaultPlan(hang=True))
        writer = start_writer(fuse_drive.mount_point / "study.db")
        try:
            wait_until(lambda: fuse_drive.stats()["blocked"] >= 1, "blocked in the daemon")
            writer.kill()
            wait_until(lambda: process_state(writer.pid) == "D", "in state D after SIGKILL")
            assert writer.poll() is None
        finally:
            fuse_drive.close()  # kills the daemon: the kernel fails the request, and
            # the writer can finally die of its SIGKILL
        assert writer.wait(timeout=10) == -signal.SIGKILL


def test_only_an_isolated_abandoned_writer_lets_its_parents_pipe_close(tmp_path: Path) -> None:
    with drive_context(tmp_path) as fuse_drive, contextlib.ExitStack() as stack:
        modes = ("inherited", "isolated")
        for mode in modes:
            # A folder each: a create waiting in the daemon holds its folder's lock, so a
            # second create in that folder would wait in the kernel, not in the daemon.
            (fuse_drive.mount_point / mode).mkdir()
        set_faults(fuse_drive, FaultPlan(hang=True))
        pipes, writers = {}, []
        for mode in modes:
            target = fuse_drive.mount_point / mode / "study.db"
            parent = stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-I", "-c", PARENT, mode, str(target)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
            assert parent.stdout is not None
            assert parent.stderr is not None
            writers.append(int(parent.stdout.read()))
            assert parent.wait(timeout=10) == 0
            pipes[mode] = parent.stderr.fileno()
        wait_until(lambda: fuse_drive.stats()["blocked"] >= 2, "both writers blocked")
        for pid in writers:
            os.kill(pid, signal.SIGKILL)
        for pid in writers:
            wait_until(lambda pid=pid: process_state(pid) == "D", "in state D")

        # Both parents have exited; the inherited writer, unkillable, still holds stderr.
        assert at_eof(pipes["isolated"], timeout_s=10)
        assert not at_eof(pipes["inherited"], timeout_s=0)
        fuse_drive.close()
        assert at_eof(pipes["inherited"], timeout_s=10)


def test_a_dead_owner_leaves_no_mount_behind(tmp_path: Path) -> None:
    unmounted = drive_context(tmp_path)
    owner = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            ABANDONING_OWNER,
            *map(str, (unmounted.backing_dir, unmounted.mount_point, unmounted.plan_path)),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=True,
    )
    daemon, state = owner.stdout.decode().split()
    wait_until(lambda: str(unmounted.mount_point) not in mounted_fuse_drives(), "unmounted")
    wait_until(lambda: not Path(state).exists(), "state folder removed")
    # The daemon was the dead owner's child: init reaps it, in its own time.
    wait_until(lambda: process_state(int(daemon)) in ("Z", "gone"), "daemon exited")
