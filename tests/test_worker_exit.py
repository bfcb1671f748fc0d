"""The process-wide worker at interpreter exit, proven in real subprocesses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
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
