"""Trial folders as training code really writes them: checkpoints rewritten while they are
copied, rotating checkpoint folders, entries Drive refuses, unreadable folders, names that
look like database side files, symlinks, many small files, and work proportional to change.

Real files and real writer processes throughout; only Drive is a stand-in.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna

from sweep_support import wait_for
from sweepsafe import DriveStore
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
CHECKPOINT_BYTES = 24 << 20


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


def test_checkpoint_rewritten_by_a_writer_process_reaches_drive_whole_at_every_backup(
    tmp_path: Path,
) -> None:
    # Shipping 24 MiB takes about 0.6 s, while the writer rewrites it every 0.3 s: a copy
    # made from the live file would be overtaken by the next version every time.
    plan = FaultPlan(latency_s=0.1, latency_per_mib_s=0.02)
    with stand_in_drive(tmp_path, plan) as setup:
        folder = setup.local / "study" / "trials" / "trial-00000"
        folder.mkdir(parents=True)
        checkpoint, log = folder / "last.pt", tmp_path / "versions.log"
        on_drive = setup.drive / "study" / "trials" / "trial-00000" / "last.pt"
        landed = 0
        with writer_process(
            CHECKPOINT_WRITER, tmp_path / "stop", checkpoint, log, CHECKPOINT_BYTES, 0.3
        ):
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


def test_checkpoint_changing_faster_than_it_can_be_captured_is_named_never_backed_up(
    tmp_path: Path,
) -> None:
    with stand_in_drive(tmp_path) as setup:
        folder = setup.local / "study" / "trials" / "trial-00000"
        write(folder / "metrics.json", b'{"loss": 0.5}')
        checkpoint, log = folder / "last.pt", tmp_path / "versions.log"
        on_drive = setup.drive / "study" / "trials" / "trial-00000"
        with writer_process(RESTLESS_WRITER, tmp_path / "stop", checkpoint, log, CHECKPOINT_BYTES):
            wait_for(lambda: versions_written(log) > 0, 30, "a first version")

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
