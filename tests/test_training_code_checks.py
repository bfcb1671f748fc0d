"""Training code around a sweep: processes it forks, and how they end, never drag the
sweep's backups into them.

Data loaders and hand-written workers fork the training process while the backup
worker's thread and Drive helpers exist. A forked child has a copy of the worker's
state but not its thread: it must neither wait for copies that only the parent runs,
nor back the study up a second time, nor report on the parent's backups.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Every child run below is bounded by this, far above what a passing test needs.
LIMIT_S = 120.0

# A sweep whose backups go through a callable that the objective holds in flight: at
# trial FORK_AT the objective waits until a copy is running, forks a child that leaves
# the way the command line asks (a raw fork left by sys.exit(), whose SystemExit goes up
# through the objective, or the workers of a multiprocessing pool), times the children,
# then lets the copy go on. Every line a process prints
# starts with its pid; every call of the backup callable is recorded with its pid.
FORKING_SWEEP = """\
import logging
import multiprocessing
import os
import sys
import threading
import time

from sweepsafe import run_sweep
from sweepsafe.worker import get_default_worker, set_exit_timeout

FORK_AT = 2
output_dir, calls_path, how = sys.argv[1], sys.argv[2], sys.argv[3]
logging.basicConfig(
    level=logging.INFO, format="%(process)d %(levelname)s %(name)s: %(message)s"
)
set_exit_timeout(100.0)
in_flight = threading.Event()
gate = threading.Event()
gate.set()


def backup(path, is_directory):
    with open(calls_path, "a") as calls:
        calls.write(f"{os.getpid()} {path}\\n")
    in_flight.set()
    gate.wait()
    return True


def objective(trial):
    if trial.number == FORK_AT:
        gate.clear()
        in_flight.clear()
        get_default_worker().submit(os.path.join(output_dir, "extra.bin"), backup)
        assert in_flight.wait(30)
        started = time.monotonic()
        if how == "pool":
            with multiprocessing.get_context("fork").Pool(2) as pool:
                assert pool.map(abs, range(-3, 0)) == [3, 2, 1]
        else:
            pid = os.fork()
            if pid == 0:
                print(f"{os.getpid()} child leaving", flush=True)
                sys.exit(0)
            os.waitpid(pid, 0)
        print(f"{os.getpid()} child took {time.monotonic() - started:.2f}", flush=True)
        gate.set()
    return float(trial.number)


result = run_sweep(
    objective,
    output_dir=output_dir,
    study_key="forks",
    n_trials=FORK_AT + 2,
    backup_to_drive=backup,
    flush_timeout=100.0,
)
print(f"{os.getpid()} parent backup_ok {result.backup_ok}", flush=True)
"""


def run_forking_sweep(tmp_path: Path, how: str) -> tuple[int, list[str], list[str]]:
    """The parent's pid, every line printed or logged, and every backup call's pid."""
    script = tmp_path / "forking_sweep.py"
    script.write_text(FORKING_SWEEP)
    calls = tmp_path / "calls.txt"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), str(calls), how],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(lines)
    parent = next(int(line.split()[0]) for line in lines if "parent backup_ok" in line)
    callers = [line.split()[0] for line in calls.read_text().splitlines()]
    return parent, lines, callers


def not_from(lines: list[str], pid: int) -> list[str]:
    """sweepsafe's log records printed by any process but ``pid``."""
    return [line for line in lines if "sweepsafe" in line and not line.startswith(f"{pid} ")]


def test_a_forked_child_leaving_by_sys_exit_neither_waits_nor_backs_up_nor_reports(
    tmp_path: Path,
) -> None:
    parent, lines, callers = run_forking_sweep(tmp_path, "sys.exit")
    text = "\n".join(lines)
    took = next(float(line.split()[-1]) for line in lines if "child took" in line)
    # The child's SystemExit went up through run_sweep's own frames: the final backup
    # and the exit hook of the parent's worker are the parent's, not the child's. Both
    # would wait (100 s each) for a copy that only the parent's thread can finish.
    assert took < 30.0, text
    assert not_from(lines, parent) == [], text
    assert set(callers) == {str(parent)}, text
    assert f"{parent} parent backup_ok True" in text


def test_a_fork_pool_started_while_a_copy_runs_ends_at_once_and_leaves_the_report_whole(
    tmp_path: Path,
) -> None:
    parent, lines, callers = run_forking_sweep(tmp_path, "pool")
    text = "\n".join(lines)
    took = next(float(line.split()[-1]) for line in lines if "child took" in line)
    assert took < 30.0, text
    assert not_from(lines, parent) == [], text
    assert set(callers) == {str(parent)}, text
    assert f"{parent} parent backup_ok True" in text


# A training script on a preemptible machine: SIGTERM is turned into SystemExit, as
# training frameworks do so that their own cleanup runs. The Drive hangs at the last
# trial, so the final flush waits for it.
TERMINATED_SWEEP = """\
import logging
import signal
import sys
from pathlib import Path

import optuna

from sweepsafe import run_sweep
from sweepsafe.testing import FaultPlan, simulated_store
from sweepsafe.worker import set_exit_timeout

optuna.logging.set_verbosity(optuna.logging.ERROR)
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
local, drive, plan = (Path(arg) for arg in sys.argv[1:4])
set_exit_timeout(100.0)
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))


def objective(trial):
    if trial.number == 1:
        FaultPlan(hang=True).write(plan)
    return 1.0


run_sweep(objective, output_dir=local, study_key="k", n_trials=2,
          backup_to_drive=simulated_store(local, drive, plan), flush_timeout=100)
"""


def test_sigterm_turned_into_system_exit_in_the_final_flush_does_not_make_the_exit_wait_again(
    tmp_path: Path,
) -> None:
    # A preempted machine gives the process a short grace before SIGKILL: the exit hook
    # must not spend it waiting again for the backups the SIGTERM gave up.
    from sweepsafe.testing import FaultPlan

    local, drive, plan = tmp_path / "local", tmp_path / "drive", tmp_path / "plan.json"
    local.mkdir()
    FaultPlan().write(plan)
    child = subprocess.Popen(
        [sys.executable, "-c", TERMINATED_SWEEP, str(local), str(drive), str(plan)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("Waiting up to 100 s for the backup of"):
                break
        else:
            pytest.fail("the sweep never reached its final flush")
        terminated = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=LIMIT_S + 100)
        took = time.monotonic() - terminated
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 143, err[-2000:]
    assert took < 50.0, (took, err[-2000:])
    (said,) = [line for line in (out + err).splitlines() if "At exit" in line]
    assert "so the exit did not wait again" in said
    assert "study.db" in said


# Training code of its own (no run_sweep): a copy of the process-wide worker is in
# flight when the program forks a child that leaves by sys.exit(), which runs the
# child's exit hooks.
FORK_WITH_DEFAULT_WORKER = """\
import logging
import os
import sys
import threading
import time

from sweepsafe.worker import get_default_worker, set_exit_timeout

logging.basicConfig(level=logging.INFO, format="%(process)d %(levelname)s %(name)s: %(message)s")
set_exit_timeout(100.0)
in_flight = threading.Event()
gate = threading.Event()


def backup(path, is_directory):
    in_flight.set()
    gate.wait()
    return True


get_default_worker().submit(sys.argv[1], backup)
assert in_flight.wait(30)
started = time.monotonic()
pid = os.fork()
if pid == 0:
    sys.exit(0)
os.waitpid(pid, 0)
print(f"{os.getpid()} child took {time.monotonic() - started:.2f}", flush=True)
gate.set()
print(f"{os.getpid()} parent flush ok {get_default_worker().flush(30).ok}", flush=True)
"""


def test_the_exit_hook_of_a_forked_child_leaves_the_parents_copies_alone(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORK_WITH_DEFAULT_WORKER, str(tmp_path / "target.bin")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    lines = (done.stdout + done.stderr).splitlines()
    text = "\n".join(lines)
    assert done.returncode == 0, text
    parent = next(int(line.split()[0]) for line in lines if "parent flush ok" in line)
    took = next(float(line.split()[-1]) for line in lines if "child took" in line)
    # Without the fork in mind, the child's exit hook waited its 100 s for the parent's
    # copy and then logged it as not backed up.
    assert took < 30.0, text
    assert not_from(lines, parent) == [], text
    assert f"{parent} parent flush ok True" in text
