"""Every bad input to ``sweepsafe`` ends in one clear line on stderr and a non-zero status."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from cli_support import TINY_OBJECTIVE, assert_one_error_line, run_cli


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tinyobj.py").write_text(TINY_OBJECTIVE)
    (tmp_path / "broken_import.py").write_text("import json\nraise RuntimeError('no GPU here')\n")
    (tmp_path / "bad_syntax.py").write_text("def objective(trial)\n    return 1\n")
    (tmp_path / "drive").mkdir()
    return tmp_path


def run_objective(project: Path, objective: str, *extra: str, env: dict[str, str] | None = None):
    return run_cli(
        "run",
        objective,
        "--output-dir",
        project / "sweeps",
        "--study-key",
        "k",
        "--drive-dir",
        project / "drive" / "sweeps",
        *extra,
        cwd=project,
        env=env,
    )


@pytest.mark.parametrize(
    ("objective", "fragments"),
    [
        ("no_such_module:objective", ["'no_such_module'", "No module named 'no_such_module'"]),
        ("broken_import:objective", ["'broken_import'", "RuntimeError: no GPU here"]),
        ("bad_syntax:objective", ["'bad_syntax'", "SyntaxError"]),
        ("tinyobj:missing", ["no function 'missing'"]),
        ("tinyobj", ["is not MODULE:FUNCTION"]),
        ("tinyobj:os", ["is a module, not a function"]),
        ("nowhere/model.py:objective", ["does not exist"]),
    ],
)
def test_an_objective_that_cannot_be_loaded_is_named_with_its_import_error(
    project: Path, objective: str, fragments: list[str]
) -> None:
    result = run_objective(project, objective)

    assert_one_error_line(result, *fragments)
    assert result.returncode == 2
    assert not (project / "sweeps").exists()


def test_a_local_folder_on_drive_is_refused_with_the_drive_path_message(project: Path) -> None:
    result = run_cli(
        "run",
        "tinyobj:objective",
        "--output-dir",
        project / "drive" / "sweeps",
        "--study-key",
        "k",
        "--drive-dir",
        project / "elsewhere",
        cwd=project,
        env={"SWEEPSAFE_DRIVE_ROOTS": str(project / "drive")},
    )

    assert_one_error_line(result, "is on Google Drive", "local disk")
    assert result.returncode == 2


def test_an_unmounted_drive_is_reported_before_anything_runs(project: Path) -> None:
    unmounted = project / "gdrive"
    result = run_objective(
        project,
        "tinyobj:objective",
        "--drive-dir",
        str(unmounted / "sweeps"),
        env={"SWEEPSAFE_DRIVE_ROOTS": str(unmounted)},
    )

    assert_one_error_line(result, "Google Drive is not mounted", str(unmounted))
    assert result.returncode == 2


def test_run_without_drive_dir_off_colab_says_it_is_required(project: Path) -> None:
    result = run_cli(
        "run", "tinyobj:objective", "--output-dir", "sweeps", "--study-key", "k", cwd=project
    )

    assert_one_error_line(result, "--drive-dir is required")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["demo", "--progress", "--no-progress"], ["not allowed with"]),
        (["demo", "--trials", "0"], ["--trials", "at least 1"]),
        (["demo", "--trials", "many"], ["--trials", "not a whole number"]),
        (["demo", "--drive-latency", "-1"], ["negative"]),
        (["run", "tinyobj:objective"], ["required", "--output-dir"]),
        (["launch"], ["invalid choice: 'launch'"]),
        ([], ["required", "COMMAND"]),
    ],
)
def test_bad_options_are_one_line_not_a_usage_dump(
    project: Path, args: list[str], fragments: list[str]
) -> None:
    result = run_cli(*args, cwd=project)

    assert_one_error_line(result, *fragments)
    assert result.returncode == 2


def test_a_drive_folder_inside_the_output_folder_conflicts(project: Path) -> None:
    result = run_cli(
        "run",
        "tinyobj:objective",
        "--output-dir",
        "sweeps",
        "--study-key",
        "k",
        "--drive-dir",
        "sweeps/drive-copy",
        cwd=project,
    )

    assert_one_error_line(result, "conflicting options", "overlap")


def test_backup_of_a_path_outside_the_local_root_conflicts(project: Path) -> None:
    (project / "local").mkdir()
    result = run_cli(
        "backup",
        project / "tinyobj.py",
        "--local-root",
        project / "local",
        "--drive-root",
        project / "drive" / "b",
    )

    assert_one_error_line(result, "conflicting options", "not inside --local-root")


def test_backup_of_a_missing_file_and_restore_without_a_drive_copy(project: Path) -> None:
    (project / "local").mkdir()
    roots = ("--local-root", project / "local", "--drive-root", project / "drive" / "b")

    missing = run_cli("backup", project / "local" / "gone.db", *roots)
    no_copy = run_cli("restore", project / "local" / "study.db", *roots)

    assert_one_error_line(missing, "gone.db", "does not exist")
    assert_one_error_line(no_copy, "holds no copy")


def test_demo_refuses_a_workdir_that_is_not_empty(project: Path) -> None:
    result = run_cli("demo", "--workdir", project)

    assert_one_error_line(result, "not an empty folder")


def test_verbose_shows_the_import_traceback(project: Path) -> None:
    result = run_objective(project, "broken_import:objective", "--verbose")

    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("sweepsafe: error: cannot import")


def test_verbose_is_accepted_before_the_command(project: Path) -> None:
    result = run_cli(
        "--verbose",
        "run",
        "broken_import:objective",
        "--output-dir",
        "sweeps",
        "--study-key",
        "k",
        "--drive-dir",
        project / "drive" / "sweeps",
        cwd=project,
    )

    assert "Traceback" in result.stderr
    assert result.returncode == 2


def test_run_on_a_corrupt_local_study_is_one_error_line(project: Path) -> None:
    from sweepsafe import study_dir_for

    database = study_dir_for(project / "sweeps", "k") / "study.db"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"SQLite format 3\x00" + b"\xff" * 2000)

    result = run_objective(project, "tinyobj:objective")

    assert_one_error_line(result, str(database), "move it away")
    assert result.returncode == 1


def test_an_output_dir_that_is_a_file_is_bad_input(project: Path) -> None:
    (project / "sweeps").write_text("not a folder\n")

    result = run_objective(project, "tinyobj:objective")

    assert_one_error_line(result, "--output-dir", "is a file, not a folder")
    assert result.returncode == 2


def test_a_sqlite_file_that_is_not_an_optuna_study_is_refused_and_left_unchanged(
    project: Path,
) -> None:
    from sweepsafe import study_dir_for

    database = study_dir_for(project / "sweeps", "k") / "study.db"
    database.parent.mkdir(parents=True)
    connection = sqlite3.connect(database)
    connection.execute("CREATE TABLE notes (line TEXT)")
    connection.execute("INSERT INTO notes VALUES ('my own data')")
    connection.commit()
    connection.close()
    before = database.read_bytes()

    result = run_objective(project, "tinyobj:objective")

    assert_one_error_line(result, str(database), "not an Optuna study", "Move it away")
    assert database.read_bytes() == before
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    tables = connection.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    connection.close()
    assert tables == [("notes",)]


def test_backup_of_a_fifo_says_it_is_not_a_regular_file(project: Path) -> None:
    (project / "local").mkdir()
    os.mkfifo(project / "local" / "pipe")

    result = run_cli(
        "backup",
        project / "local" / "pipe",
        "--local-root",
        project / "local",
        "--drive-root",
        project / "drive" / "b",
    )

    assert_one_error_line(result, "pipe", "is not a regular file")
    assert "does not exist" not in result.stderr
