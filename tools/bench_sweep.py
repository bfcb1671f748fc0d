"""Sweep overhead: no backup vs sweepsafe vs a naive synchronous copy, side by side.

A sweep of short trials (about 20 ms each) runs three times against the same simulated
Drive, which takes ``--latency`` seconds per file:

  (a) no backup at all, (b) run_sweep with a DriveStore, (c) a naive callback that
  copies study.db synchronously after every trial.

Each sweep is timed from the call to the end of its last trial; (b)'s final flush is
timed separately. (a) and (b) alternate, three times each (two with --quick), and the
medians are compared, because this machine is shared and noisy. The backup lag is how
many finished trials the Drive copy was behind at the end of each trial.

The stand-in for Drive lives on a different file system from the study (``/dev/shm``
where there is one), as a real Drive mount does: on the same disk, the stand-in's fsyncs
would queue behind SQLite's own and measure the disk, not sweepsafe.

    python tools/bench_sweep.py            # 200 trials, 0.5 s per Drive copy
    python tools/bench_sweep.py --quick    # 40 trials, 0.2 s
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import optuna

from sweepsafe.backup import BackupProgress
from sweepsafe.sweep import run_sweep, study_dir_for
from sweepsafe.testing import FaultPlan, simulated_store
from sweepsafe.worker import BackupWorker

TRIAL_SECONDS = 0.02


def objective(trial: optuna.trial.Trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    time.sleep(TRIAL_SECONDS)  # the trial's work
    return (x - 2) ** 2


class LastTrialClock:
    """An Optuna callback that notes when the last trial ended and the backup lag then."""

    def __init__(self, progress: BackupProgress | None = None) -> None:
        self.ended = 0.0
        self.lags: list[int] = []
        self._progress = progress
        self._lock = threading.Lock()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with self._lock:
            self.ended = time.perf_counter()
            if self._progress is not None:
                # Runs before the backup callbacks, so this trial is not counted yet.
                self.lags.append(self._progress.lag + 1)


def _sweep(root: Path, drive_fs: Path, mode: str, n_trials: int, latency: float) -> dict[str, Any]:
    run = tempfile.mkdtemp(prefix=f"{mode}-", dir=root)
    local = Path(run) / "local"
    drive = Path(tempfile.mkdtemp(prefix=f"{mode}-drive-", dir=drive_fs))
    local.mkdir(parents=True)
    plan = Path(run) / "plan.json"
    FaultPlan(latency_s=latency).write(plan)
    store = simulated_store(local, drive, plan)
    worker = BackupWorker()
    progress = BackupProgress()
    clock = LastTrialClock(progress if mode == "sweepsafe" else None)
    callbacks: list[Any] = [clock]
    if mode == "naive":
        database = study_dir_for(local, "bench") / "study.db"
        callbacks.append(lambda study, trial: store.backup(database))
    started = time.perf_counter()
    result = run_sweep(
        objective,
        output_dir=local,
        study_key="bench",
        n_trials=n_trials,
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        callbacks=callbacks,
        backup_to_drive=store if mode == "sweepsafe" else None,
        worker=worker,
        progress=progress,
    )
    finished = time.perf_counter()
    stats = worker.stats()
    worker.close(timeout=60)
    store.close()
    copies = sum(t.copies for t in stats.targets if t.target.name == "study.db")
    return {
        "sweep_s": clock.ended - started,
        "flush_s": finished - clock.ended,
        "lags": clock.lags,
        "copies": copies,
        "ok": result.backup_ok,
    }


def measure(quick: bool = False) -> list[dict[str, object]]:
    n_trials, latency, repeats = (40, 0.2, 2) if quick else (200, 0.5, 3)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("sweepsafe").setLevel(logging.ERROR)
    shm = Path("/dev/shm")
    with (
        tempfile.TemporaryDirectory(prefix="sweepsafe-bench-sweep-") as tmp,
        tempfile.TemporaryDirectory(
            prefix="sweepsafe-bench-drive-", dir=shm if shm.is_dir() else None
        ) as drive_fs,
    ):
        root = Path(tmp)
        plains, safes = [], []
        for _ in range(repeats):
            plains.append(_sweep(root, Path(drive_fs), "plain", n_trials, latency))
            safes.append(_sweep(root, Path(drive_fs), "sweepsafe", n_trials, latency))
        naive = _sweep(root, Path(drive_fs), "naive", n_trials, latency)
    plain = _median_run(plains)
    safe = _median_run(safes)
    overhead = safe["sweep_s"] / plain["sweep_s"]
    naive_ratio = naive["sweep_s"] / plain["sweep_s"]
    lags: list[int] = [lag for run in safes for lag in run["lags"]]
    label = f"{n_trials} trials of {TRIAL_SECONDS * 1000:.0f} ms, Drive {latency} s per copy"
    return [
        {
            "name": f"sweep with sweepsafe vs no backup ({label})",
            "value": round(safe["sweep_s"], 3),
            "unit": "s",
            "reference": round(plain["sweep_s"], 3),
            "ratio": round(overhead, 3),
            "goal": "<= 1.02",
            "met": overhead <= 1.02,
        },
        {
            "name": f"sweep with a naive synchronous copy vs no backup ({label})",
            "value": round(naive["sweep_s"], 3),
            "unit": "s",
            "reference": round(plain["sweep_s"], 3),
            "ratio": round(naive_ratio, 3),
            "goal": "for comparison",
            "met": None,
        },
        {
            "name": "final flush after the last trial vs one Drive copy",
            "value": round(safe["flush_s"], 3),
            "unit": "s",
            "reference": latency,
            "ratio": round(safe["flush_s"] / latency, 2),
            "goal": "about one copy of each target",
            "met": safe["flush_s"] <= 4 * latency + 1.0,
        },
        {
            "name": "copies of study.db made vs trials",
            "value": safe["copies"],
            "unit": "copies",
            "reference": n_trials,
            "ratio": round(safe["copies"] / n_trials, 3),
            "goal": "about duration / latency",
            "met": safe["copies"] < n_trials,
        },
        {
            "name": "backup lag at a trial's end, max (median)",
            "value": f"{max(lags)} ({statistics.median(lags):g})",
            "unit": "trials",
            "reference": f"{latency / TRIAL_SECONDS:.0f} trials per copy",
            "ratio": None,
            "goal": "bounded by the trials in one copy time",
            "met": None,
        },
        {
            "name": "final Drive copy complete",
            "value": all(run["ok"] for run in safes),
            "unit": "",
            "reference": None,
            "ratio": None,
            "goal": "True",
            "met": all(run["ok"] for run in safes),
        },
    ]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose sweep time is the median of ``runs``."""
    return sorted(runs, key=lambda run: run["sweep_s"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast version")
    args = parser.parse_args()
    rows = measure(quick=args.quick)
    width = max(len(str(row["name"])) for row in rows)
    for row in rows:
        ratio = "" if row["ratio"] is None else f"ratio {row['ratio']}"
        print(
            f"{row['name']:<{width}}  {row['value']} {row['unit']}  "
            f"(ref {row['reference']})  {ratio}  goal {row['goal']}"
        )


if __name__ == "__main__":
    main()
