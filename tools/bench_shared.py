"""A sweep shared through a PostgreSQL server: the cost of sweepsafe, and of its exports.

Two figures, each beside its reference in the same run, against one throwaway server
(started here as the tests start theirs: ``tests/postgres_support.py``; Debian's
``postgresql`` must be installed, see ``tools/system_packages.sh``):

* four worker processes running one study of short trials to ``n_trials`` through
  ``run_sweep(storage=URL)``, backed up to a simulated Drive (0.5 s per file) with the
  lease holder exporting the study every second, against the same four workers with no
  backup: the time to the end of the sweep, per trial (alternated, medians);
* the export of a 2,000-trial study from the server to a SQLite file, against
  ``optuna.copy_study`` between the same two storages: time and file size.

    python -m tools.bench_shared            # 4 x 200 trials, a 2,000-trial export
    python -m tools.bench_shared --quick    # 4 x 40 trials, a 500-trial export
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from sweepsafe.export import export_study, load_into_server
from tools.bench_studies import STUDY_NAME, build_study

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from postgres_support import running_postgres, unavailable_reason  # noqa: E402

WORKERS = 4
TRIAL_SECONDS = 0.05

_WORKER = """
import logging, sys, time
from pathlib import Path
import optuna
from sweepsafe import run_sweep, study_dir_for, trial_dir
from sweepsafe.testing import FaultPlan, simulated_store

url, local, drive = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
trials, seconds = int(sys.argv[4]), float(sys.argv[5])
optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger("sweepsafe").setLevel(logging.ERROR)
store = None if drive == "-" else simulated_store(local, drive, FaultPlan(latency_s=0.5))
study_dir = study_dir_for(local / "out", "bench")

def objective(trial):
    x = trial.suggest_float("x", -10.0, 10.0)
    (trial_dir(study_dir, trial) / "model.txt").write_text(f"{trial.number} {x}\\n")
    time.sleep(seconds)
    ended.append(time.time())
    return (x - 2.0) ** 2

ended = []

result = run_sweep(objective, output_dir=local / "out", study_key="bench", n_trials=trials,
                   backup_to_drive=store, storage=url, export_interval=1.0)
if store is not None and not result.backup_ok:
    sys.exit(f"backup not complete: {result.backup_report}")
print(max(ended, default=0.0), time.time())
"""


def _row(
    name: str, value: float, unit: str, reference: float, goal: str, met: bool | None
) -> dict[str, Any]:
    return {
        "name": name,
        "value": round(value, 4),
        "unit": unit,
        "reference": round(reference, 4),
        "ratio": round(value / reference, 3) if reference else None,
        "goal": goal,
        "met": met,
    }


def _four_workers(url: str, work: Path, drive: Path | None, n_trials: int) -> tuple[float, float]:
    """Seconds from starting the workers to the end of the last trial, and to the last exit."""
    started = time.time()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                url,
                str(work / f"worker-{index}"),
                "-" if drive is None else str(drive),
                str(n_trials),
                str(TRIAL_SECONDS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(WORKERS)
    ]
    failures, last_trial, last_exit = [], 0.0, 0.0
    for worker in workers:
        out, err = worker.communicate(timeout=1800)
        if worker.returncode != 0:
            failures.append(err.strip() or "no output")
            continue
        trial_end, exit_time = map(float, out.split())
        last_trial, last_exit = max(last_trial, trial_end), max(last_exit, exit_time)
    if failures:
        raise RuntimeError(f"a worker failed: {failures}")
    return last_trial - started, last_exit - started


def measure_workers(server: Any, work: Path, n_trials: int, repeats: int) -> list[dict[str, Any]]:
    plain: list[tuple[float, float]] = []
    safe: list[tuple[float, float]] = []
    for repeat in range(repeats):
        url = server.new_database(f"plain_{repeat}")
        plain.append(_four_workers(url, work / f"plain-{repeat}", None, n_trials))
        url = server.new_database(f"safe_{repeat}")
        safe.append(_four_workers(url, work / f"safe-{repeat}", work / f"drive-{repeat}", n_trials))
    plain_s = statistics.median(run[0] for run in plain)
    safe_s = statistics.median(run[0] for run in safe)
    plain_exit = statistics.median(run[1] for run in plain)
    safe_exit = statistics.median(run[1] for run in safe)
    what = (
        f"{WORKERS} workers, {n_trials} trials of {TRIAL_SECONDS * 1000:.0f} ms through "
        "PostgreSQL, backed up (Drive 0.5 s/file, export every 1 s)"
    )
    return [
        _row(
            f"{what}, ms per trial to the last trial's end (ref: no backup)",
            safe_s / n_trials * 1000,
            "ms",
            plain_s / n_trials * 1000,
            "<= 1.05x",
            safe_s / plain_s <= 1.05,
        ),
        _row(
            f"{what}, s to the last worker's exit, final backup and export included "
            "(ref: no backup)",
            safe_exit,
            "s",
            plain_exit,
            "informative",
            None,
        ),
    ]


def measure_export(server: Any, work: Path, cache: Path, n_trials: int) -> list[dict[str, Any]]:
    source = build_study(cache, n_trials)
    url = server.new_database("export")
    load_into_server(source, url)
    target = work / "export" / "study.db"
    result = export_study(url, STUDY_NAME, target)
    copied = work / "copy" / "study.db"
    copied.parent.mkdir()
    started = time.perf_counter()
    optuna.copy_study(
        from_study_name=STUDY_NAME, from_storage=url, to_storage=f"sqlite:///{copied}"
    )
    copy_s = time.perf_counter() - started
    if result.trials != n_trials:
        raise RuntimeError(f"the export holds {result.trials} trials, not {n_trials}")
    return [
        _row(
            f"export of a {n_trials:,}-trial study from PostgreSQL to SQLite, s "
            "(ref: optuna.copy_study)",
            result.duration_s,
            "s",
            copy_s,
            "informative",
            None,
        ),
        _row(
            "size of that export, MB (ref: the file optuna.copy_study wrote)",
            target.stat().st_size / 1e6,
            "MB",
            copied.stat().st_size / 1e6,
            "informative",
            None,
        ),
    ]


def measure(quick: bool = False) -> list[dict[str, Any]]:
    """The rows of ``tools/bench.py``; none (with the reason on stderr) without PostgreSQL."""
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench_shared: skipped: {reason}", file=sys.stderr)
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cache = Path(os.environ.get("SWEEPSAFE_BENCH_CACHE", tempfile.gettempdir()))
    cache = cache / "sweepsafe-bench-studies"
    cache.mkdir(parents=True, exist_ok=True)
    n_trials, repeats, export_trials = (40, 1, 500) if quick else (200, 3, 2000)
    base = Path(tempfile.mkdtemp(prefix="sweepsafe-bench-shared-", dir="/tmp"))
    base.chmod(0o755)  # the server's unprivileged user must get through
    rows: list[dict[str, Any]] = []
    with running_postgres(base, max_connections=200) as server:
        rows += measure_workers(server, base, n_trials, repeats)
        rows += measure_export(server, base, cache, export_trials)
    subprocess.run(["rm", "-rf", str(base)], check=False)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    for row in measure(quick=args.quick):
        print(
            f"{row['name']}: {row['value']} {row['unit']} against {row['reference']} "
            f"({row['ratio']}x, goal {row['goal']})"
        )


if __name__ == "__main__":
    main()
