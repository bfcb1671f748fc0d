"""``sweepsafe status`` and ``sweepsafe verify`` on real databases, as a user runs them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cli_support import assert_one_error_line, make_study, run_cli


@pytest.fixture
def sweeps(tmp_path: Path) -> Path:
    """A folder with one sound study (values 3, 1, 2: best 1) and nothing else."""
    root = tmp_path / "sweeps"
    make_study(root / "study-sound" / "study.db", [3.0, 1.0, 2.0])
    return root


def corrupt_copy(source: Path, target: Path) -> Path:
    """A database cut short, as a copy killed half way would leave it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 3])
    return target


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def test_status_table_lists_trial_counts_best_value_and_a_passing_check(sweeps: Path) -> None:
    result = run_cli("status", sweeps)

    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split()[:6] == ["STUDY", "NAME", "COMPLETE", "PRUNED", "FAIL", "RUNNING"]
    assert row.split()[:7] == ["study-sound", "made", "3", "0", "1", "0", "1"]
    assert row.endswith("ok")
    # The columns line up: each header starts where its values do.
    assert header.index("CHECK") == row.rindex("ok")


def test_status_json_parses_and_holds_the_same_facts(sweeps: Path) -> None:
    result = run_cli("status", sweeps, "--json")

    assert result.returncode == 0, result.stderr
    (database,) = json.loads(result.stdout)["databases"]
    assert database["sound"] is True
    assert database["trial_counts"] == {"COMPLETE": 3, "FAIL": 1}
    assert database["studies"][0]["best_value"] == 1.0
    assert database["studies"][0]["directions"] == ["minimize"]
    assert database["size"] > 0


def test_status_reports_the_best_value_of_a_maximized_study(tmp_path: Path) -> None:
    make_study(tmp_path / "study-max" / "study.db", [3.0, 7.0, 5.0], direction="maximize")

    result = run_cli("status", tmp_path, "--json")

    assert json.loads(result.stdout)["databases"][0]["studies"][0]["best_value"] == 7.0


def test_status_marks_a_corrupt_study_and_exits_1(sweeps: Path) -> None:
    corrupt_copy(sweeps / "study-sound" / "study.db", sweeps / "study-broken" / "study.db")

    table = run_cli("status", sweeps)
    as_json = run_cli("status", sweeps, "--json")

    assert table.returncode == 1
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:3]}
    assert rows["study-broken"].endswith("CORRUPT")
    assert rows["study-sound"].endswith("ok")
    assert as_json.returncode == 1
    checks = {
        Path(d["path"]).parent.name: d["check"] for d in json.loads(as_json.stdout)["databases"]
    }
    assert checks == {"study-broken": "CORRUPT", "study-sound": "ok"}


def test_status_of_a_non_sqlite_file_says_so_and_exits_1(tmp_path: Path) -> None:
    notes = tmp_path / "study.db"
    notes.write_text("not a database\n")

    result = run_cli("status", tmp_path)

    assert result.returncode == 1
    assert "NOT-SQLITE" in result.stdout
    assert "is not an SQLite database" in result.stdout


def test_status_of_a_missing_folder_is_one_error_line(tmp_path: Path) -> None:
    result = run_cli("status", tmp_path / "nowhere")

    assert_one_error_line(result, "nowhere", "does not exist")
    assert result.returncode == 2


def test_status_of_a_folder_without_studies_is_one_error_line(tmp_path: Path) -> None:
    result = run_cli("status", tmp_path)

    assert_one_error_line(result, "no study folder")


def test_verify_a_sound_database_prints_its_trials_and_exits_0(sweeps: Path) -> None:
    database = sweeps / "study-sound" / "study.db"

    result = run_cli("verify", database)

    assert result.returncode == 0, result.stderr
    assert "sound (integrity check ok)" in result.stdout
    assert "4 trials (3 COMPLETE, 1 FAIL)" in result.stdout
    assert "best value 1 (minimize)" in result.stdout


def test_verify_accepts_a_study_folder_and_prints_json(sweeps: Path) -> None:
    result = run_cli("verify", sweeps / "study-sound", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["trial_counts"] == {"COMPLETE": 3, "FAIL": 1}


def test_verify_a_corrupt_database_is_one_error_line_and_exit_1(
    sweeps: Path, tmp_path: Path
) -> None:
    broken = corrupt_copy(sweeps / "study-sound" / "study.db", tmp_path / "broken.db")

    result = run_cli("verify", broken)

    assert_one_error_line(result, str(broken), "malformed")
    assert result.returncode == 1


def test_verify_a_non_sqlite_file_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")

    result = run_cli("verify", notes)

    assert_one_error_line(result, str(notes), "not an SQLite database")
    assert result.returncode == 1


def test_verify_a_missing_file_is_one_error_line(tmp_path: Path) -> None:
    result = run_cli("verify", tmp_path / "gone.db")

    assert_one_error_line(result, "gone.db", "does not exist")
    assert result.returncode == 2


def test_status_and_verify_never_modify_the_databases(sweeps: Path, tmp_path: Path) -> None:
    sound = sweeps / "study-sound" / "study.db"
    broken = corrupt_copy(sound, sweeps / "study-broken" / "study.db")
    before = {path: fingerprint(path) for path in (sound, broken)}

    run_cli("status", sweeps)
    run_cli("status", sweeps, "--json")
    run_cli("verify", sound)
    run_cli("verify", broken)

    assert {path: fingerprint(path) for path in (sound, broken)} == before
    assert sorted(p.name for p in sound.parent.iterdir()) == ["study.db"]
