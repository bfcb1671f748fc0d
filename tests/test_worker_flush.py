"""Flushing and closing the backup worker: bounded waits, reports that name what is missing."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweepsafe.errors import BackupFailed
from sweepsafe.worker import BackupWorker, FlushReport, TargetReport
from worker_support import LogWatch, WorkerRig


@pytest.fixture
def rig() -> Iterator[WorkerRig]:
    rig = WorkerRig()
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
def log_watch() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger("sweepsafe.worker")
    level = logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)


def _worker_threads(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


# -- flush --------------------------------------------------------------------------------


def test_flush_on_a_worker_that_never_ran_returns_at_once_without_a_loop(rig: WorkerRig) -> None:
    worker = rig.worker(name="never-started")
    report = worker.flush()
    assert report.ok
    assert report.targets == ()
    assert not report.timed_out
    assert str(report) == "0 targets backed up"
    assert _worker_threads("never-started") == []


def test_flush_waits_for_jobs_submitted_before_it(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker()
    drive = rig.drive(held=True)
    target = tmp_path / "study.db"
    worker.submit(target, drive)
    drive.wait_for_calls(1)
    releaser = threading.Thread(target=drive.release)
    releaser.start()  # lets the copy end at some point while flush waits
    report = worker.flush()
    releaser.join()
    assert report.ok
    assert drive.finished == 1
    assert report.targets[0].last_success is not None


def test_flush_does_not_wait_for_jobs_submitted_after_it(
    rig: WorkerRig, tmp_path: Path, log_watch: LogWatch
) -> None:
    worker = rig.worker()
    first = rig.drive(held=True)
    hung = rig.drive(held=True)
    early, late = tmp_path / "study.db", tmp_path / "trials"
    worker.submit(early, first)
    first.wait_for_calls(1)
    flush_waiting = threading.Event()
    log_watch._matches = lambda record: record.getMessage().startswith("Flush: waiting")
    log_watch.matched = flush_waiting

    def submit_late_then_release_early() -> None:
        assert flush_waiting.wait(30)
        worker.submit(late, hung, is_directory=True)  # after the flush began: not awaited
        hung.wait_for_calls(1)
        first.release()

    helper = threading.Thread(target=submit_late_then_release_early)
    helper.start()
    report = worker.flush(timeout=30)
    helper.join()

    assert not report.timed_out
    by_target = {r.target: r for r in report.targets}
    assert by_target[early].ok
    assert by_target[late].pending


def test_a_timed_out_flush_returns_and_names_the_pending_target(
    rig: WorkerRig, tmp_path: Path
) -> None:
    worker = rig.worker()
    drive = rig.drive(held=True)  # a Drive mount that stopped answering
    stuck, fine = tmp_path / "study.db", tmp_path / "trials"
    worker.submit(stuck, drive)
    worker.submit(fine, rig.drive(), is_directory=True)
    drive.wait_for_calls(1)

    report = worker.flush(timeout=0.2)

    assert report.timed_out
    assert report.duration_s >= 0.2
    assert [r.target for r in report.pending] == [stuck]
    assert report.failed == ()
    assert str(report).startswith("1 of 2 targets not backed up: ")
    assert f"{stuck} (pending: flush timed out after" in str(report)
    assert str(fine) not in str(report)
    with pytest.raises(BackupFailed, match=r"study\.db"):
        report.raise_for_failures()


def test_a_timed_out_flush_cancels_nothing(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker()
    drive = rig.async_drive(held=True)
    worker.submit(tmp_path / "study.db", drive)
    drive.wait_for_calls(1)
    assert worker.flush(timeout=0.05).timed_out

    drive.release()
    assert worker.flush(timeout=30).ok
    assert drive.cancelled == []
    assert len(drive.calls) == 1


def test_flushes_from_many_threads_all_return(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker()
    drive = rig.drive(held=True)
    worker.submit(tmp_path / "study.db", drive)
    drive.wait_for_calls(1)
    reports: list[FlushReport] = []

    def flush() -> None:
        reports.append(worker.flush(timeout=30))

    flushers = [threading.Thread(target=flush) for _ in range(4)]
    for thread in flushers:
        thread.start()
    drive.release()
    for thread in flushers:
        thread.join()
    assert [report.ok for report in reports] == [True] * 4


# -- close --------------------------------------------------------------------------------


def test_close_waits_for_pending_copies_then_stops_the_loop(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(name="closing-worker")
    drive = rig.drive()
    worker.submit(tmp_path / "study.db", drive)
    report = worker.close(timeout=30)
    assert report.ok
    assert len(drive.calls) == 1
    assert _worker_threads("closing-worker") == []


def test_close_is_idempotent(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker()
    worker.submit(tmp_path / "study.db", rig.drive())
    assert worker.close(timeout=30).ok
    assert worker.close(timeout=30).ok
    assert worker.closed


def test_close_of_a_worker_that_never_ran_is_immediate(rig: WorkerRig) -> None:
    worker = rig.worker(name="never-started")
    assert worker.close().ok
    assert _worker_threads("never-started") == []


def test_close_cancels_an_async_copy_still_in_flight(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker()
    drive = rig.async_drive(held=True)
    target = tmp_path / "study.db"
    worker.submit(target, drive)
    drive.wait_for_calls(1)

    report = worker.close(timeout=0.1)

    assert [r.target for r in report.pending] == [target]
    assert drive.cancelled == [target]


def test_close_abandons_a_stuck_sync_copy_and_warns(
    rig: WorkerRig, tmp_path: Path, log_watch: LogWatch
) -> None:
    worker = rig.worker()
    drive = rig.drive(held=True)  # a write blocked in the kernel: no way to cancel it
    target = tmp_path / "study.db"
    worker.submit(target, drive)
    drive.wait_for_calls(1)

    report = worker.close(timeout=0.1)

    assert [r.target for r in report.pending] == [target]
    warnings = log_watch.messages(logging.WARNING)
    assert any(str(target) in w and "may not exit" in w for w in warnings), warnings


def test_a_submit_after_close_is_dropped_with_one_warning(
    rig: WorkerRig, tmp_path: Path, log_watch: LogWatch
) -> None:
    worker = rig.worker()
    drive = rig.drive()
    worker.close()
    worker.submit(tmp_path / "study.db", drive)
    worker.submit(tmp_path / "trials", drive, is_directory=True)
    assert drive.calls == []
    warnings = log_watch.messages(logging.WARNING)
    assert len(warnings) == 1
    assert "closed" in warnings[0]
    assert worker.flush().targets == ()


def test_the_worker_closes_as_a_context_manager(tmp_path: Path) -> None:
    with BackupWorker(name="context-worker") as worker:
        worker.submit(tmp_path / "study.db", lambda path, is_dir: True)
    assert worker.closed
    assert worker.flush().ok
    assert _worker_threads("context-worker") == []


# -- reports ------------------------------------------------------------------------------


def _report(
    target: str, *, ok: bool, pending: bool = False, error: str | None = None
) -> TargetReport:
    return TargetReport(
        target=Path(target),
        is_directory=False,
        ok=ok,
        pending=pending,
        attempts=1,
        last_success=None,
        last_error=error,
        last_result=None,
    )


def test_a_report_summary_counts_targets_when_all_went_well() -> None:
    report = FlushReport((_report("/x/study.db", ok=True), _report("/x/trials", ok=True)), False, 1)
    assert str(report) == "2 targets backed up"
    report.raise_for_failures()


def test_a_report_summary_names_every_failed_and_pending_target() -> None:
    report = FlushReport(
        (
            _report("/x/study.db", ok=False, pending=True),
            _report("/x/trials", ok=False, error="OSError: Input/output error"),
            _report("/x/config.json", ok=True),
        ),
        timed_out=True,
        duration_s=5.0004,
    )
    assert str(report) == (
        "2 of 3 targets not backed up: /x/study.db (pending: flush timed out after 5 s), "
        "/x/trials (failed: OSError: Input/output error)"
    )
    assert [r.target.name for r in report.failed] == ["trials"]
    assert [r.target.name for r in report.pending] == ["study.db"]
    with pytest.raises(BackupFailed) as caught:
        report.raise_for_failures()
    assert "/x/study.db" in str(caught.value)
    assert "/x/trials" in str(caught.value)


# A process whose main thread flushes a job that never ends, while another thread takes a
# Ctrl-C: the kernel may hand SIGINT to any thread, or the main thread may take it just
# before its wait begins; either way Python runs the handler only in the main thread,
# between bytecodes, and a wait that never wakes would never let it.
_CTRL_C_IN_ANOTHER_THREAD = """
import signal
import sys
import threading
import time

import anyio

from sweepsafe.worker import BackupWorker


async def never_ends(target, is_directory):
    await anyio.sleep_forever()


worker = BackupWorker()
worker.submit(sys.argv[1], never_ends)


def ctrl_c_here():
    time.sleep(0.5)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)


threading.Thread(target=ctrl_c_here).start()
started = time.monotonic()
try:
    worker.flush(None if sys.argv[2] == "none" else float(sys.argv[2]))
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - started:.2f} s", flush=True)
    worker.close(timeout=0)
    sys.exit(130)
print("the flush ran to its timeout", flush=True)
sys.exit(1)
"""


@pytest.mark.parametrize("flush_timeout", [None, 60.0])
def test_ctrl_c_taken_by_another_thread_stops_a_flush_long_before_its_timeout(
    tmp_path: Path, flush_timeout: float | None
) -> None:
    limit = 60.0
    timeout = "none" if flush_timeout is None else str(flush_timeout)
    child = subprocess.run(
        [sys.executable, "-c", _CTRL_C_IN_ANOTHER_THREAD, str(tmp_path / "x"), timeout],
        capture_output=True,
        text=True,
        timeout=limit + 30,
    )
    assert child.returncode == 130, child.stdout + child.stderr
    seconds = float(child.stdout.split()[2])
    assert seconds < limit / 10, child.stdout
