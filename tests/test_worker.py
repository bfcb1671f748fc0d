"""The backup worker runs copies off the caller's thread: coalescing, concurrency, retries."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweepsafe.errors import DrivePathError
from sweepsafe.worker import BackupWorker, RetryPolicy
from worker_support import DoneCopy, FailedCopy, LogWatch, WorkerRig, next_tick


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


# -- coalescing ---------------------------------------------------------------------------


def test_submits_while_a_job_waits_add_nothing(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker()
    drive = rig.drive(held=True)
    target = tmp_path / "study.db"
    worker.submit(target, drive)
    drive.wait_for_calls(1)  # the first job runs and is held
    for _ in range(5):
        worker.submit(target, drive)  # the first waits, the other four are coalesced into it

    stats = worker.stats()
    assert (stats.submitted, stats.coalesced, stats.started) == (6, 4, 1)
    (state,) = stats.targets
    assert state.running
    assert state.waiting

    drive.release()
    assert worker.flush(timeout=30).ok
    assert len(drive.calls_for(target)) == 2
    assert worker.stats().started == 2


def test_submit_while_running_schedules_exactly_one_rerun(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker()
    drive = rig.drive(held=True)
    target = tmp_path / "study.db"
    worker.submit(target, drive)
    drive.wait_for_calls(1)
    worker.submit(target, drive)
    drive.release()
    drive.wait_for_calls(2)

    assert worker.flush(timeout=30).ok
    calls = drive.calls_for(target)
    assert len(calls) == 2
    assert worker.stats().coalesced == 0


def test_a_quiet_target_is_copied_once_per_submit(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker()
    drive = rig.drive()
    target = tmp_path / "study.db"
    for _ in range(3):
        worker.submit(target, drive)
        assert worker.flush(timeout=30).ok
    assert len(drive.calls_for(target)) == 3


# -- concurrency --------------------------------------------------------------------------


def test_different_targets_run_concurrently_up_to_max_concurrency(
    rig: WorkerRig, tmp_path: Path
) -> None:
    worker = rig.worker(max_concurrency=2)
    drive = rig.drive(held=True)
    targets = [tmp_path / f"trial-{n}" for n in range(5)]
    for target in targets:
        worker.submit(target, drive, is_directory=True)
    drive.wait_for_calls(2)  # two copies run at once, both held
    assert sum(state.running for state in worker.stats().targets) == 2

    drive.release()
    report = worker.flush(timeout=30)
    assert report.ok
    assert len(report.targets) == 5
    assert drive.max_active == 2
    assert {call.target for call in drive.calls} == set(targets)
    assert all(call.is_directory for call in drive.calls)


def test_the_same_target_never_runs_twice_at_once(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(max_concurrency=4)
    drive = rig.drive()
    targets = [tmp_path / "study.db", tmp_path / "trials"]

    def submit_many() -> None:
        for n in range(300):
            worker.submit(targets[n % 2], drive)

    threads = [threading.Thread(target=submit_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert worker.flush(timeout=30).ok
    assert drive.max_active_per_target == 1


def test_async_callables_are_awaited_on_the_worker_loop(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(name="loop-under-test")
    drive = rig.async_drive()
    worker.submit(tmp_path / "study.db", drive)
    assert worker.flush(timeout=30).ok
    (call,) = drive.calls
    assert call.thread == "loop-under-test"


def test_sync_callables_run_in_worker_threads(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(name="loop-under-test")
    drive = rig.drive()
    worker.submit(tmp_path / "study.db", drive)
    assert worker.flush(timeout=30).ok
    (call,) = drive.calls
    assert call.thread not in ("loop-under-test", threading.current_thread().name)


def test_an_awaitable_returned_by_a_sync_callable_is_awaited(
    rig: WorkerRig, tmp_path: Path
) -> None:
    worker = rig.worker()
    drive = rig.async_drive(result=DoneCopy(bytes_copied=7))
    # A lambda around a bound async method, as a user might pass it.
    worker.submit(tmp_path / "study.db", lambda path, is_dir: drive(path, is_dir))
    report = worker.flush(timeout=30)
    assert report.ok
    assert report.targets[0].last_result == DoneCopy(bytes_copied=7)
    assert worker.stats().bytes_copied == 7


def test_async_and_sync_copies_share_the_concurrency_limit(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(max_concurrency=1)
    sync_drive = rig.drive(held=True)
    async_drive = rig.async_drive()
    worker.submit(tmp_path / "a", sync_drive)
    sync_drive.wait_for_calls(1)
    worker.submit(tmp_path / "b", async_drive)
    pending = worker.flush(timeout=0.05).pending
    assert [report.target for report in pending] == [tmp_path / "a", tmp_path / "b"]
    assert async_drive.calls == []  # it waits for the single slot

    sync_drive.release()
    assert worker.flush(timeout=30).ok
    assert len(async_drive.calls) == 1


def test_targets_are_made_absolute_without_touching_the_disk(
    rig: WorkerRig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    worker = rig.worker()
    drive = rig.drive()
    worker.submit("missing/study.db", drive)  # nothing there: submit must not look
    assert worker.flush(timeout=30).ok
    assert drive.calls[0].target == tmp_path / "missing" / "study.db"


# -- retries ------------------------------------------------------------------------------


def test_a_failed_backup_is_retried_until_it_succeeds(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(retry=RetryPolicy(initial_delay=0.0, max_attempts=5))
    drive = rig.drive()
    drive.fail_next(OSError("Transport endpoint is not connected"), False)
    target = tmp_path / "study.db"
    worker.submit(target, drive)

    report = worker.flush(timeout=30)
    assert report.ok
    assert report.targets[0].attempts == 3
    assert len(drive.calls_for(target)) == 3
    stats = worker.stats()
    assert (stats.started, stats.retried, stats.succeeded, stats.failed) == (1, 2, 1, 0)


def test_retries_wait_out_their_backoff_then_run(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(retry=RetryPolicy(initial_delay=0.01, max_attempts=4))
    drive = rig.drive()
    drive.fail_next(OSError("Input/output error"), OSError("Input/output error"))
    before = time.time()
    worker.submit(tmp_path / "study.db", drive)

    report = worker.flush(timeout=30)
    assert report.ok
    (target,) = report.targets
    assert target.attempts == 3
    assert target.last_error is None
    assert target.last_success is not None
    assert before <= target.last_success <= time.time()


def test_the_worker_gives_up_after_max_attempts(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(retry=RetryPolicy(initial_delay=0.0, max_attempts=3))
    drive = rig.drive()
    drive.fail_always(FailedCopy("Drive quota exceeded"))
    target = tmp_path / "study.db"
    worker.submit(target, drive)

    report = worker.flush(timeout=30)
    assert not report.ok
    assert not report.timed_out
    (failed,) = report.failed
    assert failed.target == target
    assert failed.attempts == 3
    assert failed.last_error == "Drive quota exceeded"
    assert failed.last_result == FailedCopy("Drive quota exceeded")
    assert len(drive.calls) == 3
    stats = worker.stats()
    assert (stats.failed, stats.retried) == (1, 2)


@pytest.mark.parametrize(
    "outcome",
    [
        FailedCopy("destination is not on Drive", retryable=False),
        FileNotFoundError(2, "No such file or directory"),
        NotADirectoryError(20, "Not a directory"),
        IsADirectoryError(21, "Is a directory"),
        DrivePathError("the study folder is itself on Drive"),
    ],
    ids=lambda outcome: type(outcome).__name__,
)
def test_failures_retrying_cannot_mend_are_not_retried(
    rig: WorkerRig, tmp_path: Path, outcome: object
) -> None:
    worker = rig.worker(retry=RetryPolicy(initial_delay=0.0, max_attempts=5))
    drive = rig.drive()
    drive.fail_next(outcome)
    worker.submit(tmp_path / "study.db", drive)

    report = worker.flush(timeout=30)
    assert len(report.failed) == 1
    assert len(drive.calls) == 1
    assert worker.stats().retried == 0


def test_a_false_result_is_retried(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(retry=RetryPolicy(initial_delay=0.0, max_attempts=2))
    drive = rig.drive()
    drive.fail_next(False)
    worker.submit(tmp_path / "study.db", drive)
    assert worker.flush(timeout=30).ok
    assert len(drive.calls) == 2


def test_a_new_submit_replaces_a_waiting_retry(
    rig: WorkerRig, tmp_path: Path, log_watch: LogWatch
) -> None:
    # The retry would wait a minute; the new submit must run long before that.
    worker = rig.worker(retry=RetryPolicy(initial_delay=60.0, max_attempts=5))
    drive = rig.drive()
    drive.fail_next(OSError("Input/output error"))
    retry_scheduled = threading.Event()
    log_watch._matches = lambda record: "will retry" in record.getMessage()
    log_watch.matched = retry_scheduled
    target = tmp_path / "study.db"
    worker.submit(target, drive)
    assert retry_scheduled.wait(30)
    assert worker.stats().targets[0].waiting

    worker.submit(target, drive)
    report = worker.flush(timeout=30)
    assert not report.timed_out
    assert report.ok
    assert len(drive.calls) == 2
    assert report.targets[0].attempts == 1  # the new job's first attempt


def test_retry_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_delay=0.5, multiplier=2.0, max_delay=3.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_retry_jitter_stays_within_its_fraction() -> None:
    policy = RetryPolicy(initial_delay=1.0, jitter=0.1)
    rng = random.Random(4)
    delays = [policy.delay(1, rng) for _ in range(1000)]
    assert all(0.9 <= delay <= 1.1 for delay in delays)
    assert len(set(delays)) > 900


def test_zero_initial_delay_retries_at_once() -> None:
    assert RetryPolicy(initial_delay=0.0).delay(4) == 0.0


@pytest.mark.parametrize(
    "options",
    [{"max_attempts": 0}, {"initial_delay": -1.0}, {"jitter": 1.5}, {"multiplier": 0.5}],
)
def test_nonsense_retry_policies_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|cannot|fraction"):
        RetryPolicy(**options)  # type: ignore[arg-type]


# -- errors and logging -------------------------------------------------------------------


def test_errors_never_reach_the_submitter(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(retry=RetryPolicy(initial_delay=0.0, max_attempts=2))
    drive = rig.drive()
    drive.fail_always(RuntimeError("Drive exploded"))
    target = tmp_path / "study.db"
    for _ in range(3):
        worker.submit(target, drive)  # never raises, however often the copies fail
        report = worker.flush(timeout=30)
        assert "RuntimeError: Drive exploded" in str(report)
    worker.submit(target, lambda path, is_dir: 1 / 0)
    assert "ZeroDivisionError" in str(worker.flush(timeout=30))


def test_each_failure_is_logged_once_and_recovery_at_info(
    rig: WorkerRig, tmp_path: Path, log_watch: LogWatch
) -> None:
    worker = rig.worker(retry=RetryPolicy(initial_delay=0.0, max_attempts=3))
    drive = rig.drive()
    target = tmp_path / "study.db"
    drive.fail_always(OSError("Input/output error"))
    for _ in range(4):
        worker.submit(target, drive)
        worker.flush(timeout=30)
    warnings = log_watch.messages(logging.WARNING)
    assert len(warnings) == 1
    assert str(target) in warnings[0]
    assert "Input/output error" in warnings[0]

    drive.fail_always(OSError("Transport endpoint is not connected"))
    worker.submit(target, drive)
    worker.flush(timeout=30)
    assert len(log_watch.messages(logging.WARNING)) == 2

    drive.fail_always(None)
    for _ in range(3):
        worker.submit(target, drive)
        assert worker.flush(timeout=30).ok
    infos = log_watch.messages(logging.INFO)
    assert len(infos) == 1
    assert str(target) in infos[0]
    assert len(log_watch.messages(logging.WARNING)) == 2


def test_successful_copies_log_nothing_at_info(
    rig: WorkerRig, tmp_path: Path, log_watch: LogWatch
) -> None:
    worker = rig.worker()
    drive = rig.drive()
    for n in range(20):
        worker.submit(tmp_path / f"trial-{n}", drive)
    assert worker.flush(timeout=30).ok
    assert [r for r in log_watch.records if r.levelno >= logging.INFO] == []


def test_failures_reach_handlers_on_the_sweepsafe_logger(rig: WorkerRig, tmp_path: Path) -> None:
    watch = LogWatch()
    logging.getLogger("sweepsafe").addHandler(watch)
    try:
        worker = rig.worker()
        drive = rig.drive()
        drive.fail_next(OSError("Input/output error"))
        worker.submit(tmp_path / "study.db", drive)
        worker.flush(timeout=30)
    finally:
        logging.getLogger("sweepsafe").removeHandler(watch)
    assert [record.name for record in watch.records] == ["sweepsafe.worker"]


# -- threads ------------------------------------------------------------------------------


def test_a_job_may_submit_another_but_may_not_wait_on_its_own_loop(
    rig: WorkerRig, tmp_path: Path
) -> None:
    worker = rig.worker()
    refused: list[str] = []
    ran: list[Path] = []

    async def follow_up(path: Path, is_directory: bool) -> bool:
        ran.append(path)
        return True

    async def reentrant_backup(path: Path, is_directory: bool) -> bool:
        await asyncio.sleep(0)
        worker.submit(tmp_path / "follow-up", follow_up)  # schedules, never waits
        for call in (lambda: worker.flush(1), lambda: worker.close(1)):
            try:
                call()
            except RuntimeError as exc:
                refused.append(str(exc))
        return True

    worker.submit(tmp_path / "study.db", reentrant_backup)
    worker.flush(timeout=30)  # the follow-up was submitted before this returned...
    assert worker.flush(timeout=30).ok  # ...so this one waits for it
    assert ran == [tmp_path / "follow-up"]
    assert len(refused) == 2
    assert all("event loop" in message for message in refused)


def test_eight_threads_submitting_ten_thousand_jobs_lose_none(
    rig: WorkerRig, tmp_path: Path
) -> None:
    worker = rig.worker(max_concurrency=4)
    drive = rig.drive()
    targets = [tmp_path / f"trial-{n}" for n in range(50)]
    last_submit: dict[Path, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def submit_share(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for _ in range(1250):
            target = rng.choice(targets)
            tick = next_tick()  # taken before the submit: the copy must start after it
            worker.submit(target, drive)
            with lock:
                last_submit[target] = max(last_submit.get(target, -1), tick)

    threads = [threading.Thread(target=submit_share, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = worker.flush(timeout=60)

    assert report.ok
    assert len(report.targets) == 50
    for target, tick in last_submit.items():
        last_copy = max(call.tick for call in drive.calls_for(target))
        assert last_copy > tick, target
    stats = worker.stats()
    assert stats.submitted == 10_000
    assert stats.started + stats.coalesced == stats.submitted
    assert stats.succeeded == stats.started == len(drive.calls)
    assert drive.max_active_per_target == 1


def test_stats_is_a_snapshot_of_every_target(rig: WorkerRig, tmp_path: Path) -> None:
    worker = rig.worker(max_concurrency=1)
    drive = rig.drive(held=True)
    worker.submit(tmp_path / "a", drive)
    drive.wait_for_calls(1)
    worker.submit(tmp_path / "b", drive)
    states = {state.target: state for state in worker.stats().targets}
    assert (states[tmp_path / "a"].running, states[tmp_path / "a"].waiting) == (True, False)
    assert (states[tmp_path / "b"].running, states[tmp_path / "b"].waiting) == (False, True)
    assert all(state.copies == 0 and state.last_success is None for state in states.values())

    drive.release()
    assert worker.flush(timeout=30).ok
    states = {state.target: state for state in worker.stats().targets}
    assert all(state.copies == 1 and state.last_success is not None for state in states.values())
    assert not any(state.running or state.waiting for state in states.values())


def test_worker_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        BackupWorker(max_concurrency=0)
    with pytest.raises(ValueError, match="interval"):
        BackupWorker().every("heartbeat", 0, None)


def test_the_progress_bar_costs_the_same_after_thousands_of_trial_folders(tmp_path: Path) -> None:
    # `sweepsafe run` calls its progress bar on the trial's thread at every trial, and the
    # worker keeps one target per trial folder: the call must not grow with the trials run
    # (it did, a snapshot of every target taken under the lock every submit() takes).
    import optuna

    from sweepsafe.backup import BackupProgress
    from sweepsafe.cli._progress import SweepProgressBar

    study = optuna.create_study()
    study.optimize(lambda trial: 1.0, n_trials=1)
    trial = study.trials[0]

    def call_cost(targets: int) -> float:
        with BackupWorker() as worker:
            for number in range(targets):
                worker.submit(tmp_path / f"trial-{number:05d}", lambda path, is_dir: True)
            assert worker.flush(60).ok
            bar = SweepProgressBar(
                total=None, progress=BackupProgress(), worker=worker, enabled=False
            )
            times = []
            for _ in range(15):
                started = time.perf_counter()
                bar(study, trial)
                times.append(time.perf_counter() - started)
            return min(times)  # the cost itself, without the machine's noise

    few, many = call_cost(10), call_cost(4_000)
    assert many < 10 * few, (few, many)
