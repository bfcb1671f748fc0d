"""Folder backups copy several files at once, and keep every guarantee while doing so."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import pytest

from drive_support import simulated_drive, temp_files, write_bytes
from sweep_support import wait_for
from sweepsafe.drive import DriveStore
from sweepsafe.testing import FaultPlan


def make_files(folder: Path, count: int, content: bytes = b"v1") -> dict[str, bytes]:
    files = {}
    for index in range(count):
        rel = f"trial-{index % 3}/file-{index:03d}.txt"
        data = content + f" {index}\n".encode()
        write_bytes(folder / rel, data)
        files[rel] = data
    return files


def on_drive(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*.txt")
        if path.is_file()
    }


def processes_holding(path: Path) -> int:
    """How many other processes have ``path`` open (read from /proc)."""
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        if pid == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                holders.add(pid)
        except OSError:
            continue  # exited meanwhile, or another user's
    return len(holders)


def test_backup_has_file_concurrency_copies_in_flight_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pause"
    os.mkfifo(fifo)
    with simulated_drive(tmp_path, file_concurrency=4) as setup:
        folder = setup.local / "trials"
        folder.mkdir()
        # The first backup writes the Drive root's id file, which the gate would hold.
        assert setup.store.backup(folder, is_directory=True).ok
        files = make_files(folder, 10)
        setup.set_faults(FaultPlan(pause_fifo=str(fifo)))
        outcome: list[object] = []
        backup = threading.Thread(
            target=lambda: outcome.append(setup.store.backup(folder, is_directory=True))
        )
        backup.start()
        with open(fifo, "wb"):
            # Each copy waits on the gate just before its commit. Sequential copies
            # would never have more than one helper there.
            wait_for(lambda: processes_holding(fifo) == 4, what="4 copies at their commit")
            assert len(temp_files(setup.drive)) == 4
            assert on_drive(setup.drive / "trials") == {}
            setup.set_faults(FaultPlan())
        backup.join(timeout=60)  # closing the gate lets the held copies finish

        assert not backup.is_alive()
        result = outcome[0]
        assert result, getattr(result, "error", None)
        assert on_drive(setup.drive / "trials") == files
        assert temp_files(setup.drive) == []
        assert setup.store.backup(folder, is_directory=True).files_copied == 0


def test_one_failed_file_fails_the_backup_naming_it_and_the_others_stay_recorded(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path, file_concurrency=4) as setup:
        folder = setup.local / "trials"
        files = make_files(folder, 30)
        blocked = sorted(files)[-1]
        # Drive fails on that one file only, as a flaky upload of one file does.
        setup.set_faults(FaultPlan(fail_paths=((f"*/{blocked}", "EIO"),)))

        failed = setup.store.backup(folder, is_directory=True)

        assert not failed.ok
        assert failed.retryable
        assert blocked in (failed.error or "")
        assert "Input/output error" in (failed.error or "")
        assert "1 of 30 entries" in (failed.error or "")
        others = {rel: data for rel, data in files.items() if rel != blocked}
        assert on_drive(setup.drive / "trials") == others
        assert temp_files(setup.drive) == []

        setup.set_faults(FaultPlan())
        again = setup.store.backup(folder, is_directory=True)

        assert again.ok, again.error
        assert (again.files_copied, again.files_unchanged) == (1, 29)
        assert on_drive(setup.drive / "trials") == files


@pytest.mark.asyncio
async def test_cancelled_backup_stops_every_copy_and_leaves_previous_versions(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "pause"
    os.mkfifo(fifo)
    with simulated_drive(tmp_path, file_concurrency=3) as setup:
        folder = setup.local / "trials"
        first = make_files(folder, 9)
        assert (await setup.store.abackup(folder, is_directory=True)).ok
        second = make_files(folder, 9, b"v2, longer than the first version")
        setup.set_faults(FaultPlan(pause_fifo=str(fifo)))

        gate = None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(setup.store.abackup, folder, True)
                gate = await anyio.to_thread.run_sync(open, fifo, "wb")
                await anyio.to_thread.run_sync(
                    lambda: wait_for(lambda: processes_holding(fifo) == 3, what="3 copies")
                )
                group.cancel_scope.cancel()
        finally:
            # Opened only once the cancelled copies' helpers were killed at the gate.
            setup.set_faults(FaultPlan())
            if gate is not None:
                gate.close()

        assert on_drive(setup.drive / "trials") == first
        again = await setup.store.abackup(folder, is_directory=True)
        assert again.ok, again.error
        assert again.files_copied == 9
        assert on_drive(setup.drive / "trials") == second
        assert temp_files(setup.drive) == []  # the killed copies' temporaries were removed


def test_restore_with_several_files_at_once_matches_drive(tmp_path: Path) -> None:
    with DriveStore(tmp_path / "local", tmp_path / "drive", file_concurrency=4) as store:
        folder = tmp_path / "local" / "trials"
        files = make_files(folder, 25)
        assert store.backup(folder, is_directory=True).ok
        for path in folder.rglob("*.txt"):
            path.unlink()

        restored = store.restore(folder, is_directory=True)

        assert restored.ok, restored.error
        assert restored.files_copied == 25
        assert on_drive(folder) == files
        assert store.backup(folder, is_directory=True).files_copied == 0


def test_file_concurrency_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file_concurrency"):
        DriveStore(tmp_path / "local", tmp_path / "drive", file_concurrency=0)
