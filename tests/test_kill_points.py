"""SIGKILLs at chosen Drive-side operations: a helper alone, thinning, going back.

Real processes and real signals: the runtime (``kill_point_runtime.py``) talks to a Drive
helper (``kill_point_helper.py``) that stops for good at one chosen operation, and the
test kills the runtime, or only that helper, there. Then a new runtime must find a
Drive copy that restores whole, with every finished trial Drive had, and carry on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from drive_support import temp_files
from replica_support import DriveObserver, finished_numbers
from sweepsafe import study_dir_for

RUNTIME = Path(__file__).with_name("kill_point_runtime.py")
KEY = "kill-points"
WAIT_S = 60.0

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Runtime:
    """One run of ``kill_point_runtime.py`` in a session of its own."""

    def __init__(self, tmp_path: Path, action: str, *extra: str, stop: dict[str, Any]) -> None:
        self.local = tmp_path / "local"
        self.drive = tmp_path / "drive"
        self.marker = tmp_path / f"stopped-{time.monotonic_ns()}.json"
        config = tmp_path / f"stop-{time.monotonic_ns()}.json"
        config.write_text(json.dumps({"marker": str(self.marker), "skip": 0, **stop}))
        command = [sys.executable, str(RUNTIME), action, "--local", str(self.local)]
        command += ["--drive", str(self.drive), "--stop", str(config), "--key", KEY, *extra]
        # The runtime runs with this one's import path (the package and the tests).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )

    def stopped(self) -> dict[str, Any]:
        """Where the helper stopped, once it has; fails if the runtime ended first."""
        end = time.monotonic() + WAIT_S
        pause = threading.Event()
        while not self.marker.exists():
            if self.process.poll() is not None:
                out, err = self.process.communicate()
                raise AssertionError(f"the runtime ended before the stop:\n{out}\n{err}")
            assert time.monotonic() < end, "the helper never reached the chosen operation"
            pause.wait(0.01)
        stop: dict[str, Any] = json.loads(self.marker.read_text())
        return stop

    def kill(self) -> None:
        """SIGKILL the runtime and every helper it started."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.communicate(timeout=WAIT_S)

    def events(self) -> list[dict[str, Any]]:
        """The runtime's events, once it has ended by itself."""
        out, err = self.process.communicate(timeout=WAIT_S)
        assert self.process.returncode == 0, f"{out}\n{err}"
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def run(tmp_path: Path, action: str, *extra: str) -> dict[str, Any]:
    """Run to its end with a Drive that stops nowhere; its last event."""
    return Runtime(tmp_path, action, *extra, stop={"op": ""}).events()[-1]


def study_on_drive(tmp_path: Path) -> Path:
    local = tmp_path / "local"
    return tmp_path / "drive" / study_dir_for(local / "out", KEY).relative_to(local)


def local_database(tmp_path: Path) -> Path:
    return study_dir_for(tmp_path / "local" / "out", KEY) / "study.db"


def drive_trials(tmp_path: Path) -> list[int]:
    """The finished trials of the Drive copy, restored into a fresh folder."""
    observer = DriveObserver(tmp_path, tmp_path / "drive")
    try:
        into = tmp_path / f"fresh-{time.monotonic_ns()}"
        return finished_numbers(observer.restored_study(study_on_drive(tmp_path), into))
    finally:
        observer.close()


def local_trials(tmp_path: Path) -> list[int]:
    storage = f"sqlite:///{local_database(tmp_path)}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return finished_numbers(optuna.load_study(study_name=summary.study_name, storage=storage))


HELPER_STOPS = {
    "trial file": ((), {"op": "commit", "pattern": "*/trials/trial-00002/model.txt"}),
    "thinning": (
        ("--keep", "1", "--compact", "0.0001"),
        {"op": "remove", "pattern": "*/history/study.db/*", "skip": 1},
    ),
    "final plain copy": ((), {"op": "commit", "pattern": "*/study-*/study.db", "skip": 1}),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", list(HELPER_STOPS))
def test_a_helper_killed_mid_write_is_replaced_and_the_sweep_ends_complete(
    tmp_path: Path, where: str
) -> None:
    options, stop = HELPER_STOPS[where]
    runtime = Runtime(tmp_path, "sweep", "--trials", "6", *options, stop=stop)
    stopped = runtime.stopped()
    os.kill(stopped["pid"], signal.SIGKILL)  # the helper alone; the sweep goes on

    done = runtime.events()[-1]

    assert done["event"] == "done"
    assert done["ok"], done["report"]
    assert temp_files(tmp_path / "drive") == []
    assert drive_trials(tmp_path) == local_trials(tmp_path) == list(range(6))


@pytest.mark.timeout(60)
def test_a_kill_while_old_generations_are_thinned_leaves_every_trial_restorable(
    tmp_path: Path,
) -> None:
    # Every generation is a base and one is kept: each backup thins the one before.
    thinning = ("--keep", "1", "--compact", "0.0001")
    runtime = Runtime(
        tmp_path,
        "sweep",
        "--trials",
        "8",
        *thinning,
        stop={"op": "remove", "pattern": "*/history/study.db/*", "skip": 1},
    )
    runtime.stopped()
    on_drive = len(drive_trials(tmp_path))
    runtime.kill()

    assert len(drive_trials(tmp_path)) >= on_drive
    done = run(tmp_path, "sweep", "--trials", "8", *thinning)
    assert done["ok"], done["report"]
    assert temp_files(tmp_path / "drive") == []
    # The trial the kill caught running is failed, not finished: counted.
    after = local_trials(tmp_path)
    assert len(after) == 8
    assert drive_trials(tmp_path) == after


def swept_twice(tmp_path: Path, *options: str) -> None:
    """Six trials in two sweeps: each ends with a full copy, so Drive keeps a generation
    of 3 finished trials however the per-trial backups coalesced on a busy machine."""
    for trials in ("3", "6"):
        assert run(tmp_path, "sweep", "--trials", trials, *options)["ok"]


def older_generation(tmp_path: Path) -> tuple[int, int]:
    """An older generation on Drive that held some finished trials, and how many."""
    observer = DriveObserver(tmp_path, tmp_path / "drive")
    try:
        generations = observer.store.history(study_on_drive(tmp_path) / "study.db")
    finally:
        observer.close()
    newest = max(g.finished_trials or 0 for g in generations)
    older = [(g.number, g.finished_trials or 0) for g in generations]
    return max(o for o in older if 0 < o[1] < newest)


GOING_BACK_STOPS = {
    "archived copy": {"op": "commit", "pattern": "*/history/study.db/*.db"},
    "plain copy": {"op": "commit", "pattern": "*/study-*/study.db"},
    "base record": {"op": "commit", "pattern": "*/history/study.db/*.json"},
    "lease given back": {"op": "commit", "pattern": "*/lease.json", "skip": 1},
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", list(GOING_BACK_STOPS))
def test_a_restore_of_an_older_generation_killed_on_drive_can_be_run_again(
    tmp_path: Path, where: str
) -> None:
    swept_twice(tmp_path)
    older, held = older_generation(tmp_path)
    runtime = Runtime(tmp_path, "restore", "--generation", str(older), stop=GOING_BACK_STOPS[where])
    runtime.stopped()
    runtime.kill()

    # Drive holds the newest generation or the one going back, whole either way.
    assert len(drive_trials(tmp_path)) in (6, held)
    assert local_trials(tmp_path) == list(range(6))
    restored = run(tmp_path, "restore", "--generation", str(older))
    assert restored["ok"], restored["error"]
    back = local_trials(tmp_path)
    assert len(back) == held
    assert drive_trials(tmp_path) == back
    done = run(tmp_path, "sweep", "--trials", "5")
    assert done["ok"], done["report"]
    assert temp_files(tmp_path / "drive") == []
    # A trial the older generation caught running is failed, not finished: counted.
    after = local_trials(tmp_path)
    assert len(after) == 5
    assert drive_trials(tmp_path) == after


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", list(GOING_BACK_STOPS))
def test_a_sweep_after_a_killed_restore_of_an_older_generation_loses_no_trial(
    tmp_path: Path, where: str
) -> None:
    swept_twice(tmp_path)
    older, held = older_generation(tmp_path)
    runtime = Runtime(tmp_path, "restore", "--generation", str(older), stop=GOING_BACK_STOPS[where])
    runtime.stopped()
    runtime.kill()

    # A sweep now would publish the trials going back undoes, undoing the user's choice
    # without a word: it stops and says how to finish going back, or to keep them.
    refused = run(tmp_path, "sweep", "--trials", "8")
    assert refused["event"] == "refused", refused
    assert "was cut short" in refused["error"]
    assert f"--generation {older}" in refused["error"]
    assert "\n" not in refused["error"]
    assert local_trials(tmp_path) == list(range(6))  # the local study is untouched

    again = run(tmp_path, "restore", "--generation", str(older))
    assert again["ok"], again["error"]
    assert len(local_trials(tmp_path)) == held
    done = run(tmp_path, "sweep", "--trials", "8")
    assert done["ok"], done["report"]
    assert temp_files(tmp_path / "drive") == []
    # A trial the older generation caught running is failed, not finished: skipped.
    after = local_trials(tmp_path)
    assert len(after) == 8
    assert drive_trials(tmp_path) == after


@pytest.mark.timeout(90)
@pytest.mark.parametrize("function", ["_set_aside", "_replace_local"])
def test_a_restore_of_an_older_generation_killed_on_this_disk_leaves_no_half_study(
    tmp_path: Path, function: str
) -> None:
    swept_twice(tmp_path)
    older, held = older_generation(tmp_path)
    killed = Runtime(
        tmp_path, "restore", "--generation", str(older), "--die-before", function, stop={"op": ""}
    )
    killed.process.communicate(timeout=WAIT_S)
    assert killed.process.returncode == -signal.SIGKILL

    database = local_database(tmp_path)
    asides = sorted(database.parent.glob("study.db.before-restore-*"))
    if function == "_set_aside":
        assert asides == []
        assert local_trials(tmp_path) == list(range(6))
    else:
        # Set aside, whole, with every trial; the study itself not yet back.
        assert not database.exists()
        (aside,) = [a for a in asides if a.suffix not in (".db-wal", ".db-shm")]
        storage = f"sqlite:///{aside}"
        (summary,) = optuna.get_all_study_summaries(storage)
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        assert finished_numbers(study) == list(range(6))
    assert len(drive_trials(tmp_path)) == held

    # Drive went back; the local study did not yet: a sweep stops and says so, and the
    # restore run again finishes going back.
    refused = run(tmp_path, "sweep", "--trials", "8")
    assert refused["event"] == "refused", refused
    assert f"--generation {older}" in refused["error"]
    again = run(tmp_path, "restore", "--generation", str(older))
    assert again["ok"], again["error"]
    done = run(tmp_path, "sweep", "--trials", "8")
    assert done["ok"], done["report"]
    assert temp_files(tmp_path / "drive") == []
    after = local_trials(tmp_path)
    assert len(after) == 8
    assert drive_trials(tmp_path) == after


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["plain copy", "base record"])
@pytest.mark.parametrize("target", ["the kept base", "a patch on it"])
def test_going_back_killed_on_drive_with_one_kept_base_leaves_the_newest_restorable(
    tmp_path: Path, where: str, target: str
) -> None:
    # One base kept, compacted now and then: the plain copy is the only base left, and
    # going back writes over it before its own record lands.
    thinning = ("--keep", "1", "--compact", "0.05")
    assert run(tmp_path, "grow", "--trials", "14", *thinning)["ok"]
    observer = DriveObserver(tmp_path, tmp_path / "drive")
    try:
        generations = observer.store.history(study_on_drive(tmp_path) / "study.db")
    finally:
        observer.close()
    (base,) = [g.number for g in generations if g.kind == "base"]
    head = max(g.number for g in generations)
    assert base < head - 1, generations
    back = base if target == "the kept base" else base + 1
    held = next(g.finished_trials for g in generations if g.number == back)
    going_back = Runtime(
        tmp_path,
        "restore",
        "--generation",
        str(back),
        *thinning,
        stop=GOING_BACK_STOPS[where],
    )
    going_back.stopped()
    going_back.kill()

    assert len(drive_trials(tmp_path)) in (14, held)
    restored = run(tmp_path, "restore", "--generation", str(back), *thinning)
    assert restored["ok"], restored["error"]
    assert len(local_trials(tmp_path)) == len(drive_trials(tmp_path)) == held


@pytest.mark.timeout(60)
def test_a_runtime_killed_while_restoring_trial_files_brings_the_rest_back_next_start(
    tmp_path: Path,
) -> None:
    assert run(tmp_path, "sweep", "--trials", "6")["ok"]
    (tmp_path / "local").rename(tmp_path / "first-disk")  # a new runtime, an empty disk
    restoring = Runtime(
        tmp_path,
        "sweep",
        "--trials",
        "8",
        stop={"op": "read", "pattern": "*/trials/trial-00002/model.txt"},
    )
    restoring.stopped()
    restoring.kill()
    assert local_trials(tmp_path) == list(range(6))  # the database came back first

    done = run(tmp_path, "sweep", "--trials", "8")

    assert done["ok"], done["report"]
    study_dir = local_database(tmp_path).parent
    for number in range(8):
        model = study_dir / "trials" / f"trial-{number:05d}" / "model.txt"
        assert model.read_text() == f"trial {number}\n"
    assert local_trials(tmp_path) == drive_trials(tmp_path) == list(range(8))
    assert temp_files(tmp_path / "drive") == []


@pytest.mark.timeout(60)
def test_trials_run_after_going_back_do_not_inherit_the_undone_trials_files(
    tmp_path: Path,
) -> None:
    swept_twice(tmp_path, "--extra", "undone.txt")
    older, held = older_generation(tmp_path)
    restored = run(tmp_path, "restore", "--generation", str(older))
    assert restored["ok"], restored["error"]

    assert run(tmp_path, "sweep", "--trials", "6")["ok"]

    trials = local_database(tmp_path).parent / "trials"
    redone = [n for n in range(held, 6) if (trials / f"trial-{n:05d}" / "undone.txt").exists()]
    assert redone == []
