"""The README's own-``study.optimize`` recipe, run as written, on two runtimes in turn."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna

from replica_support import DriveObserver, finished_numbers, sampling
from sweep_support import wait_while_running

README = Path(__file__).resolve().parent.parent / "README.md"
# Instrumentation the test adds to the recipe: trial 2 of the first runtime hangs until
# the runtime is killed, so it dies with a trial left RUNNING, as a disconnect leaves it.
HOOK = """
import os as _os, threading as _threading
def _test_hook(trial):
    print(f"trial {trial.number} started", flush=True)
    if trial.number == int(_os.environ.get("HANG_AT_TRIAL", "-1")):
        _threading.Event().wait()
"""


def recipe_script(tmp_path: Path, local: Path, drive: Path, n_trials: int) -> Path:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## With your own `study.optimize`") :]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    assert '"/content/sweeps"' in block
    assert '"/content/drive/MyDrive/sweeps"' in block
    block = block.replace('"/content/sweeps"', repr(str(local)))
    block = block.replace('"/content/drive/MyDrive/sweeps"', repr(str(drive)))
    block = block.replace("remaining_trials(study, 100)", f"remaining_trials(study, {n_trials})")
    block = block.replace(
        "def objective(trial):\n", "def objective(trial):\n    _test_hook(trial)\n"
    )
    script = tmp_path / f"recipe-{n_trials}.py"
    script.write_text(HOOK + block)
    return script


def run(script: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        start_new_session=True,
    )


def test_the_readme_recipe_resumes_on_a_second_runtime_without_losing_or_adding_trials(
    tmp_path: Path,
) -> None:
    drive = tmp_path / "drive"
    drive.mkdir()
    observer = DriveObserver(tmp_path, drive)
    drive_db = drive / "study-resnet" / "study.db"
    try:
        # Runtime 1 gets through two trials, then dies during the third.
        first = run(recipe_script(tmp_path, tmp_path / "disk-1", drive, 8), HANG_AT_TRIAL="2")
        assert first.stdout is not None
        for line in first.stdout:
            if line == "trial 2 started\n":
                break
        wait_while_running(
            first,
            lambda: (observer.newest_finished(drive_db) or 0) >= 2,
            "Drive listed two finished trials",
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)
        # Whether the dead runtime's trial 2 reached Drive as RUNNING depends on when its
        # last snapshot was taken (before or after trial 2 began): read it, as it is.
        at_kill = observer.restored_study(drive / "study-resnet", tmp_path / "at-kill")
        left_running = [
            t.number
            for t in at_kill.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.RUNNING
        ]

        # Runtime 2, a fresh disk, runs the same cell; then the cell is run once more.
        script = recipe_script(tmp_path, tmp_path / "disk-2", drive, 8)
        with sampling(lambda: observer.newest_finished(drive_db)) as seen:
            second = run(script)
            out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        assert "Drive copy complete" in out
        again = run(script)
        out_again, err_again = again.communicate(timeout=120)
        assert again.returncode == 0, err_again
        assert "trial " not in out_again.replace("trials", "")  # no trial ran

        assert seen == sorted(seen)  # the Drive copy never went backwards
        storage = f"sqlite:///{tmp_path / 'disk-2' / 'study-resnet' / 'study.db'}"
        study = optuna.load_study(study_name="resnet", storage=storage)
        assert len(finished_numbers(study)) == 8  # the trials still missing, not 8 more
        states = [t.state for t in study.get_trials(deepcopy=False)]
        assert optuna.trial.TrialState.RUNNING not in states
        # The trial the dead runtime left running on Drive was marked failed, not rerun;
        # no other trial failed.
        failed = [n for n, state in enumerate(states) if state == optuna.trial.TrialState.FAIL]
        assert failed == left_running
        restored = observer.restored_study(drive / "study-resnet", tmp_path / "check")
        assert finished_numbers(restored) == finished_numbers(study)
        notes = sorted((tmp_path / "check" / "study-resnet" / "trials").rglob("notes.txt"))
        assert len(notes) == 8
    finally:
        observer.close()
