"""Backup lag, sweep overhead with Drive on the study's own disk, and restoring a long chain.

Three measurements, each side by side with its reference in the same run:

1. lag: 200 trials of 20 ms, simulated Drive at 0.5 s per file (on ``/dev/shm``): how
   many finished trials the Drive copy is behind at each trial's end
   (``BackupProgress.lag``). One Drive write takes 0.5 s, in which 25 such trials end,
   so the lag cannot stay below what 0.5 s of trials is.
2. same disk: a FUSE mount (``sweepsafe.testing.FuseDrive``) whose backing folder is on
   the study's file system, 0.5 s per file committed, 120 trials of 20 ms; the sweep
   to its last trial with backups vs without, alternated, medians of five each (the
   pairs spread several percent on a shared 2-core machine).
3. restore: a 20,000-trial study on Drive as a base plus a chain of patches (one per
   trial of a 200-trial sweep), restored by ``DriveStore.restore`` on an empty disk, vs
   a plain copy of the Drive ``study.db`` file, and vs that copy plus
   ``PRAGMA integrity_check``; medians of five.

    python -m tools.bench_history CACHE_DIR                 # all three
    python -m tools.bench_history CACHE_DIR --parts restore
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import optuna

from sweepsafe.backup import BackupProgress
from sweepsafe.drive import DriveStore
from sweepsafe.sweep import run_sweep, study_dir_for
from sweepsafe.testing import FaultPlan, FuseDrive, fuse_unavailable_reason, simulated_store
from sweepsafe.worker import BackupWorker
from tools.bench_studies import STUDY_NAME, build_study

TRIAL_SECONDS = 0.02


def quadratic(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    time.sleep(TRIAL_SECONDS)  # the trial's work
    return (x - 2) ** 2


class LastTrialClock:
    """Notes when the last trial ended, and the backup lag at each trial's end."""

    def __init__(self, progress: BackupProgress | None) -> None:
        self.ended = 0.0
        self.lags: list[int] = []
        self._progress = progress
        self._lock = threading.Lock()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with self._lock:
            self.ended = time.perf_counter()
            if self._progress is not None:
                # Runs before the backup callbacks: this trial is not counted yet.
                self.lags.append(self._progress.lag + 1)


def timed_sweep(output: Path, store: DriveStore | None, n_trials: int, key: str) -> dict[str, Any]:
    progress = BackupProgress() if store is not None else None
    clock = LastTrialClock(progress)
    worker = BackupWorker()
    started = time.perf_counter()
    try:
        result = run_sweep(
            quadratic,
            output_dir=output,
            study_key=key,
            n_trials=n_trials,
            direction="minimize",
            sampler=optuna.samplers.RandomSampler(seed=0),
            callbacks=[clock],
            backup_to_drive=store,
            worker=worker,
            progress=progress,
        )
        finished = time.perf_counter()
    finally:
        worker.close(timeout=120)
    return {
        "sweep_s": clock.ended - started,
        "flush_s": finished - clock.ended,
        "lags": clock.lags,
        "ok": result.backup_ok,
    }


def measure_lag(root: Path, n_trials: int, latency: float) -> dict[str, Any]:
    shm = Path("/dev/shm")
    drive_fs = Path(tempfile.mkdtemp(prefix="lag-drive-", dir=shm if shm.is_dir() else root))
    try:
        local = root / "lag-local"
        local.mkdir()
        with simulated_store(local, drive_fs / "drive", FaultPlan(latency_s=latency)) as store:
            run = timed_sweep(local / "out", store, n_trials, "lag")
    finally:
        shutil.rmtree(drive_fs, ignore_errors=True)
    lags = run["lags"]
    return {
        "trials": n_trials,
        "latency": latency,
        "median": statistics.median(lags),
        "max": max(lags),
        "per_write": latency / TRIAL_SECONDS,
        "ok": run["ok"],
    }


def measure_same_disk(root: Path, n_trials: int, latency: float, repeats: int) -> dict[str, Any]:
    reason = fuse_unavailable_reason()
    if reason is not None:
        return {"skipped": reason}
    plan = root / "fuse-plan.json"
    FaultPlan().write(plan)
    backing, mount = root / "fuse-backing", root / "fuse-mount"
    plains: list[dict[str, Any]] = []
    safes: list[dict[str, Any]] = []
    with FuseDrive(backing, mount, plan, state_dir=root / "fuse-state") as fuse:
        FaultPlan(latency_s=latency).write(plan)
        for repeat in range(repeats):
            plain_local = root / f"plain-{repeat}"
            plains.append(timed_sweep(plain_local / "out", None, n_trials, "same-disk"))
            local = root / f"safe-{repeat}"
            local.mkdir()
            with DriveStore(local, mount / f"drive-{repeat}") as store:
                safes.append(timed_sweep(local / "out", store, n_trials, "same-disk"))
        stats = fuse.stats()
    plain = statistics.median(run["sweep_s"] for run in plains)
    safe = statistics.median(run["sweep_s"] for run in safes)
    return {
        "trials": n_trials,
        "latency": latency,
        "plain_s": plain,
        "safe_s": safe,
        "ratio": safe / plain,
        "ratios": [s["sweep_s"] / p["sweep_s"] for p, s in zip(plains, safes, strict=True)],
        "flush_s": statistics.median(run["flush_s"] for run in safes),
        "median_lag": statistics.median(lag for run in safes for lag in run["lags"]),
        "ok": all(run["ok"] for run in safes),
        "bytes_written": stats.get("bytes_written"),
        "same_fs": os.stat(backing).st_dev == os.stat(root).st_dev,
    }


def chain_on_drive(cache: Path, root: Path, n_patches: int) -> tuple[Path, Path, int]:
    """A 20,000-trial study on Drive as a base and ``n_patches`` patches; its Drive folder."""
    source = build_study(cache, 20000)
    local, drive = root / "chain-local", root / "chain-drive"
    database = study_dir_for(local, "restore") / "study.db"
    database.parent.mkdir(parents=True)
    shutil.copyfile(source, database)
    with simulated_store(local, drive, FaultPlan(), compact_fraction=100.0) as store:
        first = store.backup(database)
        if not first.ok:
            raise RuntimeError(first.error)
        study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{database}")
        for _ in range(n_patches):
            trial = study.ask()
            trial.suggest_float("lr", 1e-5, 1e-1, log=True)
            study.tell(trial, 0.5)
            result = store.backup(database)
            if not result.ok:
                raise RuntimeError(result.error)
        del study
        store.release()
        kinds = [g.kind for g in store.history(database)]
    if kinds.count("base") != 1 or kinds.count("patch") != n_patches:
        raise RuntimeError(f"expected one base and {n_patches} patches, got {kinds}")
    return drive, database.relative_to(local), database.stat().st_size


def plain_copy(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer, 8 << 20)
        writer.flush()
        os.fsync(writer.fileno())


def integrity_check(database: Path) -> None:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        (answer,) = connection.execute("PRAGMA integrity_check").fetchone()
    finally:
        connection.close()
    if answer != "ok":
        raise RuntimeError(f"{database}: {answer}")


def measure_restore(cache: Path, root: Path, n_patches: int, repeats: int) -> dict[str, Any]:
    drive, rel, size = chain_on_drive(cache, root, n_patches)
    copies, checked, restores = [], [], []
    for repeat in range(repeats):
        target = root / f"copy-{repeat}.db"
        started = time.perf_counter()
        plain_copy(drive / rel, target)
        copies.append(time.perf_counter() - started)
        started = time.perf_counter()
        plain_copy(drive / rel, target.with_suffix(".checked"))
        integrity_check(target.with_suffix(".checked"))
        checked.append(time.perf_counter() - started)
        local = root / f"restore-{repeat}"
        local.mkdir()
        with simulated_store(local, drive, FaultPlan()) as store:
            started = time.perf_counter()
            result = store.restore(local / rel)
            restores.append(time.perf_counter() - started)
        if not result.ok or result.generation != n_patches + 1:
            raise RuntimeError(f"restore: {result}")
    restore = statistics.median(restores)
    copy = statistics.median(copies)
    copy_checked = statistics.median(checked)
    return {
        "size": size,
        "patches": n_patches,
        "restore_s": restore,
        "copy_s": copy,
        "checked_s": copy_checked,
        "vs_copy": restore / copy,
        "vs_checked": restore / copy_checked,
    }


def print_lag(lag: dict[str, Any]) -> None:
    print(f"\nBackup lag, {lag['trials']} trials of {TRIAL_SECONDS * 1000:.0f} ms\n")
    print("| Drive s/file | median trials behind | max | trials ending during one write | ok |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| {lag['latency']:g} | {lag['median']:g} | {lag['max']} | {lag['per_write']:.0f} | "
        f"{lag['ok']} |"
    )


def print_same_disk(same: dict[str, Any]) -> None:
    if "skipped" in same:
        print(f"\nSame-disk overhead: skipped ({same['skipped']})")
        return
    print(
        f"\nSweep overhead, Drive stand-in on the study's disk (FUSE, "
        f"{same['latency']:g} s per file), {same['trials']} trials of "
        f"{TRIAL_SECONDS * 1000:.0f} ms\n"
    )
    print(
        "| without backups | with backups | ratio (median) | ratios per pair | final flush | "
        "median lag | same file system | ok |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    pairs = ", ".join(f"{ratio:.3f}" for ratio in same["ratios"])
    print(
        f"| {same['plain_s']:.2f} s | {same['safe_s']:.2f} s | {same['ratio']:.3f}x | {pairs} | "
        f"{same['flush_s']:.2f} s | {same['median_lag']:g} | {same['same_fs']} | {same['ok']} |"
    )
    print("\nGoal: <= 1.02x to the last trial.")


def print_restore(restore: dict[str, Any]) -> None:
    print(
        f"\nRestore of a 20,000-trial study ({restore['size'] / 1e6:.1f} MB) from a base and "
        f"{restore['patches']} patches\n"
    )
    print(
        "| DriveStore.restore | plain copy | restore / copy | copy + integrity_check | "
        "restore / (copy + check) |"
    )
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| {restore['restore_s']:.2f} s | {restore['copy_s']:.2f} s | "
        f"{restore['vs_copy']:.2f}x | {restore['checked_s']:.2f} s | "
        f"{restore['vs_checked']:.2f}x |"
    )
    print("\nGoal: <= 1.2x a plain copy.")


def _row(
    name: str, value: float, unit: str, reference: float, goal: str, met: bool | None
) -> dict[str, Any]:
    return {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "reference": round(reference, 3),
        "ratio": round(value / reference, 3) if reference else None,
        "goal": goal,
        "met": met,
    }


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """The rows of ``tools/bench.py``: lag, same-disk overhead and restore of a long chain.

    The 20,000-trial study is cached under ``SWEEPSAFE_BENCH_CACHE`` (default: a folder in
    the temporary directory), which should be on the study's disk, as for ``main``.
    """
    cache = Path(os.environ.get("SWEEPSAFE_BENCH_CACHE", tempfile.gettempdir()))
    cache = cache / "sweepsafe-bench-studies"
    cache.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("sweepsafe").setLevel(logging.ERROR)
    trials, same_trials, repeats, patches = (60, 40, 1, 20) if quick else (200, 120, 5, 200)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sweepsafe-bench-history-", dir=cache) as tmp:
        root = Path(tmp)
        lag = measure_lag(root, trials, 0.5)
        rows.append(
            _row(
                f"backup lag, median finished trials the Drive copy is behind, {trials} trials "
                f"of {TRIAL_SECONDS * 1000:.0f} ms, Drive 0.5 s/file (ref: trials ending during "
                "one Drive write)",
                lag["median"],
                "trials",
                lag["per_write"],
                "<= 1x",
                lag["ok"] and lag["median"] <= lag["per_write"],
            )
        )
        same = measure_same_disk(root, same_trials, 0.5, repeats)
        if "skipped" not in same:
            rows.append(
                _row(
                    f"sweep of {same_trials} trials, Drive stand-in (FUSE, 0.5 s/file) on the "
                    "study's own disk, s (ref: no backup)",
                    same["safe_s"],
                    "s",
                    same["plain_s"],
                    "<= 1.02x",
                    same["ok"] and same["ratio"] <= 1.02,
                )
            )
        restore = measure_restore(cache, root, patches, repeats)
        rows.append(
            _row(
                f"restore of a 20,000-trial study from a base and {patches} patches, s "
                "(ref: plain copy of the Drive study.db)",
                restore["restore_s"],
                "s",
                restore["copy_s"],
                "<= 1.2x",
                restore["vs_copy"] <= 1.2,
            )
        )
        rows.append(
            _row(
                "the same restore, s (ref: plain copy + PRAGMA integrity_check)",
                restore["restore_s"],
                "s",
                restore["checked_s"],
                "informative",
                None,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="folder that keeps the built studies")
    parser.add_argument("--parts", nargs="+", choices=("lag", "same-disk", "restore"), default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patches", type=int, default=200, help="chain length to restore")
    args = parser.parse_args()
    parts = args.parts or ["lag", "same-disk", "restore"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("sweepsafe").setLevel(logging.ERROR)
    # On the study's own file system (not /dev/shm): part 2 is about that disk.
    with tempfile.TemporaryDirectory(prefix="sweepsafe-bench-history-", dir=args.cache) as tmp:
        root = Path(tmp)
        if "lag" in parts:
            print_lag(measure_lag(root, 200, 0.5))
        if "same-disk" in parts:
            print_same_disk(measure_same_disk(root, 120, 0.5, args.repeats))
        if "restore" in parts:
            print_restore(measure_restore(args.cache, root, args.patches, args.repeats))


if __name__ == "__main__":
    main()
