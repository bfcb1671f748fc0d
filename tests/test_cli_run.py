"""``sweepsafe run``, ``backup`` and ``restore`` in real subprocesses on real folders."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli_support import (
    TINY_OBJECTIVE,
    finished_numbers,
    run_cli,
    run_cli_together,
    study_databases,
    trial_params,
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A working folder holding ``tinyobj.py`` and an empty stand-in for a Drive folder."""
    (tmp_path / "tinyobj.py").write_text(TINY_OBJECTIVE)
    (tmp_path / "drive").mkdir()
    return tmp_path


def run_tiny(project: Path, trials: int, *extra: str, objective: str = "tinyobj:objective"):
    return run_cli(
        "run",
        objective,
        "--output-dir",
        "sweeps",
        "--study-key",
        "tiny",
        "--drive-dir",
        project / "drive" / "sweeps",
        "--trials",
        str(trials),
        *extra,
        cwd=project,
    )


def test_run_backs_up_every_trial_and_its_folder_to_drive(project: Path) -> None:
    result = run_tiny(project, 4)

    assert result.returncode == 0, result.stderr
    assert "Drive copy complete" in result.stdout
    (local,) = study_databases(project / "sweeps")
    (copy,) = study_databases(project / "drive" / "sweeps")
    assert local.parent.name == copy.parent.name
    assert finished_numbers(copy) == [0, 1, 2, 3]
    assert sorted(p.name for p in (copy.parent / "trials").iterdir()) == [
        f"trial-{n:05d}" for n in range(4)
    ]


def test_run_again_after_the_local_folder_is_lost_resumes_from_drive(project: Path) -> None:
    assert run_tiny(project, 4).returncode == 0
    shutil.rmtree(project / "sweeps")

    result = run_tiny(project, 6)

    assert result.returncode == 0, result.stderr
    assert "6 finished trials, 4 of them restored from Drive" in result.stdout
    (local,) = study_databases(project / "sweeps")
    assert finished_numbers(local) == [0, 1, 2, 3, 4, 5]
    assert finished_numbers(*study_databases(project / "drive" / "sweeps")) == list(range(6))
    restored = local.parent / "trials" / "trial-00000" / "result.txt"
    assert restored.is_file()


def test_run_again_on_a_finished_study_runs_no_trial(project: Path) -> None:
    assert run_tiny(project, 3).returncode == 0
    shutil.rmtree(project / "sweeps")

    result = run_tiny(project, 3)

    assert result.returncode == 0, result.stderr
    assert finished_numbers(*study_databases(project / "sweeps")) == [0, 1, 2]


def test_run_accepts_a_path_to_a_python_file(project: Path) -> None:
    result = run_tiny(project, 2, objective=str(project / "tinyobj.py") + ":objective")

    assert result.returncode == 0, result.stderr
    assert finished_numbers(*study_databases(project / "drive" / "sweeps")) == [0, 1]


def test_run_draws_a_progress_bar_on_stderr_only_when_asked(project: Path) -> None:
    quiet = run_tiny(project, 2)
    shown = run_tiny(project, 3, "--progress")

    assert quiet.stderr == ""
    assert "3/3" in shown.stderr
    assert "Drive:" in shown.stderr
    assert "\x1b[" not in shown.stdout + shown.stderr.replace("\x1b[A", "")


def test_an_objective_that_raises_stops_with_one_error_line_and_a_backup(project: Path) -> None:
    result = run_tiny(project, 3, objective="tinyobj:failing")

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("sweepsafe: error: the sweep stopped: the objective raised ValueError")
    assert "the model diverged" in last
    (copy,) = study_databases(project / "drive" / "sweeps")
    assert copy.is_file()


def test_backup_and_restore_a_folder_and_a_file(tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "runs" / "a").mkdir(parents=True)
    (local / "runs" / "a" / "weights.bin").write_bytes(b"w" * 1000)
    (local / "notes.txt").write_text("keep me\n")
    (tmp_path / "drive").mkdir()
    roots = ("--local-root", local, "--drive-root", tmp_path / "drive" / "backup")

    folder = run_cli("backup", local / "runs", *roots)
    single = run_cli("backup", local / "notes.txt", *roots)
    shutil.rmtree(local)
    local.mkdir()
    folder_back = run_cli("restore", local / "runs", *roots)
    single_back = run_cli("restore", local / "notes.txt", *roots)

    for result in (folder, single, folder_back, single_back):
        assert result.returncode == 0, result.stderr
    assert folder.stdout.startswith("Backed up ")
    assert folder_back.stdout.startswith("Restored ")
    assert (local / "runs" / "a" / "weights.bin").read_bytes() == b"w" * 1000
    assert (local / "notes.txt").read_text() == "keep me\n"


def test_ctrl_c_during_a_trial_backs_up_the_finished_trials_and_exits_130(project: Path) -> None:
    env = {**os.environ}
    env.pop("SWEEPSAFE_STUDY_DIR", None)
    command = [sys.executable, "-m", "sweepsafe", "run", "tinyobj:waits_at_trial_2"]
    command += ["--output-dir", "sweeps", "--study-key", "tiny", "--trials", "5"]
    command += ["--drive-dir", str(project / "drive" / "sweeps")]
    with subprocess.Popen(
        command, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as sweep:
        assert sweep.stdout is not None
        assert sweep.stdout.readline() == "trial 2 started\n"
        sweep.send_signal(signal.SIGINT)
        _, stderr = sweep.communicate(timeout=60)

    assert sweep.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1].startswith(
        "sweepsafe: error: interrupted, after a complete backup to Drive"
    )
    assert finished_numbers(*study_databases(project / "drive" / "sweeps")) == [0, 1]


def test_run_exits_1_and_says_so_when_the_final_backup_is_not_waited_for(project: Path) -> None:
    # A zero flush timeout gives up on the end-of-sweep copies before they can finish.
    result = run_tiny(project, 2, "--flush-timeout", "0")

    assert result.returncode == 1
    # The report once, on stdout: not a second time as a log line.
    assert result.stdout.count("Drive copy INCOMPLETE") == 1
    assert "INCOMPLETE" not in result.stderr
    # And how many finished trials lack their files on Drive, whatever the count.
    assert re.search(
        r"\d+ of the 2 finished trials of this run lack files on Drive"
        r"|The files of all 2 finished trials of this run reached Drive",
        result.stdout,
    ), result.stdout


@pytest.mark.parametrize(
    ("sampler", "pruner"), [("tpe", "median"), ("random", "none"), ("nsga2", "hyperband")]
)
def test_run_with_a_seed_runs_the_same_trials_with_or_without_backups(
    project: Path, sampler: str, pruner: str
) -> None:
    def sweep(folder: str, seed: int, *extra: str) -> list[str]:
        return [
            "run",
            "tinyobj:objective",
            "--output-dir",
            folder,
            "--study-key",
            "seeded",
            "--trials",
            "5",
            "--seed",
            str(seed),
            "--sampler",
            sampler,
            "--pruner",
            pruner,
            *extra,
        ]

    backed_up, plain, other = run_cli_together(
        sweep(
            "backed-up", 7, "--drive-dir", str(project / "drive" / "s"), "--file-concurrency", "2"
        ),
        sweep("plain", 7, "--no-backup"),
        sweep("other", 8, "--no-backup"),
        cwd=project,
    )

    for result in (backed_up, plain, other):
        assert result.returncode == 0, result.stderr
    assert "Drive copy complete" in backed_up.stdout
    assert "Drive copy" not in plain.stdout
    assert not (project / "plain" / ".sweepsafe").exists()  # no backup machinery at all
    (first,) = study_databases(project / "backed-up")
    (second,) = study_databases(project / "plain")
    (third,) = study_databases(project / "other")
    assert trial_params(first) == trial_params(second)
    assert trial_params(first) != trial_params(third)
    assert len(trial_params(first)) == 5
    (copy,) = study_databases(project / "drive" / "s")
    assert trial_params(copy) == trial_params(first)
