"""Crash and shared-study checks: what a runtime that dies mid-write leaves must still
restore, and a Drive copy must never go backwards."""

from __future__ import annotations

from pathlib import Path

import optuna

from sweepsafe.testing import FaultPlan, simulated_store

from drive_support import simulated_drive


def _history(drive: Path) -> Path:
    return drive / "study-1" / ".sweepsafe" / "history" / "study.db"


def _finished(database: Path) -> int:
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{database}")
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def test_a_base_whose_record_never_landed_still_restores(tmp_path: Path) -> None:
    # keep_generations=1: the newest base is the plain study.db alone. The next base
    # replaces the plain copy, then its record fails to land (the runtime dies there).
    with simulated_drive(tmp_path, keep_generations=1) as setup:
        database = setup.local / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        study.tell(study.ask(), 1.0)
        assert setup.store.backup(database).ok
        study.tell(study.ask(), 1.0)
        assert setup.store.backup(database, final=True).ok  # a plain base; gen 1 thinned
        study.tell(study.ask(), 1.0)
        assert setup.store.backup(database).ok  # a patch
        study.tell(study.ask(), 1.0)
        FaultPlan(fail_paths=(("*/history/study.db/0*.json", "EIO"),)).write(setup.plan_path)
        assert not setup.store.backup(database, final=True).ok
    FaultPlan().write(setup.plan_path)

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    store = simulated_store(fresh, setup.drive, setup.plan_path, keep_generations=1)
    try:
        restored = fresh / "study-1" / "study.db"
        result = store.restore(restored)
        assert result.ok, result.error
        assert _finished(restored) == 4
    finally:
        store.close()


def test_a_new_study_does_not_replace_a_drive_copy_whose_history_cannot_be_rebuilt(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        for _ in range(4):
            study.tell(study.ask(), 1.0)
            assert setup.store.backup(database).ok
        assert setup.store.backup(database, final=True).ok
        setup.store.release(database.parent)
    # The history's base records are lost (deleted by hand); the plain copy holds 4 trials.
    for record in _history(setup.drive).glob("*.json"):
        record.unlink()

    other = tmp_path / "other"
    other.mkdir()
    store = simulated_store(other, setup.drive, setup.plan_path)
    try:
        database = other / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        study.tell(study.ask(), 1.0)
        result = store.backup(database)
        assert not result.ok, result
        assert _finished(setup.drive / "study-1" / "study.db") == 4
    finally:
        store.close()
