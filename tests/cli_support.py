"""Helpers for the command-line tests: run ``python -m sweepsafe`` and read what it left."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

TINY_OBJECTIVE = """\
import os
import time
from pathlib import Path

from sweepsafe import trial_dir


def objective(trial):
    x = trial.suggest_float("x", -3.0, 3.0)
    folder = trial_dir(os.environ["SWEEPSAFE_STUDY_DIR"], trial)
    (folder / "result.txt").write_text(f"{x}\\n")
    return x * x


def waits_at_trial_2(trial):
    x = trial.suggest_float("x", -3.0, 3.0)
    if trial.number == 2:
        print("trial 2 started", flush=True)
        # Training steps, stopped by the test's Ctrl-C. Not one long sleep: a signal that
        # lands between the print and the sleep's start would wait for the sleep to end.
        for _ in range(600):
            time.sleep(0.1)
    return x * x


def failing(trial):
    trial.suggest_float("x", -3.0, 3.0)
    raise ValueError("the model diverged")
"""


def run_cli(
    *args: str | os.PathLike[str],
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sweepsafe ARGS`` in a real subprocess and capture its output."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("SWEEPSAFE_STUDY_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "sweepsafe", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli_together(
    *commands: Sequence[str | os.PathLike[str]], cwd: Path, timeout: float = 120.0
) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``python -m sweepsafe`` commands at once; their results, in order."""
    env = {**os.environ}
    env.pop("SWEEPSAFE_STUDY_DIR", None)
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "sweepsafe", *map(str, args)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    results = []
    for process in running:
        with process:
            stdout, stderr = process.communicate(timeout=timeout)
        results.append(
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        )
    return results


def assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed with exactly one ``sweepsafe: error:`` line holding ``fragments``."""
    assert result.returncode != 0, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = lines[0]
    assert line.startswith("sweepsafe: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def study_databases(folder: Path) -> list[Path]:
    """Every ``study-*/study.db`` under ``folder``."""
    return sorted(folder.glob("study-*/study.db"))


def finished_numbers(database: Path) -> list[int]:
    """Numbers of the finished trials of the only study in ``database``, read with Optuna."""
    storage = f"sqlite:///{database}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return [trial.number for trial in study.get_trials(deepcopy=False, states=FINISHED)]


def trial_params(database: Path) -> list[dict[str, object]]:
    """The parameters of every trial of the only study in ``database``, in trial order."""
    storage = f"sqlite:///{database}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return [trial.params for trial in study.get_trials(deepcopy=False)]


def make_study(database: Path, values: list[float], *, direction: str = "minimize") -> None:
    """Write an Optuna study with one COMPLETE trial per value, and one FAIL trial."""
    database.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=f"sqlite:///{database}", study_name="made", direction=direction
    )
    for value in values:
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": value},
                distributions={"x": optuna.distributions.FloatDistribution(-100.0, 100.0)},
                value=value,
            )
        )
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    # Optuna keeps its engine open; let it go so the file is quiet for the test.
    del study
