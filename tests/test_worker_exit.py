"""The process-wide worker at interpreter exit, proven in real subprocesses."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sweepsafe.worker import BackupWorker, get_default_worker, set_exit_timeout

# Far above what the scripts need; only there so that a broken exit hook fails the test
# instead of hanging it.
_PROCESS_LIMIT_S = 60

_PRELUDE = """
import asyncio, logging, sys, threading, time
from pathlib import Path
from sweepsafe.worker import get_default_worker, set_exit_timeout

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
target = Path(sys.argv[1])
copy_started = threading.Event()
"""


def _run_script(body: str, target: Path) -> subprocess.CompletedProcess[str]:
    script = _PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script, str(target)],
        capture_output=True,
        text=True,
        timeout=_PROCESS_LIMIT_S,
        check=False,
    )


def test_exit_waits_for_a_slow_backup_under_way(tmp_path: Path) -> None:
    target = tmp_path / "study.db"
    finished = _run_script(
        """
        def slow_backup(path, is_directory):
            copy_started.set()
            time.sleep(0.5)  # a Drive that takes its time
            path.with_suffix(".copied").write_text("copied")
            return True

        get_default_worker().submit(target, slow_backup)
        copy_started.wait()
        # The script ends here, with the copy under way.
        """,
        target,
    )
    assert finished.returncode == 0, finished.stderr
    assert target.with_suffix(".copied").read_text() == "copied"
    assert "WARNING" not in finished.stderr


def test_exit_with_a_hung_drive_ends_within_the_exit_timeout_naming_the_target(
    tmp_path: Path,
) -> None:
    target = tmp_path / "study.db"
    finished = _run_script(
        """
        never = threading.Event()

        def hung_backup(path, is_directory):
            copy_started.set()
            never.wait()  # a Drive mount that stopped answering
            return True

        set_exit_timeout(0.5)
        get_default_worker().submit(target, hung_backup)
        copy_started.wait()
        """,
        target,
    )
    assert finished.returncode == 0, finished.stderr
    assert f"{target} (pending: flush timed out after" in finished.stderr
    assert "may not exit until the Drive mount answers" in finished.stderr


def test_exit_cancels_a_hung_async_copy_and_names_its_target(tmp_path: Path) -> None:
    target = tmp_path / "trials"
    finished = _run_script(
        """
        async def hung_backup(path, is_directory):
            copy_started.set()
            try:
                await asyncio.Event().wait()  # a Drive mount that stopped answering
            except asyncio.CancelledError:
                print("copy cancelled", file=sys.stderr)
                raise

        set_exit_timeout(0.5)
        get_default_worker().submit(target, hung_backup, is_directory=True)
        copy_started.wait()
        """,
        target,
    )
    assert finished.returncode == 0, finished.stderr
    assert f"{target} (pending: flush timed out after" in finished.stderr
    assert "copy cancelled" in finished.stderr


def test_the_default_worker_is_one_per_process() -> None:
    worker = get_default_worker()
    assert isinstance(worker, BackupWorker)
    assert get_default_worker() is worker


def test_a_closed_default_worker_is_replaced() -> None:
    worker = get_default_worker()
    worker.close()
    replacement = get_default_worker()
    assert replacement is not worker
    assert not replacement.closed


def test_the_exit_timeout_cannot_be_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        set_exit_timeout(-1)


_INTERRUPTED_SWEEP = """
import logging, sys
from pathlib import Path

import optuna

from sweepsafe import run_sweep
from sweepsafe.testing import FaultPlan, simulated_store
from sweepsafe.worker import set_exit_timeout

optuna.logging.set_verbosity(optuna.logging.ERROR)
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
local, drive, plan = (Path(arg) for arg in sys.argv[1:4])
set_exit_timeout(float(sys.argv[4]))


def objective(trial):
    if trial.number == 1:
        FaultPlan(hang=True).write(plan)  # Drive stops answering
    return 1.0


run_sweep(objective, output_dir=local, study_key="k", n_trials=2,
          backup_to_drive=simulated_store(local, drive, plan), flush_timeout=120)
"""


def test_ctrl_c_in_the_final_flush_does_not_make_the_exit_wait_again_for_the_same_backups(
    tmp_path: Path,
) -> None:
    # The user pressed Ctrl-C to stop waiting for a hung Drive at the end of a sweep of the
    # process-wide worker: the exit hook must not then wait out its own timeout, silently,
    # for the very backups the user gave up.
    from sweepsafe.testing import FaultPlan

    local, drive, plan = tmp_path / "local", tmp_path / "drive", tmp_path / "plan.json"
    local.mkdir()
    FaultPlan().write(plan)
    exit_timeout = 30.0
    child = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_SWEEP, *map(str, (local, drive, plan, exit_timeout))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("Waiting up to 120 s for the backup of"):
                break  # the final flush is waiting for the hung Drive
        else:
            pytest.fail("the sweep never reached its final flush")
        interrupted = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=_PROCESS_LIMIT_S + exit_timeout)
        took = time.monotonic() - interrupted
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert "KeyboardInterrupt" in err
    assert took < exit_timeout, (took, err[-2000:])
    # The exit says why it did not wait, not that a wait of a few microseconds timed out.
    (said,) = [line for line in (out + err).splitlines() if "At exit" in line]
    assert "flush timed out" not in said
    assert "so the exit did not wait again" in said
    assert "study.db" in said
