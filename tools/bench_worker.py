"""Benchmark the backup worker: submit cost, coalescing, idle cost.

Run ``python tools/bench_worker.py`` (or ``--quick``). Every figure is printed beside a
reference measured in the same run, and their ratio:

- the time ``submit`` takes on the calling thread while copies run (median and p99),
  four threads submitting, against ``queue.Queue.put`` timed the same way beside a
  consumer thread doing the same copies;
- the copies made for many submits to one target against a callable with 0.2 s latency,
  against the number of submits (and the ideal: one copy per latency period);
- the worker's CPU time and thread wake-ups while idle, against a thread idling in
  ``threading.Event().wait`` over the same interval.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sweepsafe.worker import BackupWorker, RetryPolicy

Row = dict[str, object]


def _row(
    name: str,
    value: float,
    unit: str,
    reference: float,
    goal: str,
    met: bool | None,
) -> Row:
    ratio = value / reference if reference else None
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "reference": reference,
        "ratio": ratio,
        "goal": goal,
        "met": met,
    }


def _time_calls_from_threads(call: Callable[[int], object], per_thread: int) -> list[float]:
    """Microseconds each call took on its thread, four threads calling with short pauses.

    Like trial threads finishing trials: the pauses let the worker's threads run too.
    """
    results: list[list[float]] = [[] for _ in range(4)]
    start_together = threading.Barrier(4)

    def run(durations: list[float]) -> None:
        clock = time.perf_counter_ns
        start_together.wait()
        for n in range(per_thread):
            start = clock()
            call(n)
            durations.append((clock() - start) / 1000)
            time.sleep(0.0002)

    threads = [threading.Thread(target=run, args=(durations,)) for durations in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [duration for durations in results for duration in durations]


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def _slow_copy(path: Path, is_directory: bool) -> bool:
    threading.Event().wait(0.005)  # a Drive write of a few milliseconds
    return True


def measure_submit(quick: bool) -> list[Row]:
    """Submit latency while copies run on 20 targets, against a plain queue and consumer.

    The reference is ``queue.Queue.put`` timed the same way, with one consumer thread
    doing the same copies, as a naive background worker would.
    """
    per_thread = 2_500 if quick else 10_000
    targets = [Path(f"/bench/trial-{n}") for n in range(20)]

    with BackupWorker(max_concurrency=2, retry=RetryPolicy(initial_delay=0)) as worker:
        submit = _time_calls_from_threads(
            lambda n: worker.submit(targets[n % 20], _slow_copy), per_thread
        )
        copies = worker.stats().started
        worker.flush()

    jobs: queue.Queue[tuple[Path, Callable[[Path, bool], bool]] | None] = queue.Queue()

    def consume() -> None:
        while (job := jobs.get()) is not None:
            job[1](job[0], False)

    consumer = threading.Thread(target=consume)
    consumer.start()
    put = _time_calls_from_threads(lambda n: jobs.put((targets[n % 20], _slow_copy)), per_thread)
    while not jobs.empty():  # drop the backlog: the plain queue cannot coalesce
        with contextlib.suppress(queue.Empty):
            jobs.get_nowait()
    jobs.put(None)
    consumer.join()

    median, put_median = statistics.median(submit), statistics.median(put)
    p99, put_p99 = _p99(submit), _p99(put)
    label = f"{len(submit)} submits from 4 threads, {copies} copies meanwhile"
    return [
        _row(f"submit median ({label})", median, "µs", put_median, "< 50 µs", median < 50),
        _row(f"submit p99 ({label})", p99, "µs", put_p99, "< 1000 µs", p99 < 1000),
    ]


def measure_coalescing(quick: bool) -> list[Row]:
    """Copies made for many submits to one target, one every 2 ms, with 0.2 s copies."""
    submits = 200 if quick else 1_000
    latency = 0.2
    interval = 0.002
    slow = threading.Event()

    def copy(path: Path, is_directory: bool) -> bool:
        slow.wait(latency)
        return True

    with BackupWorker(retry=RetryPolicy(initial_delay=0)) as worker:
        started = time.monotonic()
        for _ in range(submits):
            worker.submit("/bench/study.db", copy)
            time.sleep(interval)
        worker.flush()
        duration = time.monotonic() - started
        copies = worker.stats().started
    ideal = duration / latency
    return [
        _row(
            f"copies for {submits} submits (0.2 s copies)",
            copies,
            "copies",
            submits,
            f"<= duration/latency + 2 = {ideal + 2:.0f}",
            copies <= ideal + 2,
        )
    ]


def _wakeups(thread_ids: list[int]) -> int:
    """Voluntary context switches of these threads so far (Linux), i.e. their wake-ups."""
    total = 0
    for native_id in thread_ids:
        status = Path(f"/proc/self/task/{native_id}/status")
        for line in status.read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def _idle_cost(seconds: float, thread_ids: list[int]) -> tuple[float, int]:
    cpu_before, wakeups_before = time.process_time(), _wakeups(thread_ids)
    threading.Event().wait(seconds)
    return (time.process_time() - cpu_before) * 1000, _wakeups(thread_ids) - wakeups_before


def measure_idle(quick: bool) -> list[Row]:
    """CPU time and wake-ups of an idle worker, against a thread idling in Event.wait."""
    seconds = 1.0 if quick else 3.0
    idler_ready = threading.Event()
    stop_idler = threading.Event()

    def idle_thread() -> None:
        idler_ready.set()
        stop_idler.wait()

    idler = threading.Thread(target=idle_thread, name="bench-idler")
    idler.start()
    idler_ready.wait()
    assert idler.native_id is not None
    reference_cpu, reference_wakeups = _idle_cost(seconds, [idler.native_id])
    stop_idler.set()
    idler.join()

    with BackupWorker(name="bench-idle-worker") as worker:
        worker.submit("/bench/study.db", lambda path, is_directory: True)
        worker.flush()
        time.sleep(0.2)  # let the loop settle into its idle wait
        ids = [
            thread.native_id
            for thread in threading.enumerate()
            if thread.name in ("bench-idle-worker", "AnyIO worker thread")
            and thread.native_id is not None
        ]
        cpu, wakeups = _idle_cost(seconds, ids)
    return [
        _row(f"idle CPU over {seconds:g} s", cpu, "ms", reference_cpu, "~ reference", None),
        _row(
            f"idle wake-ups of worker threads over {seconds:g} s",
            wakeups,
            "wake-ups",
            reference_wakeups,
            "0",
            wakeups == 0,
        ),
    ]


def measure(quick: bool = False) -> list[Row]:
    """Every figure of this benchmark, each with its reference from the same run."""
    return measure_submit(quick) + measure_coalescing(quick) + measure_idle(quick)


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "n/a" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run")
    args = parser.parse_args()
    rows = measure(quick=args.quick)
    columns = ["name", "value", "unit", "reference", "ratio", "goal", "met"]
    table = [[_format(row[column]) for column in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    main()
