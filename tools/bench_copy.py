"""Benchmark the copy engine beside cp and rsync, measured in the same run on the same files.

Figures (each with its reference and the ratio):

* DriveStore.backup of a 512 MiB file vs ``cp`` to a temporary name, ``sync`` of it,
  ``mv`` over the previous copy and ``sync`` of the folder (the same atomic, durable
  replace the store makes), and
  vs plain ``cp`` (no fsync: not the same guarantee); goal >= 0.9x the throughput;
* snapshot + ship of a ~200 MiB Optuna study.db vs the same coreutils copy of the file;
* a second backup of an unchanged 10,000-file folder vs ``rsync -a`` of the same folder
  (also a second run); goal: faster than rsync;
* the first backup of that folder vs ``rsync -a``, copying 16 files at once (the
  default ``file_concurrency``) and one at a time;
* the first backup of 60 small trial files through a simulated Drive taking 0.5 s per
  file (its latency on a FUSE mount), 4 files at once vs one at a time;
* peak memory: RSS growth of the calling process, and the helper's peak RSS, during the
  512 MiB copy, against the copy chunk (goal: a few chunks, not the file size);
* the helper's fixed cost per small-file copy, vs the same atomic write done in-process.

    python tools/bench_copy.py            # full sizes
    python tools/bench_copy.py --quick    # small sizes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sweepsafe.drive import COPY_CHUNK, DriveStore
from sweepsafe.testing import FaultPlan, simulated_store

Row = dict[str, object]
MIB = 1 << 20


def _changed(path: Path) -> None:
    """Make ``path`` look changed to the store (a new modification time), then wait until it
    has been quiet long enough to be captured at once: untimed, so that the timed backup
    copies the whole file, as after a real rewrite, rather than finding it unchanged."""
    _changed.count = getattr(_changed, "count", 0) + 1  # type: ignore[attr-defined]
    stamp = time.time_ns() - 3_600_000_000_000 + _changed.count  # type: ignore[attr-defined]
    os.utime(path, ns=(stamp, stamp))
    time.sleep(min(0.3, 0.06 + path.stat().st_size / (1 << 30)))


def _timed(
    action: Callable[[], object], repeats: int, prepare: Callable[[], object] | None = None
) -> float:
    """Median wall time of ``repeats`` runs, each after an untimed ``prepare``."""
    times = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _interleaved(
    actions: dict[str, Callable[[], object]],
    repeats: int,
    prepare: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Best wall time of each action over ``repeats`` rounds, the actions taking turns.

    Best-of-N, as ``timeit`` reports: on a shared VM disk (here mounted with online
    discard) the noise only ever adds time, and single rounds of every action, cp's
    included, vary 2-3x. Every action is followed by an untimed ``sync``, so no action
    pays for another's writeback (an fsync on ext4 can flush every dirty page of the
    journal transaction), and preceded by its untimed ``prepare``, if any.
    """
    prepare = prepare or {}
    times: dict[str, list[float]] = {name: [] for name in actions}
    os.sync()  # start from a clean disk: no writeback of the set-up files in the figures
    for _ in range(2):
        for name, action in actions.items():
            prepare.get(name, lambda: None)()
            action()  # warm-up, not counted: the first rounds on a fresh VM disk are erratic
            os.sync()
    for _ in range(repeats):
        for name, action in actions.items():
            prepare.get(name, lambda: None)()
            started = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - started)
            os.sync()
    return {name: min(values) for name, values in times.items()}


def _row(
    name: str, value: float, unit: str, reference: float, ratio: float, goal: str, met: bool | None
) -> Row:
    return {
        "name": name,
        "value": round(value, 4),
        "unit": unit,
        "reference": round(reference, 4),
        "ratio": round(ratio, 3),
        "goal": goal,
        "met": met,
    }


def _write_random(path: Path, size: int) -> None:
    with open(path, "wb") as file:
        for _ in range(size // MIB):
            file.write(os.urandom(MIB))
        file.write(os.urandom(size % MIB))


def _cp(source: Path, target: Path, *, durable: bool) -> None:
    """``cp``; with ``durable``, the same atomic durable copy the store makes, in coreutils:
    ``cp`` to a temporary name, ``sync`` it, ``mv`` it over the previous copy, ``sync``
    the folder."""
    if not durable:
        target.unlink(missing_ok=True)
        subprocess.run(["cp", str(source), str(target)], check=True)
        return
    temp = target.with_name(f".{target.name}.cp-tmp")
    subprocess.run(["cp", str(source), str(temp)], check=True)
    subprocess.run(["sync", str(temp)], check=True)
    subprocess.run(["mv", "-f", str(temp), str(target)], check=True)
    subprocess.run(["sync", str(target.parent)], check=True)  # the rename, durable


def _require_ok(result: object) -> None:
    if not getattr(result, "ok", False):
        raise RuntimeError(f"backup failed: {getattr(result, 'error', result)}")


def _require_copied(result: object, size: int) -> None:
    """The backup succeeded and shipped the whole file (not found unchanged)."""
    _require_ok(result)
    if getattr(result, "bytes_copied", 0) < size:
        raise RuntimeError(f"the backup copied {getattr(result, 'bytes_copied', 0)} bytes")


def measure_big_file(work: Path, size: int, repeats: int) -> list[Row]:
    local, drive = work / "big-local", work / "big-drive"
    local.mkdir()
    drive.mkdir()
    source = local / "checkpoint.bin"
    _write_random(source, size)
    reference_target = work / "cp-target.bin"
    megabytes = size / MIB
    with DriveStore(local, drive) as store:
        _require_ok(store.backup(source))  # warm: page cache, helper started
        times = _interleaved(
            {
                "ours": lambda: _require_copied(store.backup(source), size),
                "cp_durable": lambda: _cp(source, reference_target, durable=True),
                "cp_plain": lambda: _cp(source, reference_target, durable=False),
            },
            repeats,
            prepare={"ours": lambda: _changed(source)},
        )
    ours, cp_durable, cp_plain = times["ours"], times["cp_durable"], times["cp_plain"]
    reference_target.unlink(missing_ok=True)
    rows = [
        _row(
            f"backup {megabytes:.0f} MiB file, MiB/s (ref: cp, sync, mv, sync dir)",
            megabytes / ours,
            "MiB/s",
            megabytes / cp_durable,
            cp_durable / ours,
            ">= 0.9x",
            cp_durable / ours >= 0.9,
        ),
        _row(
            f"backup {megabytes:.0f} MiB file, MiB/s (ref: plain cp, no fsync)",
            megabytes / ours,
            "MiB/s",
            megabytes / cp_plain,
            cp_plain / ours,
            ">= 0.9x",
            cp_plain / ours >= 0.9,
        ),
    ]
    return rows


def _make_big_study(path: Path, size: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="bench")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=20)
    connection = sqlite3.connect(path)
    trial_ids = [row[0] for row in connection.execute("SELECT trial_id FROM trials")]
    blob = json.dumps("x" * (100 * 1024))
    rows = ((trial_ids[i % len(trial_ids)], f"log_{i}", blob) for i in range(size // (100 * 1024)))
    connection.executemany(
        "INSERT INTO trial_user_attributes (trial_id, key, value_json) VALUES (?, ?, ?)", rows
    )
    connection.commit()
    connection.close()


def measure_study(work: Path, size: int, repeats: int) -> list[Row]:
    local, drive = work / "study-local", work / "study-drive"
    local.mkdir()
    drive.mkdir()
    database = local / "study.db"
    _make_big_study(database, size)
    megabytes = database.stat().st_size / MIB
    target = work / "cp-study.db"
    with DriveStore(local, drive) as store:
        _require_ok(store.backup(database))
        times = _interleaved(
            {
                "ours": lambda: _require_ok(store.backup(database)),
                "cp": lambda: _cp(database, target, durable=True),
            },
            repeats,
        )
    ours, reference = times["ours"], times["cp"]
    target.unlink(missing_ok=True)
    return [
        _row(
            f"snapshot + ship {megabytes:.0f} MiB study.db, s (ref: cp, sync, mv, sync dir)",
            ours,
            "s",
            reference,
            ours / reference,
            "informative (snapshot is an extra full copy)",
            None,
        )
    ]


def measure_folder(work: Path, count: int, repeats: int) -> list[Row]:
    local, drive = work / "folder-local", work / "folder-drive"
    folder = local / "trials"
    for index in range(count):
        path = folder / f"trial-{index // 100:05d}" / f"file-{index:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"trial": index, "loss": index / 7}))
    rsync_target = work / "rsync-target"
    with DriveStore(local, drive, file_concurrency=1) as store:
        os.sync()
        started = time.perf_counter()
        _require_ok(store.backup(folder, is_directory=True))
        sequential = time.perf_counter() - started
    with DriveStore(local, work / "folder-drive-concurrent") as store:
        os.sync()
        started = time.perf_counter()
        _require_ok(store.backup(folder, is_directory=True))
        first = time.perf_counter() - started
        ours = _timed(lambda: _require_ok(store.backup(folder, is_directory=True)), repeats)

    def rsync() -> None:
        subprocess.run(["rsync", "-a", f"{folder}/", f"{rsync_target}/"], check=True)

    os.sync()
    rsync_first_started = time.perf_counter()
    rsync()
    rsync_first = time.perf_counter() - rsync_first_started
    reference = _timed(rsync, repeats)
    return [
        _row(
            f"second backup of unchanged {count}-file folder, s (ref: rsync -a, second run)",
            ours,
            "s",
            reference,
            ours / reference,
            "< 1x (faster than rsync)",
            ours < reference,
        ),
        _row(
            f"first backup of the {count}-file folder, 16 files at once (the default), s "
            "(ref: rsync -a, first run, no fsync)",
            first,
            "s",
            rsync_first,
            first / rsync_first,
            "informative (fsync per file)",
            None,
        ),
        _row(
            f"first backup of the {count}-file folder, one file at a time, s "
            "(ref: rsync -a, first run, no fsync)",
            sequential,
            "s",
            rsync_first,
            sequential / rsync_first,
            "informative (fsync per file)",
            None,
        ),
    ]


def measure_folder_latency(work: Path, count: int, latency_s: float) -> list[Row]:
    """A folder of small trial files through a Drive with ``latency_s`` per file."""
    local = work / "latency-local"
    folder = local / "trials"
    for index in range(count):
        path = folder / f"trial-{index:03d}" / "params.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"trial": index}))
    (local / "warm-up").mkdir()
    times = {}
    for concurrency in (1, 4):
        drive = work / f"latency-drive-{concurrency}"
        plan = FaultPlan(latency_s=latency_s)
        with simulated_store(local, drive, plan, file_concurrency=concurrency) as store:
            _require_ok(store.backup(local / "warm-up", is_directory=True))  # id file, helper
            started = time.perf_counter()
            _require_ok(store.backup(folder, is_directory=True))
            times[concurrency] = time.perf_counter() - started
    return [
        _row(
            f"first backup of {count} small files, Drive at {latency_s:g} s per file, 4 at "
            "once, s (ref: one at a time)",
            times[4],
            "s",
            times[1],
            times[4] / times[1],
            "informative (about 1/4)",
            None,
        )
    ]


_MEMORY_CHILD = """
import json, resource, sys
from pathlib import Path
from sweepsafe.drive import DriveStore
local, drive = Path(sys.argv[1]), Path(sys.argv[2])

def helper_peak_kib(store):
    # VmHWM: the helper's own peak RSS since it started (exec resets it).
    pid = store._pool._idle[0].process.pid
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

store = DriveStore(local, drive)
assert store.backup(local / "tiny.txt").ok
idle_helper = helper_peak_kib(store)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert store.backup(local / "checkpoint.bin").ok
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
busy_helper = helper_peak_kib(store)
store.close()
print(json.dumps({"growth_kib": after - before, "helper_growth_kib": busy_helper - idle_helper}))
"""


def measure_memory(work: Path) -> list[Row]:
    local = work / "big-local"
    (local / "tiny.txt").write_text("warm up")
    output = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(local), str(work / "memory-drive")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    size = (local / "checkpoint.bin").stat().st_size
    chunk_mib = COPY_CHUNK / MIB
    growth = figures["growth_kib"] / 1024
    helper_growth = figures["helper_growth_kib"] / 1024
    return [
        _row(
            f"RSS growth of the caller during a {size // MIB} MiB backup, MiB (ref: one chunk)",
            growth,
            "MiB",
            chunk_mib,
            growth / chunk_mib,
            "<= 4 chunks",
            growth <= 4 * chunk_mib,
        ),
        _row(
            f"peak RSS growth of the helper during the {size // MIB} MiB backup, MiB "
            "(ref: one chunk)",
            helper_growth,
            "MiB",
            chunk_mib,
            helper_growth / chunk_mib,
            "<= 4 chunks",
            helper_growth <= 4 * chunk_mib,
        ),
    ]


def measure_small_files(work: Path, count: int) -> list[Row]:
    local, drive = work / "small-local", work / "small-drive"
    local.mkdir()
    source = local / "params.json"
    source.write_text('{"lr": 0.001}')
    with DriveStore(local, drive) as store:
        _require_ok(store.backup(source))
        size = source.stat().st_size
        ours = _timed(
            lambda: _require_copied(store.backup(source), size), count, lambda: _changed(source)
        )
    direct_target = work / "direct" / "params.json"
    direct_target.parent.mkdir()

    def in_process() -> None:
        temp = direct_target.with_name(".params.json.tmp")
        with open(source, "rb") as reader, open(temp, "wb") as writer:
            writer.write(reader.read())
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(temp, direct_target)
        folder = os.open(direct_target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    reference = _timed(in_process, count)
    started = time.perf_counter()
    with DriveStore(local, work / "cold-drive") as cold:
        _require_ok(cold.backup(source))
    cold_time = time.perf_counter() - started
    return [
        _row(
            "backup of a small file through the helper, ms (ref: same atomic write in-process)",
            ours * 1000,
            "ms",
            reference * 1000,
            ours / reference,
            "informative (helper round trips)",
            None,
        ),
        _row(
            "first backup with a new helper process, ms (ref: warm helper)",
            cold_time * 1000,
            "ms",
            ours * 1000,
            cold_time / ours,
            "informative (spawn cost)",
            None,
        ),
    ]


def measure(quick: bool = False) -> list[Row]:
    """Every figure of this benchmark, as rows for BENCHMARKS.md."""
    big = (64 if quick else 512) * MIB
    study = (20 if quick else 200) * MIB
    files = 2_000 if quick else 10_000
    repeats = 5 if quick else 7
    work = Path(tempfile.mkdtemp(prefix="sweepsafe-bench-copy-"))
    try:
        rows = measure_big_file(work, big, repeats)
        rows += measure_memory(work)
        rows += measure_study(work, study, repeats)
        rows += measure_folder(work, files, repeats)
        rows += measure_folder_latency(work, 20 if quick else 60, 0.5)
        rows += measure_small_files(work, 50 if quick else 200)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    rows = measure(quick=args.quick)
    columns = ("name", "value", "unit", "reference", "ratio", "goal", "met")
    table = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    main()
