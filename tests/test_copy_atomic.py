"""A copy that fails or is cancelled half-way leaves the previous Drive copy intact."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from drive_support import simulated_drive, temp_files, write_bytes
from sweepsafe.drive._files import COPY_CHUNK
from sweepsafe.drive._reserved_names import temp_name
from sweepsafe.testing import FaultPlan, simulated_store

pytestmark = pytest.mark.asyncio

SIZE = 3 * COPY_CHUNK + 12345  # four chunks, so a fault can land between two of them


async def test_io_error_between_two_chunks_keeps_previous_copy_then_next_backup_completes(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        source = setup.local / "checkpoint.bin"
        old, new = os.urandom(SIZE), os.urandom(SIZE)
        write_bytes(source, old)
        assert (await setup.store.abackup(source)).ok
        write_bytes(source, new)

        # A fresh helper counts writes from zero: the first chunk lands, the second fails.
        setup.set_faults(FaultPlan(fail_every_kth_write=2))
        with simulated_store(setup.local, setup.drive, setup.plan_path) as failing:
            result = await failing.abackup(source)

        assert not result.ok
        assert result.retryable
        assert "Input/output error" in (result.error or "")
        assert str(setup.drive / "checkpoint.bin") in (result.error or "")
        assert (setup.drive / "checkpoint.bin").read_bytes() == old

        setup.set_faults(FaultPlan())
        again = await setup.store.abackup(source)
        assert again.ok, again.error
        assert (setup.drive / "checkpoint.bin").read_bytes() == new
        assert temp_files(setup.drive) == []


async def test_cancelled_copy_keeps_previous_copy_and_next_backup_removes_its_temporary(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        source = setup.local / "checkpoint.bin"
        old, new = os.urandom(SIZE), os.urandom(SIZE)
        write_bytes(source, old)
        assert (await setup.store.abackup(source)).ok
        write_bytes(source, new)
        # Several seconds per chunk: the cancellation surely lands mid-copy.
        setup.set_faults(FaultPlan(latency_per_mib_s=0.5))

        with anyio.move_on_after(1.0) as scope:
            await setup.store.abackup(source)
        assert scope.cancelled_caught
        assert (setup.drive / "checkpoint.bin").read_bytes() == old

        setup.set_faults(FaultPlan())
        again = await setup.store.abackup(source)
        assert again.ok, again.error
        assert (setup.drive / "checkpoint.bin").read_bytes() == new
        assert temp_files(setup.drive) == []


async def test_temporary_left_by_a_killed_copy_is_removed_by_the_next_backup_of_that_file(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        source = setup.local / "study-1" / "notes.txt"
        write_bytes(source, b"v1")
        leftover = setup.drive / "study-1" / temp_name("deadbeef0123")
        write_bytes(leftover, b"half a copy from a runtime that died")
        unrelated = setup.drive / "study-1" / "other.txt"
        write_bytes(unrelated, b"not ours to delete")

        assert (await setup.store.abackup(source)).ok

        assert not leftover.exists()
        assert unrelated.read_bytes() == b"not ours to delete"
        assert (setup.drive / "study-1" / "notes.txt").read_bytes() == b"v1"


async def test_concurrent_copies_from_two_event_loops_and_threads_all_land(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path, FaultPlan(latency_s=0.05)) as setup:
        sources = []
        for index in range(6):
            path = setup.local / f"file-{index}.bin"
            write_bytes(path, os.urandom(1000 + index))
            sources.append(path)

        async with anyio.create_task_group() as group:
            for path in sources[:3]:
                group.start_soon(setup.store.abackup, path)
            for path in sources[3:]:
                # The blocking face runs its own event loop in another thread.
                group.start_soon(anyio.to_thread.run_sync, setup.store.backup, path)

        for path in sources:
            assert (setup.drive / path.name).read_bytes() == path.read_bytes()


async def test_two_concurrent_copies_of_one_file_both_land_without_removing_each_other(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path, FaultPlan(latency_s=0.3)) as setup:
        source = setup.local / "study-1" / "study.bin"
        write_bytes(source, os.urandom(5000))
        results = []

        async def copy() -> None:
            results.append(await setup.store.abackup(source))

        async with anyio.create_task_group() as group:
            group.start_soon(copy)
            group.start_soon(copy)

        assert [result.ok for result in results] == [True, True], results
        assert (setup.drive / "study-1" / "study.bin").read_bytes() == source.read_bytes()
        assert temp_files(setup.drive) == []


async def test_cancelled_folder_backup_keeps_finished_files_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        folder = setup.local / "trials"
        write_bytes(folder / "a-small.txt", b"small")
        write_bytes(folder / "b-big.bin", os.urandom(4 * (1 << 20)))
        # The small file lands at once; the big one takes seconds, and the backup is
        # cancelled once the small one has landed and the big one is in flight.
        setup.set_faults(FaultPlan(latency_per_mib_s=2.0))
        on_drive = setup.drive / "trials"

        def big_in_flight() -> bool:
            return (on_drive / "a-small.txt").exists() and bool(temp_files(setup.drive))

        with anyio.fail_after(30), anyio.CancelScope() as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(setup.store.abackup, folder, True)
                while not big_in_flight():
                    await anyio.sleep(0.02)
                await anyio.sleep(0.2)
                scope.cancel()
        assert scope.cancelled_caught
        assert (setup.drive / "trials" / "a-small.txt").read_bytes() == b"small"
        assert not (setup.drive / "trials" / "b-big.bin").exists()

        setup.set_faults(FaultPlan())
        again = await setup.store.abackup(folder, is_directory=True)

        assert again.ok, again.error
        assert (again.files_copied, again.files_unchanged) == (1, 1)
        assert (setup.drive / "trials" / "b-big.bin").read_bytes() == (
            folder / "b-big.bin"
        ).read_bytes()
        assert temp_files(setup.drive) == []


async def test_records_cancelled_while_written_leave_no_temporary_and_no_open_file(
    tmp_path: Path,
) -> None:
    # The exit path's deadline cancels backups wherever they are, also in the middle of
    # writing sweepsafe's own records on local disk: each record is its old or its new
    # version, and nothing is left behind, open or on disk.
    import gc
    import warnings

    from sweepsafe.drive._local_state import UnitState

    record = UnitState(tmp_path / "unit" / "unit.json", unit_id="first")
    await record.asave()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for attempt in range(300):
            record.unit_id = f"attempt-{attempt}"
            with anyio.move_on_after(attempt % 30 * 0.0001):
                await record.asave()
        await anyio.sleep(0.2)  # what a cancelled wait left running ends
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert sorted(p.name for p in record.path.parent.iterdir()) == ["unit.json"]
    loaded = await UnitState.aload(record.path.parent)
    assert (loaded.unit_id or "").startswith(("first", "attempt-")), loaded.unit_id
