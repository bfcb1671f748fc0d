"""``sweepsafe history`` and ``sweepsafe restore --generation / --before`` in real processes.

The study is real and backed up several times by a real store, so the Drive folder
holds a base and patches, as a sweep leaves them.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
import pytest

from cli_support import assert_one_error_line, finished_numbers, run_cli
from drive_support import simulated_drive
from sweepsafe.testing import FaultPlan, simulated_store

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Backed:
    """A study backed up as generations 1 (a base) to 4 (patches), and the paths."""

    local: Path
    drive: Path
    database: Path
    finished: dict[int, list[int]]
    """Finished trial numbers per generation."""


@pytest.fixture
def backed(tmp_path: Path) -> Backed:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        finished: dict[int, list[int]] = {}
        for round_ in range(4):
            for _ in range(2):
                study.tell(study.ask(), float(10 - round_))
            result = setup.store.backup(database)
            assert result.ok, result.error
            assert result.generation is not None
            finished[result.generation] = [t.number for t in study.trials]
        del study
        setup.store.release()  # the sweep is over: the command may take the study
    assert sorted(finished) == [1, 2, 3, 4]
    return Backed(setup.local, setup.drive, database, finished)


def history_json(backed: Backed) -> list[dict[str, object]]:
    result = run_cli("history", "--json", backed.drive / "study-1")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)["generations"]
    return rows


def test_history_lists_each_generation_with_time_trials_best_and_size(backed: Backed) -> None:
    result = run_cli("history", backed.drive / "study-1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("4 generations kept")
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["4", "3", "2", "1"]
    assert [int(row[3]) for row in rows] == [8, 6, 4, 2]  # finished trials
    assert [float(row[4]) for row in rows] == [7.0, 8.0, 9.0, 10.0]  # best value
    assert [row[-1] for row in rows] == ["patch", "patch", "patch", "base"]
    assert rows[-1][-3:-1] != rows[0][-3:-1]  # a whole base is larger than a patch

    generations = history_json(backed)
    assert [g["generation"] for g in generations] == [4, 3, 2, 1]
    assert [g["finished_trials"] for g in generations] == [8, 6, 4, 2]
    created = [float(str(g["created"])) for g in generations]
    assert created == sorted(created, reverse=True)
    sizes = {g["kind"]: g["size"] for g in generations}
    assert int(str(sizes["base"])) > int(str(sizes["patch"]))


def test_restore_generation_brings_it_back_sets_the_local_one_aside_and_says_so(
    backed: Backed,
) -> None:
    before = backed.database.read_bytes()
    result = run_cli(
        "restore",
        backed.database,
        "--local-root",
        backed.local,
        "--drive-root",
        backed.drive,
        "--generation",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "generation 2, 4 finished trials" in result.stdout
    assert "generation 2 is the newest on Google Drive again, as generation 5" in result.stdout
    (aside_line,) = [line for line in result.stdout.splitlines() if "set aside as" in line]
    aside = Path(aside_line.rsplit(" as ", 1)[1])
    assert aside.name.startswith("study.db.before-restore-")
    assert aside.read_bytes() == before
    assert finished_numbers(backed.database) == backed.finished[2]

    # Drive's history shows the rollback, and keeps what it rolled back over.
    generations = history_json(backed)
    assert (generations[0]["generation"], generations[0]["kind"]) == (5, "base")
    assert {int(str(g["generation"])) for g in generations} == {1, 2, 3, 4, 5}
    assert generations[0]["finished_trials"] == 4

    # A later runtime goes on from the restored generation, with patches.
    with simulated_store(backed.local, backed.drive, FaultPlan()) as store:
        study = optuna.load_study(study_name="s", storage=f"sqlite:///{backed.database}")
        study.tell(study.ask(), 0.5)
        del study
        published = store.backup(backed.database)
        assert published.ok, published.error
        assert published.generation == 6
        assert published.bytes_copied < backed.database.stat().st_size / 4
        assert store.verify(backed.database).integrity_ok


def test_restore_before_a_time_printed_by_history_reads_it_as_utc(backed: Backed) -> None:
    created = {int(str(g["generation"])): float(str(g["created"])) for g in history_json(backed)}
    between = (created[2] + created[3]) / 2
    moment = datetime.fromtimestamp(between, tz=timezone.utc).replace(tzinfo=None)
    result = run_cli(
        "restore",
        backed.database,
        "--local-root",
        backed.local,
        "--drive-root",
        backed.drive,
        "--before",
        moment.isoformat(),
        env={"TZ": "Asia/Tokyo"},  # nine hours off UTC: a local reading would pick wrong
    )
    assert result.returncode == 0, result.stderr
    assert "generation 2, 4 finished trials" in result.stdout
    assert finished_numbers(backed.database) == backed.finished[2]


def test_restore_before_a_time_with_an_offset(backed: Backed) -> None:
    created = {int(str(g["generation"])): float(str(g["created"])) for g in history_json(backed)}
    tokyo = timezone(timedelta(hours=9))
    moment = datetime.fromtimestamp((created[3] + created[4]) / 2, tz=tokyo)
    result = run_cli(
        "restore",
        backed.database,
        "--local-root",
        backed.local,
        "--drive-root",
        backed.drive,
        "--before",
        moment.isoformat(),
    )
    assert result.returncode == 0, result.stderr
    assert "generation 3, 6 finished trials" in result.stdout


def restore_args(backed: Backed, *options: str) -> list[str | Path]:
    return [
        "restore",
        backed.database,
        "--local-root",
        backed.local,
        "--drive-root",
        backed.drive,
        *options,
    ]


def test_restore_of_a_generation_drive_does_not_keep_is_one_error_line(backed: Backed) -> None:
    before = backed.database.read_bytes()
    result = run_cli(*restore_args(backed, "--generation", "9"))
    assert_one_error_line(result, "generation 9", "does not exist", "the newest is 4")
    assert backed.database.read_bytes() == before


def test_restore_of_a_generation_of_a_folder_is_refused_as_bad_input(backed: Backed) -> None:
    # A generation belongs to one database: the command says which path to give, exit 2.
    before = backed.database.read_bytes()
    args = restore_args(backed, "--generation", "2")
    args[1] = backed.database.parent
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert_one_error_line(result, "is a folder", "--generation", str(backed.database))
    assert backed.database.read_bytes() == before


def test_restore_before_every_generation_is_one_error_line(backed: Backed) -> None:
    before = backed.database.read_bytes()
    result = run_cli(*restore_args(backed, "--before", "2001-01-01T00:00"))
    assert_one_error_line(result, "2001-01-01 00:00:00 UTC", "the oldest kept is from")
    assert backed.database.read_bytes() == before


def test_restore_generation_while_another_runtime_backs_the_study_up_is_refused(
    backed: Backed,
) -> None:
    before = backed.database.read_bytes()
    with simulated_store(backed.local, backed.drive, FaultPlan()) as store:
        store.acquire(backed.database.parent)  # a sweep is running on this study
        result = run_cli(*restore_args(backed, "--generation", "2"))
        store.release()
    assert_one_error_line(result, "another runtime", "takeover")
    assert backed.database.read_bytes() == before
    assert [g["generation"] for g in history_json(backed)] == [4, 3, 2, 1]


def test_history_of_a_folder_without_generations_is_one_error_line(tmp_path: Path) -> None:
    folder = tmp_path / "drive" / "study-1"
    folder.mkdir(parents=True)
    connection = sqlite3.connect(folder / "study.db")
    connection.execute("CREATE TABLE t (x)")
    connection.close()
    result = run_cli("history", folder)
    assert result.returncode == 2
    assert_one_error_line(result, "no generations", "study.db")
