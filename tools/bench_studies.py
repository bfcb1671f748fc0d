"""Large Optuna studies for the history benchmarks, built fast and kept in a cache folder.

Running 20,000 trials through ``study.optimize`` takes about 25 minutes; writing the same
trials with ``study.add_trials`` in batches, with SQLite's ``synchronous=OFF`` while
building, takes a minute or two. The trials have the shape of :func:`objective`'s, so a
sweep that continues a cached study changes the same pages a real one would.

    python tools/bench_studies.py CACHE_DIR 5000 20000   # build (or reuse) both
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import create_trial

STUDY_NAME = "bench"
TRIAL_SECONDS = 0.02
STEPS = 5
"""Intermediate values each trial reports, as a pruned training loop would."""

DISTRIBUTIONS: dict[str, Any] = {
    "lr": FloatDistribution(1e-5, 1e-1, log=True),
    "dropout": FloatDistribution(0.0, 0.5),
    "layers": IntDistribution(1, 6),
    "width": IntDistribution(16, 512, log=True),
    "optimizer": CategoricalDistribution(("adam", "sgd", "rmsprop")),
}


def _loss(params: dict[str, Any], step: int) -> float:
    lr, dropout = float(params["lr"]), float(params["dropout"])
    layers = int(params["layers"])
    return abs(math.log10(lr) + 3.0) + dropout * 0.3 + 1.0 / (step + 1) + 0.01 * layers


def objective(trial: optuna.Trial) -> float:
    """A short trial (``TRIAL_SECONDS``) with five parameters and five reported steps."""
    params: dict[str, Any] = {
        "lr": trial.suggest_float("lr", 1e-5, 1e-1, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.5),
        "layers": trial.suggest_int("layers", 1, 6),
        "width": trial.suggest_int("width", 16, 512, log=True),
        "optimizer": trial.suggest_categorical("optimizer", ["adam", "sgd", "rmsprop"]),
    }
    value = 0.0
    for step in range(STEPS):
        value = _loss(params, step)
        trial.report(value, step)
    time.sleep(TRIAL_SECONDS)  # the trial's work
    return value


def _made_trial(rng: random.Random) -> optuna.trial.FrozenTrial:
    params: dict[str, Any] = {
        "lr": 10 ** rng.uniform(-5, -1),
        "dropout": rng.uniform(0.0, 0.5),
        "layers": rng.randint(1, 6),
        "width": round(2 ** rng.uniform(4, 9)),
        "optimizer": rng.choice(("adam", "sgd", "rmsprop")),
    }
    steps = {step: _loss(params, step) for step in range(STEPS)}
    return create_trial(
        params=params,
        distributions=DISTRIBUTIONS,
        value=steps[STEPS - 1],
        intermediate_values=steps,
    )


def build_study(cache: Path, n_trials: int, *, batch: int = 500) -> Path:
    """A study database of ``n_trials`` finished trials in ``cache`` (built once, then reused).

    The file is built under another name and renamed when complete, so a build that was
    interrupted is never taken for a finished one.
    """
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"study-{n_trials}.db"
    if path.exists():
        return path
    building = cache / f".study-{n_trials}.db.building"
    for leftover in (building, Path(f"{building}-journal")):
        if leftover.exists():
            leftover.unlink()
    storage = optuna.storages.RDBStorage(f"sqlite:///{building}")
    from sqlalchemy import event

    def no_fsync(connection: Any, _record: Any) -> None:
        connection.execute("PRAGMA synchronous=OFF")

    event.listen(storage.engine, "connect", no_fsync)
    storage.engine.dispose()
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="minimize")
    rng = random.Random(n_trials)
    done = 0
    while done < n_trials:
        size = min(batch, n_trials - done)
        study.add_trials([_made_trial(rng) for _ in range(size)])
        done += size
    storage.engine.dispose()
    del study, storage
    connection = sqlite3.connect(building)
    connection.execute("VACUUM")
    connection.close()
    os.replace(building, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="folder that keeps the built studies")
    parser.add_argument("sizes", type=int, nargs="+", help="trials per study")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for size in args.sizes:
        started = time.perf_counter()
        path = build_study(args.cache, size)
        print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
