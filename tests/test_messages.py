"""Every failure is told in words that are true: which side failed, and what to do."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from drive_support import DriveSetup, make_study, write_bytes
from sweepsafe import DriveStore
from sweepsafe.errors import DrivePathError
from sweepsafe.testing import FaultPlan, FuseDrive, fuse_unavailable_reason, simulated_store
from sweepsafe.worker import BackupWorker, RetryPolicy
from worker_support import LogWatch

WAIT_S = 60.0


def test_drive_failures_while_reading_are_blamed_on_google_drive(drive: DriveSetup) -> None:
    database = drive.local / "study-1" / "study.db"
    make_study(database, 2)
    write_bytes(drive.local / "study-1" / "trials" / "trial-00000" / "model.bin", b"w" * 100)
    assert drive.store.backup(database).ok
    assert drive.store.backup(drive.local / "study-1" / "trials", is_directory=True).ok
    drive.set_faults(FaultPlan(disconnected=True))

    errors = {
        "database": drive.store.restore(database).error,
        "folder": drive.store.restore(drive.local / "study-1" / "trials", is_directory=True).error,
        "file": drive.store.restore(
            drive.local / "study-1" / "trials" / "trial-00000" / "model.bin"
        ).error,
        "verify": drive.store.verify(database).error,
    }

    for what, error in errors.items():
        assert error is not None, what
        assert "Google Drive is not connected" in error, (what, error)
        assert str(drive.drive) in error, (what, error)
        assert "remount" in error, (what, error)
        assert "local" not in error, (what, error)


@pytest.fixture
def full_local_disk(tmp_path: Path) -> Iterator[tuple[Path, Path, FuseDrive]]:
    """A local folder on a FUSE mount that can be made full (ENOSPC on every write), and a
    study in it; yields the local root, the database and the mount."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    plan = tmp_path / "disk-plan.json"
    FaultPlan().write(plan)
    with FuseDrive(tmp_path / "disk", tmp_path / "mnt", plan) as disk:
        local = disk.mount_point / "out"
        database = local / "study-1" / "study.db"
        make_study(database, 3)
        yield local, database, disk


def test_a_full_local_disk_is_reported_as_such_and_retried(
    tmp_path: Path, full_local_disk: tuple[Path, Path, FuseDrive]
) -> None:
    local, database, disk = full_local_disk
    store = simulated_store(local, tmp_path / "drive", FaultPlan())
    failed = LogWatch(lambda record: "will retry" in record.getMessage())
    logger = logging.getLogger("sweepsafe")
    logger.addHandler(failed)
    worker = BackupWorker(retry=RetryPolicy(initial_delay=0.2, max_delay=0.2, max_attempts=50))
    try:
        FaultPlan(enospc=True).write(disk.plan_path)
        result = store.backup(database)
        assert not result.ok
        assert result.error is not None
        assert result.error.startswith("the local disk is full"), result.error
        assert "corrupt" not in result.error
        assert result.retryable

        worker.submit(database, store.abackup)
        assert failed.matched.wait(WAIT_S)
        FaultPlan().write(disk.plan_path)  # room again
        report = worker.flush(WAIT_S)
    finally:
        logger.removeHandler(failed)
        worker.close(0)
        store.close()

    assert report.ok, str(report)
    (target,) = report.targets
    assert target.attempts >= 2
    assert any("the local disk is full" in m for m in failed.messages(logging.WARNING))


@pytest.mark.parametrize("where", ["inside", "equal", "above"])
def test_a_drive_root_overlapping_the_local_root_is_refused(tmp_path: Path, where: str) -> None:
    local = tmp_path / "out"
    drive_root = {"inside": local / "drive", "equal": local, "above": tmp_path}[where]

    with pytest.raises(DrivePathError, match="overlap"):
        DriveStore(local, drive_root)


def test_a_fifo_is_not_a_regular_file(drive: DriveSetup) -> None:
    folder = drive.local / "trials"
    write_bytes(folder / "result.txt", b"0.5\n")
    os.mkfifo(folder / "pipe")
    os.mkfifo(drive.local / "pipe")

    alone = drive.store.backup(drive.local / "pipe")
    inside = drive.store.backup(folder, is_directory=True)

    assert not alone.ok
    assert alone.error is not None
    assert "is not a regular file" in alone.error
    assert "does not exist" not in alone.error
    assert not alone.retryable
    assert inside.ok
    assert inside.skipped == ("pipe (not a regular file)",)
    assert (drive.drive / "trials" / "result.txt").read_bytes() == b"0.5\n"
