"""Trial folders as training code really writes them: checkpoints rewritten while they are
copied, rotating checkpoint folders, entries Drive refuses, unreadable folders, names that
look like database side files, symlinks, many small files, and work proportional to change.

Real files and real writer processes throughout; only Drive is a stand-in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import optuna
import pytest

from cli_support import run_cli
from sweep_support import own_worker, wait_for
from sweepsafe import (
    BackupResult,
    DriveStore,
    backup_hpo_study_to_drive,
    create_trial_backup_callback,
)
from sweepsafe.testing import FaultPlan, simulated_store

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Drive:
    """A store over ``local`` -> ``drive`` whose stand-in Drive obeys ``plan_path``."""

    store: DriveStore
    local: Path
    drive: Path
    plan_path: Path

    def set_faults(self, plan: FaultPlan) -> None:
        plan.write(self.plan_path)


@contextlib.contextmanager
def stand_in_drive(
    tmp_path: Path, plan: FaultPlan | None = None, **options: object
) -> Iterator[Drive]:
    local, drive, plan_path = tmp_path / "local", tmp_path / "drive", tmp_path / "plan.json"
    local.mkdir(parents=True)
    (plan or FaultPlan()).write(plan_path)
    store = simulated_store(local, drive, plan_path, **options)
    try:
        yield Drive(store, local, drive, plan_path)
    finally:
        store.close()


def files_under(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (sweepsafe's own folders apart), by relative path."""
    found = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if ".sweepsafe" in rel.parts or ".sweepsafe-tmp-" in path.name:
            continue
        if path.is_file() and not path.is_symlink():
            found[rel.as_posix()] = path.read_bytes()
    return found


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@contextlib.contextmanager
def writer_process(script: str, stop: Path, *args: object) -> Iterator[Path]:
    """Run ``script`` in a process of its own until the block ends; yields its stop file.

    The script stops between two whole writes once the stop file exists.
    """
    process = subprocess.Popen([sys.executable, "-c", script, str(stop), *map(str, args)])
    try:
        yield stop
    finally:
        stop.touch()
        try:
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0, f"the writer process failed ({process.returncode})"


# -- 1. a checkpoint rewritten while it is copied ----------------------------------------------

CHECKPOINT_WRITER = """
import os, sys, time
stop, path, log = sys.argv[1], sys.argv[2], sys.argv[3]
size, pause = int(sys.argv[4]), float(sys.argv[5])
version = 0
while not os.path.exists(stop):
    version += 1
    data = b"%08d" % version * (size // 8)
    # In place, in pieces, as torch.save(model, "last.pt") does.
    with open(path, "wb") as file:
        for start in range(0, size, 1 << 18):
            file.write(data[start:start + (1 << 18)])
    with open(log, "a") as file:
        file.write(f"{version}\\n")
    time.sleep(pause)
"""
# The same, with no pause and the versions made beforehand, so the file never stays
# unchanged for as long as a copy of it takes.
RESTLESS_WRITER = """
import os, sys
stop, path, log, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
versions = [b"%08d" % version * (size // 8) for version in (1, 2)]
written = 0
while not os.path.exists(stop):
    data = versions[written % 2]
    with open(path, "wb") as file:
        for start in range(0, size, 1 << 18):
            file.write(data[start:start + (1 << 18)])
    written += 1
    if written % 50 == 1:
        with open(log, "a") as file:
            file.write(f"{written}\\n")
with open(log, "a") as file:
    file.write(f"{2 - written % 2}\\n")
"""
# A writer that stalls in the middle of each version, the file open, as a busy machine
# or a GPU-to-host copy between two tensors makes ``torch.save`` do.
STALLING_WRITER = """
import os, sys, time
stop, path, log = sys.argv[1], sys.argv[2], sys.argv[3]
size, stall, pause = int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
version = 0
while not os.path.exists(stop):
    version += 1
    data = b"%08d" % version * (size // 8)
    with open(path, "wb") as file:
        file.write(data[: size // 2])
        file.flush()
        time.sleep(stall)
        file.write(data[size // 2 :])
    with open(log, "a") as file:
        file.write(f"{version}\\n")
    time.sleep(pause)
"""
CHECKPOINT_BYTES = 24 << 20
CAPTURE_PATIENCE_S = 4.0  # how long a backup waits for a changing file to stay unchanged


def checkpoint_version(data: bytes, size: int = CHECKPOINT_BYTES) -> int:
    """The version a checkpoint copy holds; fails unless it is that version whole."""
    version = int(data[:8])
    assert data == b"%08d" % version * (size // 8), "not one whole version the writer wrote"
    return version


def versions_written(log: Path) -> int:
    try:
        lines = log.read_text().split()
    except FileNotFoundError:
        return 0
    return int(lines[-1]) if lines else 0


@contextlib.contextmanager
def checkpoint_writer(
    tmp_path: Path, setup: Drive, script: str, *args: object
) -> Iterator[tuple[Path, Path, Path]]:
    """``script`` rewriting ``trial-00000/last.pt`` in a process of its own, once a first
    version of it is whole: (the trial folder, its Drive copy, the writer's version log)."""
    folder = setup.local / "study" / "trials" / "trial-00000"
    folder.mkdir(parents=True, exist_ok=True)
    log, stop = tmp_path / "versions.log", tmp_path / "stop"
    with writer_process(script, stop, folder / "last.pt", log, CHECKPOINT_BYTES, *args):
        wait_for(lambda: versions_written(log) > 0, 30, "a first version")
        yield folder, setup.drive / "study" / "trials" / "trial-00000", log


def test_checkpoint_rewritten_by_a_writer_process_reaches_drive_whole_at_every_backup(
    tmp_path: Path,
) -> None:
    # Shipping 24 MiB takes about 0.6 s, while the writer rewrites it every 0.3 s: a copy
    # made from the live file would be overtaken by the next version every time.
    plan = FaultPlan(latency_s=0.1, latency_per_mib_s=0.02)
    with (
        stand_in_drive(tmp_path, plan) as setup,
        checkpoint_writer(tmp_path, setup, CHECKPOINT_WRITER, 0.3) as (folder, drive_folder, log),
    ):
        on_drive = drive_folder / "last.pt"
        landed = 0
        for _ in range(5):
            wait_for(lambda seen=landed: versions_written(log) > seen, 30, "a new version")
            complete_before = versions_written(log)

            result = setup.store.backup(folder, is_directory=True)

            # Success means a version landed, whole, no older than the newest one
            # complete when the backup started.
            assert result.ok, result.error
            assert result.files_copied == 1
            version = checkpoint_version(on_drive.read_bytes())
            assert version >= complete_before > landed
            landed = version


def test_a_writer_stalled_in_the_middle_of_a_version_is_never_captured_torn(
    tmp_path: Path,
) -> None:
    # Unchanged for half a second, half written: quiet, but its writer holds it open.
    landed: list[int] = []
    with stand_in_drive(tmp_path) as setup:
        with checkpoint_writer(tmp_path, setup, STALLING_WRITER, 0.5, 0.5) as (folder, drive, _):
            for _ in range(8):
                result = setup.store.backup(folder, is_directory=True)
                if result.ok and result.files_copied:
                    landed.append(checkpoint_version((drive / "last.pt").read_bytes()))
                time.sleep(0.37)  # out of step with the writer: backups meet it mid-stall

        assert landed, "no version was captured in the pauses between versions"
        assert landed == sorted(landed)


# Writes the versions it is told to, each over the time it is told, holding the file
# open throughout as a training loop saving tensor after tensor does: in place, or (with
# "atomic") beside it, renamed over it once whole. Prints each version it finished, or
# the error that stopped it.
STEERED_WRITER = """
import os, sys, time
path, size, atomic = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "atomic"
for line in sys.stdin:
    version, seconds = int(line.split()[0]), float(line.split()[1])
    data = b"%08d" % version * (size // 8)
    pieces = 16
    target = path + ".part" if atomic else path
    try:
        with open(target, "wb") as file:
            for index in range(pieces):
                file.write(data[index * size // pieces : (index + 1) * size // pieces])
                file.flush()
                time.sleep(seconds / pieces)
        if atomic:
            os.replace(target, path)
    except OSError as exc:
        print(f"error: {exc}", flush=True)
        if atomic and os.path.exists(target):
            os.remove(target)
        continue
    print(version, flush=True)
"""


@dataclass
class SteeredWriter:
    """A writer process of ``last.pt`` in ``folder``, writing the versions it is told to."""

    process: subprocess.Popen[str]
    folder: Path
    on_drive: Path
    local: Path

    def write(self, version: int, seconds: float) -> None:
        """Start writing ``version`` over ``seconds``."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"{version} {seconds}\n")
        self.process.stdin.flush()

    def finished(self) -> int:
        """Wait for the next version to be finished; its number."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line.isdigit(), f"the training code's save failed: {line}"
        return int(line)

    async def write_during_first_ship(self, *versions: tuple[int, float | None, float]) -> None:
        """Once a copy of ``last.pt`` to Drive has begun: wait, then write, each version.

        A wait of None lasts until the version before has been kept whole as a spare, so
        that the next write cannot cut that capture short on a busy machine.
        """
        while not list(self.on_drive.parent.glob(".sweepsafe-tmp-*")):
            await anyio.sleep(0.02)
        for version, wait, seconds in versions:
            if wait is None:
                with anyio.fail_after(20):
                    while not self.spare_kept():
                        await anyio.sleep(0.02)
                await anyio.sleep(0.1)  # the capture's last look at the file
            else:
                await anyio.sleep(wait)
            await anyio.to_thread.run_sync(self.write, version, seconds)

    def spare_kept(self) -> bool:
        for spare in self.local.glob(".sweepsafe/**/spare-*"):
            with contextlib.suppress(FileNotFoundError):
                if spare.stat().st_size == CHECKPOINT_BYTES:
                    return True
        return False


@contextlib.contextmanager
def steered_writer(setup: Drive, mode: str = "in-place") -> Iterator[SteeredWriter]:
    folder = setup.local / "study" / "checkpoints"
    folder.mkdir(parents=True)
    path = folder / "last.pt"
    process = subprocess.Popen(
        [sys.executable, "-c", STEERED_WRITER, str(path), str(CHECKPOINT_BYTES), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    writer = SteeredWriter(
        process, folder, setup.drive / "study" / "checkpoints" / "last.pt", setup.local
    )
    try:
        writer.write(1, 0.0)
        assert writer.finished() == 1
        yield writer
    finally:
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


def spares_on_disk(setup: Drive) -> int:
    return len(list(setup.local.glob(".sweepsafe/**/spare-*")))


# Shipping 24 MiB takes over a second.
SLOW_SHIP = FaultPlan(latency_s=0.1, latency_per_mib_s=0.05)


def second_backup_meeting_a_rewrite(
    setup: Drive, writer: SteeredWriter, *, final: bool
) -> tuple[BackupResult, float]:
    """Back up once while version 2 is written whole and version 3 begins (slowly), then
    once more at once, version 3 still being written: the second backup, and when it ended."""
    kept: list[int] = []

    async def two_backups() -> tuple[BackupResult, BackupResult, float]:
        async with anyio.create_task_group() as group:
            group.start_soon(writer.write_during_first_ship, (2, 0.0, 0.0), (3, None, 4.0))
            first = await setup.store.abackup(writer.folder, is_directory=True)
        kept.append(spares_on_disk(setup))
        second = await setup.store.abackup(writer.folder, is_directory=True, final=final)
        return first, second, time.monotonic()

    first, second, second_ended = anyio.run(two_backups)
    assert first.ok, first.error
    assert second.ok, second.error
    assert (first.files_copied, second.files_copied) == (1, 1)
    assert kept == [1]  # version 2, kept while version 1 shipped
    return second, second_ended


def test_a_backup_meeting_a_checkpoint_mid_write_ships_the_version_finished_before_at_once(
    tmp_path: Path,
) -> None:
    """While one version ships, the next finished one is kept: the next backup, finding a
    third being written, ships that one at once instead of leaving Drive idle until the
    write ends; the backup after the write ships the newest."""
    with stand_in_drive(tmp_path, SLOW_SHIP) as setup, steered_writer(setup) as writer:
        _, second_ended = second_backup_meeting_a_rewrite(setup, writer, final=False)
        assert checkpoint_version(writer.on_drive.read_bytes()) == 2
        assert (writer.finished(), writer.finished()) == (2, 3)
        assert time.monotonic() - second_ended > 0.5, "version 3 was not being written"

        third = setup.store.backup(writer.folder, is_directory=True)
        assert third.ok, third.error
        assert third.files_copied == 1
        assert checkpoint_version(writer.on_drive.read_bytes()) == 3
    assert spares_on_disk(setup) == 0


def test_the_final_backup_waits_for_a_rewrite_and_ships_the_newest_version(
    tmp_path: Path,
) -> None:
    """The end of a sweep is no time to ship an older kept version: it waits."""
    with stand_in_drive(tmp_path, SLOW_SHIP) as setup, steered_writer(setup) as writer:
        second_backup_meeting_a_rewrite(setup, writer, final=True)
        assert checkpoint_version(writer.on_drive.read_bytes()) == 3
        assert (writer.finished(), writer.finished()) == (2, 3)
    assert spares_on_disk(setup) == 0


def test_a_kept_version_is_not_shipped_once_a_newer_one_may_have_been_finished(
    tmp_path: Path,
) -> None:
    """A kept version is known to be the newest finished one only until its watch ends:
    later, a backup that finds the file mid-write waits for it, as without one."""
    with stand_in_drive(tmp_path, SLOW_SHIP) as setup, steered_writer(setup) as writer:

        async def first_backup() -> BackupResult:
            async with anyio.create_task_group() as group:
                # Version 2 whole during the first ship, then version 3 over its end.
                group.start_soon(writer.write_during_first_ship, (2, 0.0, 0.0), (3, None, 1.5))
                return await setup.store.abackup(writer.folder, is_directory=True)

        first = anyio.run(first_backup)
        assert first.ok, first.error
        assert spares_on_disk(setup) == 1
        assert (writer.finished(), writer.finished()) == (2, 3)  # after the backup ended
        writer.write(4, 2.0)
        time.sleep(0.3)

        second = setup.store.backup(writer.folder, is_directory=True)
        assert second.ok, second.error
        assert checkpoint_version(writer.on_drive.read_bytes()) == 4
        assert writer.finished() == 4
        setup.store.close()
        assert spares_on_disk(setup) == 0


@contextlib.contextmanager
def small_disk(folder: Path, mib: int) -> Iterator[Path]:
    """A file system of ``mib`` MiB of its own at ``folder`` (a tmpfs: root only)."""
    folder.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("a small disk of its own needs the mount and umount commands")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"a small disk of its own needs a tmpfs mount: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_kept_version_never_takes_the_room_the_next_save_needs(tmp_path: Path) -> None:
    """A save that writes the new version beside the old one needs the file's size free:
    on a disk that holds the checkpoint, the copy being shipped and one more version, a
    version is not kept when keeping it would leave the next save without room."""
    # 24 MiB live + 24 MiB being shipped + 24 MiB of the next save fit in 88 MiB; a
    # kept version on top of them would not.
    with small_disk(tmp_path / "disk", 88) as disk:
        plan_path = tmp_path / "plan.json"
        SLOW_SHIP.write(plan_path)
        local = disk / "local"
        local.mkdir()
        store = simulated_store(local, tmp_path / "drive", plan_path)
        setup = Drive(store, local, tmp_path / "drive", plan_path)
        try:
            with steered_writer(setup, "atomic") as writer:

                async def backup_while_saving() -> BackupResult:
                    async with anyio.create_task_group() as group:
                        group.start_soon(
                            writer.write_during_first_ship, (2, 0.0, 0.0), (3, 0.5, 0.0)
                        )
                        return await setup.store.abackup(writer.folder, is_directory=True)

                first = anyio.run(backup_while_saving)
                assert (writer.finished(), writer.finished()) == (2, 3)
                assert first.ok, first.error
                assert spares_on_disk(setup) == 0

                second = setup.store.backup(writer.folder, is_directory=True)
                assert second.ok, second.error
                assert checkpoint_version(writer.on_drive.read_bytes()) == 3
        finally:
            store.close()


def test_checkpoint_changing_faster_than_it_can_be_captured_is_named_never_backed_up(
    tmp_path: Path,
) -> None:
    with stand_in_drive(tmp_path) as setup:
        write(setup.local / "study" / "trials" / "trial-00000" / "metrics.json", b'{"loss": 0.5}')
        with checkpoint_writer(tmp_path, setup, RESTLESS_WRITER) as (folder, on_drive, log):
            result = setup.store.backup(folder, is_directory=True)

            assert not result.ok
            assert result.retryable
            assert "last.pt (changing faster than it can be captured)" in (result.error or "")
            assert not (on_drive / "last.pt").exists()
            assert (on_drive / "metrics.json").read_bytes() == b'{"loss": 0.5}'

        # Not recorded as backed up: once the writer stops, the next backup ships it.
        after = setup.store.backup(folder, is_directory=True)
        assert after.ok, after.error
        assert (after.files_copied, after.files_unchanged) == (1, 1)
        # The writer's last line names the version it wrote last.
        assert checkpoint_version((on_drive / "last.pt").read_bytes()) == versions_written(log)


def test_a_backup_waiting_for_a_changing_file_stops_at_once_when_cancelled(
    tmp_path: Path,
) -> None:
    # A capture waits seconds for a file that never stays unchanged; the exit path's
    # deadline cancels the backup and must not wait for that.
    with stand_in_drive(tmp_path) as setup:
        with checkpoint_writer(tmp_path, setup, RESTLESS_WRITER) as (folder, _, _):

            async def cancelled_backup() -> None:
                with anyio.move_on_after(0.3):
                    await setup.store.abackup(folder, is_directory=True)

            started = time.perf_counter()
            anyio.run(cancelled_backup)
            waited = time.perf_counter() - started

        assert waited < CAPTURE_PATIENCE_S / 2, f"the cancelled backup took {waited:.2f} s"
        assert not list(setup.local.glob(".sweepsafe/**/capture-*"))


# -- 2. rotating checkpoint folders ------------------------------------------------------------

ROTATING_WRITER = """
import os, shutil, sys, time
stop, folder, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
number = 0
while not os.path.exists(stop):
    number += 1
    checkpoint = os.path.join(folder, f"checkpoint-{number}")
    os.makedirs(os.path.join(checkpoint, "shards"))
    for index in range(30):
        with open(os.path.join(checkpoint, "shards", f"model-{index:02d}.bin"), "wb") as file:
            file.write(b"%d.%d|" % (number, index) * 1000)
    with open(os.path.join(checkpoint, "trainer_state.json"), "w") as file:
        file.write('{"global_step": %d}' % number)
    # What Hugging Face Trainer does with save_total_limit: the oldest goes.
    if number > keep:
        shutil.rmtree(os.path.join(folder, f"checkpoint-{number - keep}"))
    time.sleep(0.01)
"""


def checkpoints(folder: Path) -> int:
    """The number of the newest checkpoint folder (0 when none)."""
    return max((int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")), default=0)


def test_checkpoint_folders_rotated_during_backups_never_fail_one(tmp_path: Path) -> None:
    with stand_in_drive(tmp_path, FaultPlan(latency_s=0.005)) as setup:
        folder = setup.local / "study" / "trials" / "trial-00000"
        folder.mkdir(parents=True)
        with writer_process(ROTATING_WRITER, tmp_path / "stop", folder, 3) as stop:
            wait_for(lambda: checkpoints(folder) > 3, 30, "rotation to start")
            results = [setup.store.backup(folder, is_directory=True) for _ in range(20)]
            stop.touch()
        rotated = checkpoints(folder)

        failed = [result.error for result in results if not result.ok]
        assert failed == [], failed
        assert rotated > 10, "the writer should have rotated many times during the backups"
        assert sum(result.files_copied for result in results) > 0
        final = setup.store.backup(folder, is_directory=True)
        assert final.ok, final.error
        local = files_under(folder)
        on_drive = files_under(setup.drive / "study" / "trials" / "trial-00000")
        assert {rel: on_drive.get(rel) for rel in local} == local


# -- 3. entries Drive refuses, names at the limit, file <-> folder swaps -----------------------


def test_an_entry_drive_refuses_costs_that_entry_only(tmp_path: Path) -> None:
    long_name = "n" * 246 + ".bin"  # 250 bytes: legal, close to the 255-byte limit
    assert len(long_name.encode()) == 250
    with stand_in_drive(tmp_path) as setup:
        folder = setup.local / "study" / "trials" / "trial-00000"
        write(folder / "was-a-folder" / "a.txt", b"a")
        write(folder / "was-a-folder" / "deeper" / "b.txt", b"b")
        write(folder / "was-a-file", b"a file")
        assert setup.store.backup(folder, is_directory=True).ok
        shutil.rmtree(folder / "was-a-folder")
        write(folder / "was-a-folder", b"now a file")
        (folder / "was-a-file").unlink()
        write(folder / "was-a-file" / "inside.txt", b"now a folder")
        ordinary = {
            f"part-{index % 4}/file-{index:02d}.txt": b"ordinary %d" % index for index in range(40)
        }
        for rel, data in ordinary.items():
            write(folder / rel, data)
        write(folder / long_name, b"long name")
        write(folder / "refused.bin", b"Drive refuses this one")
        setup.set_faults(FaultPlan(fail_paths=(("*/refused.bin", "ENAMETOOLONG"),)))

        first = setup.store.backup(folder, is_directory=True)

        assert not first.ok
        assert not first.retryable
        error = first.error or ""
        assert "refused.bin" in error
        assert "File name too long" in error
        assert "trying again will not help" in error
        assert first.problems == (
            "trials/trial-00000/refused.bin (Google Drive refused it: File name too long; "
            "rename it or move it out of the folder)",
        )
        on_drive = files_under(setup.drive / "study" / "trials" / "trial-00000")
        assert {rel: on_drive.get(rel) for rel in ordinary} == ordinary
        assert on_drive[long_name] == b"long name"
        assert on_drive["was-a-folder"] == b"now a file"
        assert on_drive["was-a-file/inside.txt"] == b"now a folder"
        assert "refused.bin" not in on_drive
        assert not any(rel.startswith("was-a-folder/") for rel in on_drive)

        again = setup.store.backup(folder, is_directory=True)
        assert again.problems == first.problems
        assert again.files_copied == 0


# -- 4. an unreadable folder -------------------------------------------------------------------

BACKUP_IN_CHILD = """
import json, sys
from sweepsafe.testing import simulated_store
local, drive, plan, folder = sys.argv[1:5]
with simulated_store(local, drive, plan) as store:
    result = store.backup(folder, is_directory=True)
print(json.dumps({"ok": result.ok, "error": result.error, "copied": result.files_copied,
                  "problems": list(result.problems)}))
"""


def without_read_override() -> list[str]:
    """How to run a command for which permissions hold: as root, without the capabilities
    that let root read any folder (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    command = [setpriv or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if setpriv is None or subprocess.run([*command, "true"], check=False).returncode != 0:
        pytest.skip("running as root, and setpriv cannot drop root's right to read any folder")
    return command


def test_an_unreadable_folder_is_named_and_every_other_file_copied(tmp_path: Path) -> None:
    command = without_read_override()
    with stand_in_drive(tmp_path) as setup:
        folder = setup.local / "study" / "trials" / "trial-00000"
        others = {f"logs/log-{index}.txt": b"log %d" % index for index in range(10)}
        for rel, data in others.items():
            write(folder / rel, data)
        locked = folder / "locked"
        write(locked / "inside.txt", b"cannot be read")
        locked.chmod(0)
        try:
            child = subprocess.run(
                [
                    *command,
                    sys.executable,
                    "-c",
                    BACKUP_IN_CHILD,
                    *map(str, (setup.local, setup.drive, setup.plan_path, folder)),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            locked.chmod(0o755)

        assert child.returncode == 0, child.stderr
        result = json.loads(child.stdout)
        assert not result["ok"]
        assert result["copied"] == 10
        assert result["problems"] == [
            "trials/trial-00000/locked (folder cannot be read: Permission denied)"
        ]
        assert "trials/trial-00000/locked" in result["error"]
        on_drive = files_under(setup.drive / "study" / "trials" / "trial-00000")
        assert on_drive == others


# -- 5. nothing left off silently --------------------------------------------------------------


def test_files_named_like_database_side_files_are_copied_and_only_real_ones_skipped(
    tmp_path: Path,
) -> None:
    with stand_in_drive(tmp_path) as setup:
        folder = setup.local / "study" / "trials" / "trial-00000"
        user_files = {
            "training-journal": b"epoch 1: loss 0.9\n",
            "x-wal": b"not a database's log",
            "y-shm": b"nor its shared memory",
            "y": b"a plain file beside y-shm",
            "notes.db-journal": b"notes.db beside it is no database either",
            "notes.db": b"plain text",
        }
        for name, data in user_files.items():
            write(folder / name, data)
        database = folder / "metrics.db"
        connection = sqlite3.connect(database)
        try:
            connection.execute("PRAGMA journal_mode=WAL").fetchall()
            connection.execute("PRAGMA wal_autocheckpoint=0").fetchall()
            connection.execute("CREATE TABLE loss (step, value)")
            connection.executemany(
                "INSERT INTO loss VALUES (?, ?)", [(i, 1 / (i + 1)) for i in range(50)]
            )
            connection.commit()
            # The rows are only in the WAL yet; the open connection keeps it there.
            assert database.with_name("metrics.db-wal").stat().st_size > 0

            result = setup.store.backup(folder, is_directory=True)
        finally:
            connection.close()

        assert result.ok, result.error
        on_drive = setup.drive / "study" / "trials" / "trial-00000"
        for name, data in user_files.items():
            assert (on_drive / name).read_bytes() == data, name
        assert not (on_drive / "metrics.db-wal").exists()
        assert not (on_drive / "metrics.db-shm").exists()
        copy = sqlite3.connect(f"file:{on_drive / 'metrics.db'}?mode=ro", uri=True)
        try:
            assert copy.execute("SELECT COUNT(*) FROM loss").fetchone() == (50,)
        finally:
            copy.close()


def test_a_file_replaced_by_one_of_the_same_size_and_time_is_copied_again(
    tmp_path: Path,
) -> None:
    with stand_in_drive(tmp_path) as setup:
        folder = setup.local / "study" / "trials" / "trial-00000"
        in_place = write(folder / "rewritten.bin", b"A" * 4096)
        copied_over = write(folder / "cp-p.bin", b"B" * 4096)
        moved_over = write(folder / "tar-x.bin", b"C" * 4096)
        assert setup.store.backup(folder, is_directory=True).files_copied == 3
        times = {path: os.stat(path) for path in (in_place, copied_over, moved_over)}

        # Rewritten in place, then its times set back (os.utime, as tools that keep
        # times do).
        in_place.write_bytes(b"a" * 4096)
        os.utime(in_place, ns=(times[in_place].st_atime_ns, times[in_place].st_mtime_ns))
        # cp -p from a file of the same size and modification time.
        source = write(tmp_path / "other" / "cp-p.bin", b"b" * 4096)
        os.utime(source, ns=(times[copied_over].st_atime_ns, times[copied_over].st_mtime_ns))
        subprocess.run(["cp", "-p", str(source), str(copied_over)], check=True)
        # A new file of the same size and time moved over it (tar -x, rsync, os.replace).
        newer = write(tmp_path / "other" / "tar-x.bin", b"c" * 4096)
        os.utime(newer, ns=(times[moved_over].st_atime_ns, times[moved_over].st_mtime_ns))
        os.replace(newer, moved_over)
        for path, before in times.items():
            after = os.stat(path)
            assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

        result = setup.store.backup(folder, is_directory=True)

        assert result.ok, result.error
        assert result.files_copied == 3
        assert files_under(setup.drive / "study" / "trials" / "trial-00000") == {
            "rewritten.bin": b"a" * 4096,
            "cp-p.bin": b"b" * 4096,
            "tar-x.bin": b"c" * 4096,
        }


# -- 6. one symlink rule for the whole study folder --------------------------------------------

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not for Drive"


def study_with_links(tmp_path: Path, study_dir: Path) -> None:
    """Links at the top of ``study_dir`` and in a trial folder: to a folder outside, to a
    file outside (a private key) and to a file inside."""
    datasets = tmp_path / "datasets"
    write(datasets / "train.csv", b"x,y\n1,2\n")
    key = write(tmp_path / "home" / ".ssh" / "id_rsa", SECRET)
    trial = study_dir / "trials" / "trial-00000"
    write(trial / "model.pt", b"weights")
    for folder in (study_dir, trial):
        (folder / "data").symlink_to(datasets, target_is_directory=True)
        (folder / "id_rsa").symlink_to(key)
        (folder / "best.pt").symlink_to(trial / "model.pt")


def test_links_follow_one_rule_at_the_top_of_the_study_folder_and_inside_trials(
    tmp_path: Path,
) -> None:
    with stand_in_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "study-links"
        study_dir.mkdir()
        study = optuna.create_study(storage=f"sqlite:///{study_dir / 'study.db'}")
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
        study_with_links(tmp_path, study_dir)

        report = backup_hpo_study_to_drive(setup.local, setup.store, worker=worker, timeout=60)

        assert report.ok, str(report)
        assert "Drive copy complete" in str(report)
        copy = setup.drive / "study-links"
        assert (copy / "best.pt").read_bytes() == b"weights"
        assert (copy / "trials" / "trial-00000" / "best.pt").read_bytes() == b"weights"
        everything = files_under(setup.drive)
        assert all(SECRET not in data for data in everything.values())
        assert not any(rel.endswith(("id_rsa", "train.csv")) for rel in everything)
        # Each link left out is named once in the report, whichever backup met it.
        for rel in ("data", "id_rsa", "trials/trial-00000/data", "trials/trial-00000/id_rsa"):
            named = [line for line in report.skipped if line.startswith(f"{rel} (a link to ")]
            assert len(named) == 1, (rel, report.skipped)
        assert len(report.skipped) == 4, report.skipped


LINKING_OBJECTIVE = """
import os
from pathlib import Path

from sweepsafe import trial_dir


def objective(trial):
    study_dir = Path(os.environ["SWEEPSAFE_STUDY_DIR"])
    datasets = Path(os.environ["DATASETS"])
    if not (study_dir / "data").is_symlink():
        (study_dir / "data").symlink_to(datasets, target_is_directory=True)
    folder = trial_dir(study_dir, trial)
    (folder / "data").symlink_to(datasets, target_is_directory=True)
    (folder / "result.txt").write_text("done")
    return trial.suggest_float("x", 0, 1)
"""


def test_sweepsafe_run_with_a_link_to_a_dataset_folder_exits_zero(tmp_path: Path) -> None:
    write(tmp_path / "linking.py", LINKING_OBJECTIVE.encode())
    write(tmp_path / "datasets" / "train.csv", b"x,y\n")
    (tmp_path / "drive").mkdir()
    result = run_cli(
        "run",
        "linking:objective",
        "--output-dir",
        "sweeps",
        "--study-key",
        "links",
        "--drive-dir",
        tmp_path / "drive" / "sweeps",
        "--trials",
        "2",
        cwd=tmp_path,
        env={"DATASETS": str(tmp_path / "datasets")},
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Drive copy complete" in result.stdout
    assert not list((tmp_path / "drive").rglob("train.csv"))


# -- 7. many small files at Drive's pace -------------------------------------------------------


def test_small_files_overlap_drive_latency_many_at_once(tmp_path: Path) -> None:
    # Each file costs some CPU and a local fsync besides Drive's latency, more on a busy
    # machine; a latency well above that cost keeps the ratio about Drive's latency.
    latency, count = 0.3, 32
    elapsed = {}
    for name, options in (("one-at-a-time", {"file_concurrency": 1}), ("default", {})):
        with stand_in_drive(tmp_path / name, **options) as setup:
            folder = setup.local / "study" / "trials"
            # A first backup starts the helper processes; the second is timed.
            for index in range(count):
                write(folder / f"warm-{index:02d}.json", b"{}")
            assert setup.store.backup(folder, is_directory=True).ok
            for index in range(count):
                write(folder / f"trial-{index:05d}" / "metrics.json", b'{"loss": %d}' % index)
            setup.set_faults(FaultPlan(latency_s=latency))
            started = time.monotonic()
            result = setup.store.backup(folder, is_directory=True)
            elapsed[name] = time.monotonic() - started
            assert result.ok, result.error
            assert result.files_copied == count

    assert elapsed["one-at-a-time"] >= count * latency
    # 16 at once by default: two rounds of Drive's latency instead of 32.
    assert elapsed["default"] <= elapsed["one-at-a-time"] / 6, elapsed


def test_overlapping_folder_backups_at_once_copy_each_file_once(tmp_path: Path) -> None:
    # A trial's own backup and an end-of-sweep walk of ``trials/`` can run at the same
    # time; a file one of them copied is not copied again by the other while the first
    # has yet to make its Drive folder durable.
    count = 48
    with stand_in_drive(tmp_path) as setup:
        trials = setup.local / "study" / "trials"
        write(trials / "warm.json", b"{}")
        assert setup.store.backup(trials, is_directory=True).ok
        trial = trials / "trial-00001"
        for index in range(count):
            write(trial / f"step-{index:03d}.json", b'{"loss": %d}' % index)
        setup.set_faults(FaultPlan(latency_s=0.02))

        async def both() -> list[BackupResult]:
            results: list[BackupResult] = []

            async def one(folder: Path) -> None:
                results.append(await setup.store.abackup(folder, is_directory=True))

            async with anyio.create_task_group() as group:
                group.start_soon(one, trial)
                group.start_soon(one, trials)
            return results

        results = anyio.run(both)
        assert all(r.ok for r in results), [r.error for r in results]
        assert sum(r.files_copied for r in results) == count
        walk = setup.store.backup(trials, is_directory=True)
        assert (walk.files_copied, walk.files_unchanged) == (0, count + 1)
        for index in range(count):
            local = trial / f"step-{index:03d}.json"
            assert setup.store.drive_path_for(local).read_bytes() == local.read_bytes()


def test_a_database_backup_copies_its_new_trials_folders_many_at_once(tmp_path: Path) -> None:
    # A database reaches Drive only after the folders of the trials it newly holds; 16
    # folders of one file each must not cost 16 rounds of Drive's latency.
    latency, trials = 0.25, 16
    elapsed = {}
    for name, options in (("one-at-a-time", {"file_concurrency": 1}), ("default", {})):
        with stand_in_drive(tmp_path / name, **options) as setup:
            study_dir = setup.local / "study-many"
            study_dir.mkdir()
            study = optuna.create_study(storage=f"sqlite:///{study_dir / 'study.db'}")
            assert setup.store.backup(study_dir / "study.db").ok
            # Start the helper processes, as a running sweep's backups have.
            for index in range(trials):
                write(study_dir / "warm" / f"{index}.txt", b"warm")
            assert setup.store.backup(study_dir / "warm", is_directory=True).ok
            study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=trials)
            for number in range(trials):
                write(study_dir / "trials" / f"trial-{number:05d}" / "metrics.json", b"{}")
            setup.set_faults(FaultPlan(latency_s=latency))
            started = time.monotonic()
            result = setup.store.backup(study_dir / "study.db")
            elapsed[name] = time.monotonic() - started
            assert result.ok, result.error
            on_drive = setup.drive / "study-many" / "trials"
            assert len(list(on_drive.glob("trial-*/metrics.json"))) == trials

    assert elapsed["one-at-a-time"] >= trials * latency
    assert elapsed["default"] <= elapsed["one-at-a-time"] / 3, elapsed


# -- 8. work proportional to change ------------------------------------------------------------


def test_a_sweep_scans_each_trial_folder_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sweepsafe import run_sweep, study_dir_for, trial_dir

    output = tmp_path / "local"
    trials = study_dir_for(output, "scans") / "trials"
    scans: dict[str, int] = {}
    real_scandir = os.scandir

    def counting_scandir(path: object = ".") -> object:
        folder = Path(os.fsdecode(path))  # type: ignore[arg-type]
        if trials in folder.parents:
            rel = folder.relative_to(trials).parts[0]
            scans[rel] = scans.get(rel, 0) + 1
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", counting_scandir)

    def objective(trial: optuna.Trial) -> float:
        folder = trial_dir(trials.parent, trial)
        for name in ("metrics.json", "log.txt", "plot.png"):
            write(folder / name, b"%d" % trial.number)
        return trial.suggest_float("x", 0, 1)

    with stand_in_drive(tmp_path) as setup, own_worker() as worker:
        result = run_sweep(
            objective,
            output_dir=output,
            study_key="scans",
            n_trials=30,
            backup_to_drive=setup.store,
            worker=worker,
        )
    assert result.backup_ok, str(result.backup_report)

    assert sorted(scans) == [f"trial-{n:05d}" for n in range(30)]
    # Its own job, the database's check that its files are on Drive, the final walk:
    # never once per later trial.
    assert max(scans.values()) <= 3, scans


def test_a_trial_folder_backup_appends_its_files_to_the_manifest(tmp_path: Path) -> None:
    with stand_in_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "study-journal"
        for number in range(50):
            for name in ("metrics.json", "log.txt"):
                write(study_dir / "trials" / f"trial-{number:05d}" / name, b"%d" % number)
        assert setup.store.backup(study_dir / "trials", is_directory=True).files_copied == 100
        (journal,) = (setup.local / ".sweepsafe").rglob("manifest.jsonl")
        before, inode = journal.read_bytes(), journal.stat().st_ino

        study = optuna.create_study(storage=f"sqlite:///{study_dir / 'study.db'}")
        callback = create_trial_backup_callback(study_dir, setup.store, worker=worker)
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
        (trial,) = study.get_trials()
        new = study_dir / "trials" / "trial-00000"
        for name in ("metrics.json", "log.txt", "model.pt"):
            write(new / name, b"trained again")
        callback(study, trial)
        assert worker.flush(30).ok

        after = journal.read_bytes()
        assert journal.stat().st_ino == inode
        assert after.startswith(before)
        added = [json.loads(line)["p"] for line in after[len(before) :].splitlines()]
        assert sorted(added) == [
            f"trials/trial-00000/{n}" for n in ("log.txt", "metrics.json", "model.pt")
        ]
