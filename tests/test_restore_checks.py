"""Restore, history, status and verify on damaged local studies and tampered Drive folders."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from drive_support import (
    DriveSetup,
    complete_trial_numbers,
    make_study,
    objective,
    simulated_drive,
)
from sweepsafe import run_sweep, study_dir_for
from sweepsafe.cli._restore import _moment
from sweepsafe.cli._status import iso_time
from sweepsafe.drive._sqlite import recover_hot_journal
from sweepsafe.errors import StudyConflictError
from sweepsafe.testing import FaultPlan, simulated_store

optuna.logging.set_verbosity(optuna.logging.WARNING)

_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sqlite3, sys
    connection = sqlite3.connect(sys.argv[1], isolation_level=None)
    connection.execute("PRAGMA cache_size=1")  # spill pages to the file before COMMIT
    connection.execute("BEGIN IMMEDIATE")
    connection.execute("CREATE TABLE spill(x)")
    for _ in range(2000):
        connection.execute("INSERT INTO spill VALUES (?)", ("x" * 500,))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def leave_hot_journal(database: Path) -> None:
    """A writer SIGKILLed mid-transaction: ``study.db-journal`` is hot."""
    child = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(database)], check=False)
    assert child.returncode == -signal.SIGKILL
    journal = database.with_name(database.name + "-journal")
    assert journal.exists()
    assert journal.stat().st_size > 0


def test_restore_never_replaces_a_local_study_ahead_of_drive_left_with_a_hot_journal(
    tmp_path: Path,
) -> None:
    # The runtime backed up 3 trials, finished 2 more, then was killed in the middle of
    # a write: its study (5 finished trials once SQLite rolls the journal back) is ahead
    # of Drive. `sweepsafe restore` must not put the 3-trial copy in its place.
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        url = make_study(database, n_trials=3)
        assert setup.store.backup(database).ok
        optuna.load_study(study_name="study", storage=url).optimize(objective, n_trials=2)
        leave_hot_journal(database)

        # The study folder goes to a new disk as it was (its journal with it); the new
        # runtime has no record of what it backed up.
        moved = tmp_path / "new-disk"
        (moved / "study-1").mkdir(parents=True)
        for name in ("study.db", "study.db-journal"):
            shutil.copyfile(database.parent / name, moved / "study-1" / name)
        with simulated_store(moved, setup.drive, FaultPlan()) as other:
            target = moved / "study-1" / "study.db"
            result = other.restore(target)

        # Whatever the verdict, the five finished trials are still on local disk.
        recover_hot_journal(target)
        assert len(complete_trial_numbers(target)) == 5, (result.ok, result.error, result.notes)


def test_restore_does_not_report_keeping_a_damaged_local_study_that_holds_nothing(
    tmp_path: Path,
) -> None:
    # The runtime that backed the study up is still there, but its study.db was cut short
    # (a full disk, a bad copy): `sweepsafe restore` is exactly what the user runs next.
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        make_study(database, n_trials=4)
        assert setup.store.backup(database).ok
        database.write_bytes(database.read_bytes()[:1000])

        result = setup.store.restore(database)

        assert not any("holds every finished trial" in n for n in result.notes), result.notes
        assert result.ok, result.error
        assert len(complete_trial_numbers(database)) == 4


def test_asking_for_a_generation_thinned_away_says_so_instead_of_calling_drive_damaged(
    tmp_path: Path,
) -> None:
    now = [1_800_000_000.0]
    with simulated_drive(
        tmp_path, keep_generations=2, compact_fraction=0.0, clock=lambda: now[0]
    ) as setup:
        database = setup.local / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        for value in range(5):
            study.add_trial(optuna.trial.create_trial(value=float(value)))
            assert setup.store.backup(database).ok
            now[0] += 2 * 3600  # every base is archived; two are kept: 4 and 5
        oldest = min(g.number for g in setup.store.history(database))
        assert oldest == 4

        for asked in (1, 0):
            result = setup.store.restore(database, generation=asked)
            assert not result.ok
            error = result.error or ""
            # The history is healthy: only the generation asked for is not kept.
            assert "damaged" not in error, error
            assert "no generation" not in error, error
            assert f"generation {asked}" in error, error
            assert str(oldest) in error, error


def generations_backed_up(setup: DriveSetup, count: int) -> Path:
    """A study backed up after each of its ``count`` trials: generations 1 to ``count``."""
    database = setup.local / "study-1" / "study.db"
    database.parent.mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
    for _ in range(count):
        study.tell(study.ask(), 1.0)
        assert setup.store.backup(database).ok
    return database


def five_generations_with_a_broken_chain(setup: DriveSetup) -> Path:
    """Generations 1 (a base) to 5 (patches); patch 3 is lost and patch 5's body damaged."""
    database = generations_backed_up(setup, 5)
    folder = setup.drive / "study-1" / ".sweepsafe" / "history" / "study.db"
    (lost,) = folder.glob("00000003-*.patch")
    lost.unlink()
    (damaged,) = folder.glob("00000005-*.patch")
    data = bytearray(damaged.read_bytes())
    data[-40] ^= 0x40  # in the compressed body, not the header
    damaged.write_bytes(bytes(data))
    return database


def test_history_names_every_generation_a_restore_cannot_rebuild(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        database = five_generations_with_a_broken_chain(setup)

        listed = {g.number: g for g in setup.store.history(database)}

        # `problem` is documented as "why it cannot be restored, or null".
        for number in (4, 5):
            assert listed[number].problem is not None, listed[number]
            assert not setup.store.restore(database, generation=number).ok
        assert listed[2].problem is None


def test_verify_of_a_drive_copy_whose_newest_generation_cannot_be_rebuilt_is_not_ok(
    tmp_path: Path,
) -> None:
    # The README: `sweepsafe verify .../study.db && echo "safe to resume"`. A resume from
    # this Drive copy is refused (its newest generations cannot be rebuilt).
    with simulated_drive(tmp_path) as setup:
        database = five_generations_with_a_broken_chain(setup)
        shutil.rmtree(setup.local / "study-1")
        refused = setup.store.restore(database)
        assert not refused.ok

        verified = setup.store.verify(database)

        assert not verified.ok, verified
        assert "generation 3 is missing on Drive" in (verified.error or ""), verified.error


@pytest.mark.parametrize("damage", ["emptied", "body damaged", "header damaged"])
def test_verify_reads_the_patches_between_the_base_and_the_newest_generation(
    tmp_path: Path, damage: str
) -> None:
    # A patch in the middle of the chain, damaged on Drive: the newest generation cannot
    # be rebuilt, so a resume is refused; verify must not call the copy sound.
    with simulated_drive(tmp_path) as setup:
        database = generations_backed_up(setup, 5)
        folder = setup.drive / "study-1" / ".sweepsafe" / "history" / "study.db"
        (middle,) = folder.glob("00000003-*.patch")
        data = bytearray(middle.read_bytes())
        if damage == "emptied":
            data = bytearray()
        elif damage == "body damaged":
            data[-40] ^= 0x40
        else:
            data[12] ^= 0x40
        middle.write_bytes(bytes(data))
        shutil.rmtree(setup.local / "study-1")
        assert not setup.store.restore(database).ok

        verified = setup.store.verify(database)

        assert not verified.ok, verified
        assert "generation 3 is damaged on Drive" in (verified.error or ""), verified.error


def test_a_base_file_copied_under_a_newer_number_is_not_restored_as_the_newest(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        database = generations_backed_up(setup, 5)
        folder = setup.drive / "study-1" / ".sweepsafe" / "history" / "study.db"
        # Generation 1's base, duplicated under number 9 (its record still says 1).
        for old in folder.glob("00000001-*"):
            if old.suffix in (".json", ".db"):
                shutil.copyfile(old, folder / ("00000009" + old.name[8:]))
        shutil.rmtree(setup.local / "study-1")

        result = setup.store.restore(database)

        # The copy's record says generation 1: "generation 9" is damage, named as such,
        # with the newest generation that can be rebuilt; nothing comes back meanwhile.
        assert not result.ok
        assert "generation 5 is the newest that can" in (result.error or ""), result.error
        assert not database.exists()
        chosen = setup.store.restore(database, generation=5)
        assert chosen.ok, chosen.error
        assert len(complete_trial_numbers(database)) == 5


def test_restoring_a_study_folder_brings_back_its_newest_generation(tmp_path: Path) -> None:
    # docs/cli.md restores a whole study folder (`sweepsafe restore .../study-3f2a`). Its
    # plain study.db on Drive is only the last base; the patches after it are the newer
    # generations a restore of the database itself brings back.
    with simulated_drive(tmp_path) as setup:
        database = generations_backed_up(setup, 5)
        shutil.rmtree(setup.local / "study-1")

        result = setup.store.restore(setup.local / "study-1", is_directory=True)

        assert result.ok, result.error
        assert len(complete_trial_numbers(database)) == 5


def test_a_generation_asked_for_a_study_folder_is_not_silently_ignored(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup:
        database = generations_backed_up(setup, 5)
        shutil.rmtree(setup.local / "study-1")

        # `sweepsafe restore .../study-1 --generation 2`, to undo what came after it.
        result = setup.store.restore(setup.local / "study-1", is_directory=True, generation=2)

        # Refused, saying to give the database: nothing comes back as if it were asked for.
        assert not result.ok
        assert "--generation" in (result.error or ""), result.error
        assert str(database) in (result.error or ""), result.error
        assert not database.exists()


def test_before_the_time_history_prints_for_a_generation_brings_that_generation_back(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        database = generations_backed_up(setup, 3)
        newest = setup.store.history(database)[0]
        assert newest.number == 3
        assert newest.created is not None
        # `history` prints whole seconds (e.g. 2026-11-29 05:01:50); the user copies it.
        printed = iso_time(newest.created)
        assert printed is not None

        result = setup.store.restore(database, before=_moment(printed))

        assert result.ok, result.error
        assert result.generation == 3, result


def test_status_does_not_call_a_study_left_by_a_killed_writer_corrupt(tmp_path: Path) -> None:
    # A runtime killed mid-write leaves study.db-journal; SQLite rolls it back at the next
    # read-write open (sweepsafe run does). "CORRUPT ... do not restore from it" would send
    # the user to Drive's older copy.
    database = tmp_path / "out" / "study-1" / "study.db"
    make_study(database, n_trials=4)
    leave_hot_journal(database)
    before = {p.name: p.read_bytes() for p in database.parent.iterdir()}

    status = subprocess.run(
        [sys.executable, "-m", "sweepsafe", "status", str(tmp_path / "out"), "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )

    assert status.returncode == 0, status.stdout + status.stderr
    (row,) = json.loads(status.stdout)["databases"]
    assert row["sound"], row
    assert row["trial_counts"].get("COMPLETE") == 4, row
    # status never changes a database, even to roll a journal back.
    assert {p.name: p.read_bytes() for p in database.parent.iterdir()} == before


def test_a_local_study_and_a_drive_copy_that_diverged_are_both_kept_and_the_way_on_named(
    tmp_path: Path,
) -> None:
    """Runtime A went on without Drive while runtime B continued from Drive: each holds
    a finished trial the other lacks. A's next start replaces neither and says how to
    go on, in the library's words and the command's."""
    with simulated_drive(tmp_path) as setup:
        first = run_sweep(
            objective,
            output_dir=setup.local,
            study_key="s",
            n_trials=2,
            backup_to_drive=setup.store,
        )
        assert first.backup_ok
        database = study_dir_for(setup.local, "s") / "study.db"
        url = f"sqlite:///{database}"
        (name,) = optuna.get_all_study_names(url)
        optuna.load_study(study_name=name, storage=url).optimize(objective, n_trials=1)
        here_only = complete_trial_numbers(database)

        other = tmp_path / "other"
        other.mkdir()
        store = simulated_store(other, setup.drive, setup.plan_path)
        try:
            second = run_sweep(
                objective, output_dir=other, study_key="s", n_trials=3, backup_to_drive=store
            )
            assert second.backup_ok
        finally:
            store.close()
        on_drive = complete_trial_numbers(study_dir_for(other, "s") / "study.db")

        with pytest.raises(StudyConflictError) as raised:
            run_sweep(
                objective,
                output_dir=setup.local,
                study_key="s",
                n_trials=4,
                backup_to_drive=setup.store,
            )
    message = str(raised.value)
    assert "\n" not in message
    assert f"the local {database} and its Drive copy have diverged" in message
    assert f"Move {database.parent} away" in message
    assert "restore=False (sweepsafe run --no-restore)" in message
    # Neither side lost a trial.
    assert complete_trial_numbers(database) == here_only
    assert len(here_only) == 3
    assert len(on_drive) == 3
