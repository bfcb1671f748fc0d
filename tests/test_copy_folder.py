"""Folder backups copy only what changed, from a manifest kept on local disk."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from drive_support import simulated_drive, temp_files, write_bytes
from sweepsafe.drive import BackupResult, DriveStore
from sweepsafe.drive._reserved_names import temp_name
from sweepsafe.testing import FaultPlan, simulated_store


def make_files(folder: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = folder / f"part-{index % 10}" / f"file-{index:04d}.txt"
        write_bytes(path, f"content {index}\n".encode())
        paths.append(path)
    return paths


def drive_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but those in sweepsafe's own ``.sweepsafe`` folders."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and ".sweepsafe" not in path.relative_to(root).parts
    }


def test_second_backup_of_unchanged_thousand_files_copies_nothing_and_one_change_one_file(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        folder = setup.local / "trials"
        paths = make_files(folder, 1000)

        first = setup.store.backup(folder, is_directory=True)
        second = setup.store.backup(folder, is_directory=True)
        paths[417].write_bytes(b"changed, and longer than before\n")
        third = setup.store.backup(folder, is_directory=True)

        assert first.ok, first.error
        assert (first.files_copied, first.kind) == (1000, "directory")
        assert (second.files_copied, second.files_unchanged, second.bytes_copied) == (0, 1000, 0)
        assert (third.files_copied, third.files_unchanged) == (1, 999)
        local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in paths}
        assert drive_files(setup.drive / "trials") == local


def test_file_changed_during_its_copy_is_copied_again_next_time(tmp_path: Path) -> None:
    fifo = tmp_path / "pause"
    os.mkfifo(fifo)
    with simulated_drive(tmp_path) as setup:
        folder = setup.local / "trials"
        log = folder / "trial-0" / "log.txt"
        write_bytes(log, b"line 0\n")
        assert setup.store.backup(folder, is_directory=True).ok
        write_bytes(log, b"line 1\n")
        setup.set_faults(FaultPlan(pause_fifo=str(fifo)))
        outcome: list[object] = []
        backup = threading.Thread(
            target=lambda: outcome.append(setup.store.backup(folder, is_directory=True))
        )
        backup.start()
        # Opening the pipe returns once the helper waits in the copy's commit.
        with open(fifo, "wb") as gate:
            with open(log, "ab") as file:
                file.write(b"line 2, written while the copy was in flight\n")
            setup.set_faults(FaultPlan())
            gate.write(b"go")
        backup.join(timeout=60)
        assert not backup.is_alive()

        again = setup.store.backup(folder, is_directory=True)
        settled = setup.store.backup(folder, is_directory=True)

        assert outcome[0]
        assert again.files_copied == 1
        assert settled.files_copied == 0
        assert (setup.drive / "trials" / "trial-0" / "log.txt").read_bytes() == log.read_bytes()


def test_restore_then_backup_on_a_fresh_runtime_copies_nothing(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        folder = setup.local / "study-1" / "trials"
        make_files(folder, 50)
        database = folder / "trial-db.sqlite"
        connection = sqlite3.connect(database)
        connection.execute("CREATE TABLE t (x)")
        connection.execute("INSERT INTO t VALUES (42)")
        connection.commit()
        connection.close()
        assert setup.store.backup(folder, is_directory=True).ok
        # The dead runtime also left a temporary of a killed copy on Drive.
        leftover = setup.drive / "study-1" / "trials" / "part-3" / temp_name("dead01234567")
        write_bytes(leftover, b"half")

    fresh_local = tmp_path / "fresh-runtime"
    with simulated_store(fresh_local, setup.drive, setup.plan_path) as fresh:
        restored = fresh.restore(fresh_local / "study-1" / "trials", is_directory=True)
        assert restored.ok, restored.error
        assert restored.files_copied == 51
        assert leftover.exists()  # restores never delete on Drive

        after = fresh.backup(fresh_local / "study-1" / "trials", is_directory=True)

        assert after.ok, after.error
        assert (after.files_copied, after.files_unchanged) == (0, 51)
        assert temp_files(setup.drive) == []
        new_folder = fresh_local / "study-1" / "trials"
        assert drive_files(new_folder) == drive_files(setup.drive / "study-1" / "trials")


def test_files_deleted_locally_stay_on_drive_unless_mirror(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        folder = setup.local / "trials"
        paths = make_files(folder, 5)
        assert setup.store.backup(folder, is_directory=True).ok
        paths[0].unlink()
        assert setup.store.backup(folder, is_directory=True).ok
        assert (setup.drive / "trials" / paths[0].relative_to(folder)).exists()

    with simulated_store(setup.local, setup.drive, setup.plan_path, mirror=True) as mirroring:
        paths[1].unlink()
        assert mirroring.backup(folder, is_directory=True).ok
        assert not (setup.drive / "trials" / paths[1].relative_to(folder)).exists()
        assert (setup.drive / "trials" / paths[2].relative_to(folder)).exists()


def test_symlinks_out_of_the_folder_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_bytes(outside / "secret.txt", b"not part of the sweep")
    with simulated_drive(tmp_path) as setup:
        folder = setup.local / "trials"
        write_bytes(folder / "real.txt", b"real")
        (folder / "link-to-file.txt").symlink_to(outside / "secret.txt")
        (folder / "link-to-folder").symlink_to(outside, target_is_directory=True)
        (folder / "link-inside.txt").symlink_to(folder / "real.txt")

        result = setup.store.backup(folder, is_directory=True)

        assert result.ok, result.error
        assert drive_files(setup.drive / "trials") == {
            "real.txt": b"real",
            "link-inside.txt": b"real",
        }


def test_sidecars_temporaries_state_and_excluded_files_are_never_copied(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        study = setup.local / "study-1"
        database = study / "study.db"
        study.mkdir()
        connection = sqlite3.connect(database)
        connection.execute("PRAGMA journal_mode=WAL").fetchall()
        connection.execute("CREATE TABLE t (x)")
        connection.execute("INSERT INTO t VALUES (1)")
        connection.commit()
        nested = study / "trials" / "model.sqlite"
        write_bytes(nested, b"")
        nested_connection = sqlite3.connect(nested)
        nested_connection.execute("PRAGMA journal_mode=WAL").fetchall()
        nested_connection.execute("CREATE TABLE m (y)")
        nested_connection.execute("INSERT INTO m VALUES (7)")
        nested_connection.commit()
        write_bytes(study / "trials" / temp_name("abc012345678"), b"temp")
        write_bytes(study / "trials" / "a.txt", b"a")
        try:
            result = setup.store.backup(study, is_directory=True, exclude=["study.db"])
            assert result.ok, result.error
            assert sorted(drive_files(setup.drive / "study-1")) == [
                "trials/a.txt",
                "trials/model.sqlite",
            ]
            # The database inside the folder went as a snapshot, WAL content included.
            copy = sqlite3.connect(setup.drive / "study-1" / "trials" / "model.sqlite")
            assert copy.execute("SELECT y FROM m").fetchall() == [(7,)]
            copy.close()
        finally:
            connection.close()
            nested_connection.close()
        whole = setup.store.backup(setup.local, is_directory=True)
        assert whole.ok, whole.error
        assert not (setup.drive / ".sweepsafe").exists()


@pytest.mark.parametrize("mirror", [False, True])
def test_restored_folder_matches_drive_byte_for_byte(tmp_path: Path, mirror: bool) -> None:
    with DriveStore(tmp_path / "local", tmp_path / "drive", mirror=mirror) as store:
        folder = tmp_path / "local" / "trials"
        make_files(folder, 20)
        assert store.backup(folder, is_directory=True).ok
        shutil.rmtree(folder)  # the runtime's disk is gone
        restored = store.restore(folder, is_directory=True)
        assert restored.ok, restored.error
        assert restored.files_copied == 20
        assert drive_files(folder) == drive_files(tmp_path / "drive" / "trials")


def test_drive_folder_deleted_or_replaced_behind_our_back_gets_every_file_again(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        folder = setup.local / "trials"
        make_files(folder, 30)
        assert setup.store.backup(folder, is_directory=True).ok
        shutil.rmtree(setup.drive)
        setup.drive.mkdir()  # someone deleted the backup and made an empty folder

        again = setup.store.backup(folder, is_directory=True)
        settled = setup.store.backup(folder, is_directory=True)

        assert again.ok, again.error
        assert again.files_copied == 30
        assert settled.files_copied == 0
        local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.txt")}
        assert drive_files(setup.drive / "trials") == local


def test_a_file_rewritten_during_its_copy_reaches_drive_as_one_consistent_version(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        fifo = tmp_path / "gate"
        os.mkfifo(fifo)
        checkpoint = setup.local / "checkpoint.bin"
        write_bytes(checkpoint, b"version 1\n" * 1000)
        assert setup.store.backup(checkpoint)
        write_bytes(checkpoint, b"version 2\n" * 500)
        setup.set_faults(FaultPlan(pause_fifo=str(fifo)))
        outcome: list[BackupResult] = []
        backup = threading.Thread(target=lambda: outcome.append(setup.store.backup(checkpoint)))
        backup.start()
        # The helper now waits in the commit; the training code rewrites the file.
        with open(fifo, "wb") as gate:
            write_bytes(checkpoint, b"version 3\n" * 2000)
            setup.set_faults(FaultPlan())
            gate.write(b"go")
        backup.join(timeout=60)
        assert not backup.is_alive()

        # What reached Drive is version 2 whole, as captured before the rewrite, never
        # a mixture of versions 2 and 3.
        assert outcome[0].ok, outcome[0].error
        drive_copy = setup.drive / "checkpoint.bin"
        assert drive_copy.read_bytes() == b"version 2\n" * 500
        assert [p.name for p in setup.drive.iterdir() if "sweepsafe-tmp" in p.name] == []
        # The rewrite is seen as a change, and the next backup ships version 3.
        again = setup.store.backup(checkpoint)
        assert (again.ok, again.files_copied) == (True, 1)
        assert drive_copy.read_bytes() == checkpoint.read_bytes()
