"""Honest exits: a stalled Drive never holds the caller's output open, never stretches an
exit past its timeout, and no message claims a backup that was not made.

The Drive here is a real FUSE mount whose operations block in the kernel
(:class:`sweepsafe.testing.FuseDrive`), as a stalled Google Drive mount does: a helper
process stuck on it survives SIGKILL in state D until the mount goes away. Every child
is read through pipes to end-of-file, as ``subprocess.run(capture_output=True)``, a
``| tee`` or a notebook's ``!python train.py`` read it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest

from cli_support import FINISHED
from sweep_support import wait_for
from sweepsafe import create_incremental_backup_callback
from sweepsafe.testing import FaultPlan, FuseDrive, fuse_unavailable_reason
from sweepsafe.worker import BackupWorker, RetryPolicy
from worker_support import LogWatch

# Every wait below is bounded by this, far above what a passing test needs, so that a
# regression fails the test instead of hanging it.
LIMIT_S = 60.0

# The objective of the children: each trial writes a file in its folder; at trial
# LAST_TRIAL it makes the Drive hang, then says so on stdout.
OBJECTIVE = """\
import os
import sys

from sweepsafe import trial_dir
from sweepsafe.testing import FaultPlan

LAST_TRIAL = 2


def objective(trial):
    x = trial.suggest_float("x", -3.0, 3.0)
    folder = trial_dir(os.environ["SWEEPSAFE_STUDY_DIR"], trial)
    (folder / "weights.bin").write_bytes(os.urandom(4096))
    if trial.number == LAST_TRIAL:
        FaultPlan(hang=True).write(os.environ["HANG_PLAN"])
        print("drive hung at the last trial", flush=True)
    return x * x
"""

# A user's script: run_sweep backed up to a Drive folder, warnings logged to stderr, and
# the exit status it reports printed last.
SCRIPT = """\
import logging
import os
import sys

from sweepsafe import DriveStore, run_sweep, study_dir_for
from sweepsafe.worker import set_exit_timeout

import hangobj

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
output_dir, drive_dir, flush_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
os.environ["SWEEPSAFE_STUDY_DIR"] = str(study_dir_for(output_dir, "exits"))
set_exit_timeout(0.5)
store = DriveStore(output_dir, drive_dir, drive_timeout=2 * flush_timeout)
result = run_sweep(
    hangobj.objective,
    output_dir=output_dir,
    study_key="exits",
    n_trials=hangobj.LAST_TRIAL + 1,
    backup_to_drive=store,
    flush_timeout=flush_timeout,
)
status = 0 if result.backup_ok else 1
print(f"exit status {status}", flush=True)
sys.exit(status)
"""


@pytest.fixture
def fuse_drive(tmp_path: Path) -> Iterator[FuseDrive]:
    """A mounted FuseDrive with no faults yet; leaving it frees whatever is stuck in it."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    plan = tmp_path / "plan.json"
    FaultPlan().write(plan)
    with FuseDrive(tmp_path / "backing", tmp_path / "mnt", plan) as drive:
        yield drive
    # Leaving killed the daemon: the kernel failed the requests it held, and the helpers
    # stuck in them could at last die of their SIGKILL.
    wait_for(lambda: not stuck_helpers(tmp_path), LIMIT_S, "the stuck helpers to go")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A working folder with the objective module the children import."""
    (tmp_path / "hangobj.py").write_text(OBJECTIVE)
    return tmp_path


def child_env(drive: FuseDrive) -> dict[str, str]:
    env = {**os.environ, "HANG_PLAN": str(drive.plan_path)}
    env.pop("SWEEPSAFE_STUDY_DIR", None)
    return env


def start(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sweepsafe_run(project: Path, drive: FuseDrive, *options: str) -> list[str]:
    """``sweepsafe run`` of the hanging objective, backed up into the FUSE mount."""
    return [
        sys.executable,
        "-m",
        "sweepsafe",
        "run",
        "hangobj:objective",
        "--output-dir",
        str(project / "sweeps"),
        "--study-key",
        "exits",
        "--drive-dir",
        str(drive.mount_point / "sweeps"),
        "--trials",
        "3",
        *options,
    ]


def stuck_helpers(cwd: Path) -> list[int]:
    """Drive helper processes started in ``cwd`` that sleep uninterruptibly (state D)."""
    stuck = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
            where = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if b"_helper_process.py" in command and state == "D" and where == str(cwd):
            stuck.append(int(entry))
    return stuck


def test_helpers_stuck_on_a_hung_drive_do_not_hold_the_callers_output_open(
    project: Path, fuse_drive: FuseDrive
) -> None:
    flush_timeout = 2.0
    command = [
        sys.executable,
        "-c",
        SCRIPT,
        str(project / "out"),
        str(fuse_drive.mount_point / "sweeps"),
        str(flush_timeout),
    ]
    with start(command, project, child_env(fuse_drive)) as script:
        assert script.stdout is not None
        assert script.stdout.readline() == "drive hung at the last trial\n"
        # To end-of-file on both pipes: helpers holding either would keep it away until
        # the Drive answers, which it never does here.
        stdout, stderr = script.communicate(timeout=flush_timeout + 10)

    assert script.returncode == 1, stderr
    assert stdout.splitlines()[-1] == f"exit status {script.returncode}"
    assert "Drive copy INCOMPLETE" in stderr
    # The end-of-file above was not for want of a stuck helper: they are still there.
    assert stuck_helpers(project), "no helper was left stuck on the hung Drive"


def test_run_with_a_hung_drive_exits_within_its_flush_timeout_after_the_last_trial(
    project: Path, fuse_drive: FuseDrive
) -> None:
    # Long enough that the start-up and teardown around the wait (Optuna's import and
    # interpreter exit: seconds on a loaded machine) stay within half of it.
    flush_timeout = 8.0
    command = sweepsafe_run(project, fuse_drive, "--flush-timeout", f"{flush_timeout:g}")
    with start(command, project, child_env(fuse_drive)) as sweep:
        assert sweep.stdout is not None
        assert sweep.stdout.readline() == "drive hung at the last trial\n"
        last_trial = time.monotonic()
        stdout, stderr = sweep.communicate(timeout=LIMIT_S)
        exited = time.monotonic() - last_trial

    assert sweep.returncode == 1, stderr
    # The final flush waits flush_timeout; closing the worker must not wait again.
    assert exited < 1.5 * flush_timeout, f"exited {exited:.1f} s after the last trial"
    # The report is printed once, on stdout, and says how many trials lack files.
    assert stdout.count("Drive copy INCOMPLETE") == 1
    assert "INCOMPLETE" not in stderr
    lacking = re.search(r"(\d+) of the 3 finished trials of this run lack files on Drive", stdout)
    assert lacking is not None, stdout
    assert int(lacking.group(1)) >= 1  # the last trial's folder never reached the hung Drive
    assert stuck_helpers(project)


def test_ctrl_c_during_the_final_flush_exits_130_at_once_without_claiming_a_backup(
    project: Path, fuse_drive: FuseDrive
) -> None:
    flush_timeout = 60.0
    command = sweepsafe_run(project, fuse_drive, "--flush-timeout", f"{flush_timeout:g}", "-v")
    with start(command, project, child_env(fuse_drive)) as sweep:
        assert sweep.stderr is not None
        # The final backup announces its wait; the Drive has hung since the last trial,
        # so from that line on the command is waiting for a backup that cannot finish.
        seen = []
        for line in sweep.stderr:
            seen.append(line)
            if "Waiting up to 60 s for the backup of" in line:
                break
        else:
            pytest.fail("the final backup never started:\n" + "".join(seen))
        sweep.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = sweep.communicate(timeout=LIMIT_S)
        exited = time.monotonic() - interrupted

    assert sweep.returncode == 130, stderr
    assert exited < flush_timeout / 10, f"exited {exited:.1f} s after Ctrl-C"
    last = stderr.splitlines()[-1]
    assert last.startswith("sweepsafe: error: interrupted before the final backup finished: ")
    assert "not backed up to Drive" in last
    assert "complete backup" not in stderr
    assert "after the final backup" not in stderr
    assert "Traceback" not in stderr


def test_drive_look_ups_of_every_command_end_at_their_deadline_naming_the_drive(
    project: Path, fuse_drive: FuseDrive
) -> None:
    """status, verify, history, backup, restore and run each give up on a hung Drive at
    ``--drive-timeout``, in one error line that names the Drive path and says to remount."""
    drive_root = fuse_drive.mount_point / "backup"
    study = project / "local" / "study-1" / "study.db"
    study.parent.mkdir(parents=True)
    storage = f"sqlite:///{study}"
    optuna.create_study(storage=storage, study_name="s").optimize(
        lambda trial: trial.suggest_float("x", 0, 1), n_trials=2
    )
    roots = ["--local-root", str(project / "local"), "--drive-root", str(drive_root)]
    python = [sys.executable, "-m", "sweepsafe"]
    backed_up = subprocess.run(
        [*python, "backup", str(study), *roots],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        check=False,
    )
    assert backed_up.returncode == 0, backed_up.stderr
    drive_copy = drive_root / "study-1" / "study.db"
    FaultPlan(hang=True).write(fuse_drive.plan_path)

    deadline = 2.0
    timeout = ["--drive-timeout", f"{deadline:g}"]
    commands = {
        "status": ["status", str(drive_root), *timeout],
        "verify": ["verify", str(drive_copy), *timeout],
        "history": ["history", str(drive_copy.parent), *timeout],
        "backup": ["backup", str(study), *roots, *timeout],
        "restore": ["restore", str(study), *roots, *timeout],
        "run": [
            "run",
            "hangobj:objective",
            "--output-dir",
            str(project / "sweeps"),
            "--study-key",
            "k",
            "--drive-dir",
            str(fuse_drive.mount_point / "sweeps"),
            *timeout,
        ],
        # The same start-up and exit, with no Drive to wait for: the reference.
        "reference": ["status", str(project / "local")],
    }
    env = child_env(fuse_drive)
    started = time.monotonic()

    def finish(args: list[str]) -> tuple[int, str, float]:
        with start([*python, *args], project, env) as process:
            _, stderr = process.communicate(timeout=LIMIT_S)
        return process.returncode, stderr, time.monotonic() - started

    # All at once, each read to end-of-file by a thread of its own.
    with ThreadPoolExecutor(len(commands)) as pool:
        futures = {name: pool.submit(finish, args) for name, args in commands.items()}
    outcomes = {name: future.result() for name, future in futures.items()}

    reference_code, reference_err, reference_s = outcomes.pop("reference")
    assert reference_code == 0, reference_err
    for name, (code, stderr, elapsed) in outcomes.items():
        assert code != 0, name
        lines = stderr.splitlines()
        assert len(lines) == 1, (name, stderr)
        (line,) = lines
        assert line.startswith("sweepsafe: error: Google Drive did not answer within 2 s"), line
        assert str(fuse_drive.mount_point) in line, line
        assert "Remount it" in line, line
        # One deadline, plus the start-up and exit the reference took, plus slack for
        # seven processes sharing the machine.
        assert elapsed < reference_s + 4 * deadline, (name, elapsed, reference_s)


def test_a_hung_sync_callable_behind_the_public_callback_is_abandoned_at_close(
    tmp_path: Path,
) -> None:
    """The callbacks and the worker share one dispatch path: a sync callable stuck in a
    thread is abandoned at ``close(timeout)``, with a warning naming its target."""
    released = threading.Event()
    started = threading.Event()

    def hung_sync_backup(path: Path, is_directory: bool) -> bool:
        started.set()
        released.wait(LIMIT_S)  # a Drive mount that stopped answering
        return True

    log = LogWatch()
    logger = logging.getLogger("sweepsafe")
    logger.addHandler(log)
    target = tmp_path / "study.db"
    worker = BackupWorker(retry=RetryPolicy(initial_delay=0.0, max_attempts=1))
    try:
        callback = create_incremental_backup_callback(target, hung_sync_backup, worker=worker)
        study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        study.optimize(
            lambda trial: trial.suggest_float("x", 0, 1), n_trials=1, callbacks=[callback]
        )
        assert started.wait(LIMIT_S)

        timeout = 0.5
        began = time.monotonic()
        report = worker.close(timeout)
        took = time.monotonic() - began
    finally:
        released.set()
        logger.removeHandler(log)
        worker.close(0)

    assert took < 3 * timeout, f"close({timeout}) took {took:.2f} s"
    assert [r.target for r in report.pending] == [target]
    warnings = log.messages(logging.WARNING)
    assert any(str(target) in message and "stuck" in message for message in warnings), warnings
    assert len(study.get_trials(states=FINISHED)) == 1


# A store's finalizer ends its helper processes wherever the garbage collector runs, which
# can be in the middle of the reaping of ended helpers (any allocation can start it). Here
# the first helper's poll stands for that moment: it ends a second helper, as a finalizer
# would, while the first is being reaped.
FINALIZER_MID_REAP = """
import subprocess, sys
from sweepsafe.drive import _helper_reaping as reaping

def helper():
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )

second = helper()
armed = False

class First(subprocess.Popen):
    def poll(self):
        global armed
        if armed:
            armed = False
            reaping._abandon(second, kill=True)
        return super().poll()

first = First(
    [sys.executable, "-c", "import time; time.sleep(30)"],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
)
reaping._abandon(first, kill=True)
armed = True
reaping.reap_ended_helpers()
tracked = list(reaping._unreaped)
print("second tracked" if any(process is second for process in tracked) else "second lost")
for process in (first, second):
    process.wait()
"""


def test_a_store_finalized_while_helpers_are_reaped_neither_hangs_nor_loses_a_helper() -> None:
    child = subprocess.run(
        [sys.executable, "-c", FINALIZER_MID_REAP],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split("\n")[0] == "second tracked"
