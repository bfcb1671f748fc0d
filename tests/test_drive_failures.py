"""Every expected failure comes back as a clear result; nothing raises, nothing hangs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drive_support import simulated_drive, temp_files, write_bytes
from sweepsafe.drive import DriveStore
from sweepsafe.errors import DriveNotMountedError, DrivePathError
from sweepsafe.testing import FaultPlan

UNREADABLE_EVEN_BY_ROOT = Path("/proc/sys/vm/compact_memory")  # mode 0200, a real file


def test_path_already_on_drive_is_skipped_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWEEPSAFE_DRIVE_ROOTS", str(tmp_path / "gdrive"))
    on_drive = tmp_path / "gdrive" / "study.db"
    write_bytes(on_drive, b"x")
    with DriveStore(tmp_path / "local", tmp_path / "gdrive" / "backup") as store:
        result = store.backup(on_drive)
        assert not result.ok
        assert result.kind == "skipped"
        assert not result.retryable
        assert "already on Google Drive" in (result.error or "")
        with pytest.raises(DrivePathError, match="already on Google Drive"):
            store.drive_path_for(on_drive)


def test_local_root_on_drive_is_refused_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWEEPSAFE_DRIVE_ROOTS", str(tmp_path / "gdrive"))
    with pytest.raises(DrivePathError, match="local disk") as raised:
        DriveStore(tmp_path / "gdrive" / "out", tmp_path / "backup")
    assert str(tmp_path / "gdrive" / "out") in str(raised.value)


def test_path_outside_local_root_is_a_result_but_raises_from_drive_path_for(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "elsewhere" / "a.txt"
    write_bytes(outside, b"x")
    with DriveStore(tmp_path / "local", tmp_path / "drive") as store:
        result = store.backup(outside)
        assert not result.ok
        assert str(outside) in (result.error or "")
        assert str(tmp_path / "local") in (result.error or "")
        with pytest.raises(ValueError, match="not inside") as raised:
            store.drive_path_for(outside)
        assert not isinstance(raised.value, DrivePathError)
        # A sibling whose name merely starts like the root is outside too.
        with pytest.raises(ValueError, match="not inside"):
            store.drive_path_for(tmp_path / "local-other" / "a.txt")


def test_constructing_a_store_touches_nothing_on_drive(tmp_path: Path) -> None:
    with DriveStore(tmp_path / "local", tmp_path / "drive" / "backup") as store:
        assert not (tmp_path / "drive").exists()
        write_bytes(tmp_path / "local" / "a.txt", b"x")
        (tmp_path / "drive").mkdir()
        assert store.backup(tmp_path / "local" / "a.txt").ok
        assert (tmp_path / "drive" / "backup" / "a.txt").read_bytes() == b"x"


def test_drive_root_is_not_created_when_its_parent_is_missing(tmp_path: Path) -> None:
    # An unmounted Drive: writing there would silently land on local disk.
    write_bytes(tmp_path / "local" / "a.txt", b"x")
    with DriveStore(tmp_path / "local", tmp_path / "content" / "MyDrive" / "out") as store:
        result = store.backup(tmp_path / "local" / "a.txt")
    assert not result.ok
    assert result.retryable
    assert "mounted" in (result.error or "")
    assert not (tmp_path / "content").exists()


def test_missing_source_is_a_clear_failure(tmp_path: Path) -> None:
    with DriveStore(tmp_path / "local", tmp_path / "drive") as store:
        missing = tmp_path / "local" / "nope.db"
        result = store.backup(missing)
        assert not result.ok
        assert not result.retryable
        assert f"{missing} does not exist" in (result.error or "")
        folder = store.backup(tmp_path / "local" / "no-folder", is_directory=True)
        assert not folder.ok
        assert "does not exist" in (folder.error or "")


def test_unreadable_source_is_a_clear_failure(tmp_path: Path) -> None:
    try:
        UNREADABLE_EVEN_BY_ROOT.open("rb").close()
    except PermissionError:
        pass
    else:
        pytest.skip(f"{UNREADABLE_EVEN_BY_ROOT} is readable here")
    local = tmp_path / "local"
    local.mkdir()
    (local / "secret.bin").symlink_to(UNREADABLE_EVEN_BY_ROOT)
    with DriveStore(local, tmp_path / "drive") as store:
        result = store.backup(local / "secret.bin")
    assert not result.ok
    assert not result.retryable
    assert "Permission denied" in (result.error or "")
    assert "readable" in (result.error or "")


@pytest.mark.parametrize(
    ("plan", "phrase"),
    [
        (FaultPlan(fail_every_kth_write=1), "Input/output error"),
        (FaultPlan(disconnected=True), "Transport endpoint is not connected"),
        (FaultPlan(enospc=True), "No space left on device"),
    ],
    ids=["eio", "enotconn", "enospc"],
)
def test_drive_errors_are_retryable_results_that_keep_the_previous_copy(
    tmp_path: Path, plan: FaultPlan, phrase: str
) -> None:
    with simulated_drive(tmp_path) as setup:
        source = setup.local / "study-1" / "data.bin"
        write_bytes(source, b"first")
        assert setup.store.backup(source).ok
        write_bytes(source, b"second")
        setup.set_faults(plan)

        result = setup.store.backup(source)
        folder_result = setup.store.backup(setup.local / "study-1", is_directory=True)

        for failed in (result, folder_result):
            assert not failed.ok
            assert failed.retryable
            assert phrase in (failed.error or "")
            assert str(setup.drive / "study-1") in (failed.error or "")
        assert (setup.drive / "study-1" / "data.bin").read_bytes() == b"first"
        setup.set_faults(FaultPlan())
        assert setup.store.backup(source).ok
        assert (setup.drive / "study-1" / "data.bin").read_bytes() == b"second"
        assert temp_files(setup.drive) == []


def test_hung_drive_returns_within_the_timeout_and_a_fresh_helper_recovers(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path, drive_timeout=1.0) as setup:
        source = setup.local / "study.db"
        write_bytes(source, b"not really a database")
        setup.set_faults(FaultPlan(hang=True))

        results = [
            setup.store.backup(source),
            setup.store.backup(setup.local, is_directory=True),
            setup.store.restore(source),
        ]
        verification = setup.store.verify(source)

        for result in results:
            assert not result.ok
            assert result.retryable
            assert "did not answer within 1 s" in (result.error or "")
        assert not verification.ok
        assert "did not answer within 1 s" in (verification.error or "")

        setup.set_faults(FaultPlan())
        recovered = setup.store.backup(source)
        assert recovered.ok, recovered.error
        assert setup.store.verify(source).ok


def test_for_colab_needs_a_mounted_drive(tmp_path: Path) -> None:
    mount = tmp_path / "content-drive"
    with pytest.raises(DriveNotMountedError, match=r"drive\.mount\("):
        DriveStore.for_colab(tmp_path / "out", mount_point=mount)
    (mount / "MyDrive").mkdir(parents=True)
    with DriveStore.for_colab(tmp_path / "out", "sweeps", mount_point=mount) as store:
        assert store.drive_root == mount / "MyDrive" / "sweeps"
        assert store.local_root == tmp_path / "out"
        write_bytes(tmp_path / "out" / "a.txt", b"x")
        assert store(tmp_path / "out" / "a.txt", False)
        assert (mount / "MyDrive" / "sweeps" / "a.txt").read_bytes() == b"x"


def test_failed_results_are_falsy_and_name_the_source(tmp_path: Path) -> None:
    with DriveStore(tmp_path / "local", tmp_path / "drive") as store:
        result = store.backup(tmp_path / "local" / "missing.txt")
    assert not result
    assert result.source == tmp_path / "local" / "missing.txt"
    assert os.path.isabs(result.source)


def test_blocking_faces_work_inside_a_running_event_loop_as_in_a_notebook(tmp_path: Path) -> None:
    write_bytes(tmp_path / "local" / "a.txt", b"from a notebook cell")

    async def notebook_cell() -> tuple[bool, bool, bool]:
        with DriveStore(tmp_path / "local", tmp_path / "drive") as store:
            backed_up = store.backup(tmp_path / "local" / "a.txt").ok
            verified = store.verify(tmp_path / "local" / "a.txt").ok
            restored = store.restore(tmp_path / "local" / "a.txt").ok
        return backed_up, verified, restored

    assert asyncio.run(notebook_cell()) == (True, True, True)


_EXIT_SCRIPT = """
import sys
from pathlib import Path
from sweepsafe.testing import FaultPlan, simulated_store
local, drive, plan = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
store = simulated_store(local, drive, plan, drive_timeout=1.0)
idle = simulated_store(local, drive / "other", plan)
assert store.backup(local / "a.txt").ok and idle.backup(local / "a.txt").ok
FaultPlan(hang=True).write(plan)  # the mount stalls
print(store.backup(local / "a.txt").error, flush=True)
# Exit without closing either store, a helper still hung in the Drive.
"""


def test_process_exits_promptly_and_cleanly_while_the_drive_hangs(tmp_path: Path) -> None:
    write_bytes(tmp_path / "local" / "a.txt", b"x")
    plan = tmp_path / "plan.json"
    FaultPlan().write(plan)
    child = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::ResourceWarning",
            "-c",
            _EXIT_SCRIPT,
            str(tmp_path / "local"),
            str(tmp_path / "drive"),
            str(plan),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert "did not answer within 1 s" in child.stdout
    assert "ResourceWarning" not in child.stderr, child.stderr
