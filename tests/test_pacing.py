"""A large study's backups are spaced so that their local work stays a small share of the time."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from drive_support import make_study, objective, simulated_drive
from sweepsafe.drive import _pacing
from sweepsafe.drive._pacing import Pace


def test_a_backup_waits_until_the_last_ones_local_work_is_a_small_share_of_the_time() -> None:
    assert Pace().wait(now=5.0) == 0.0  # the first backup of a database never waits
    pace = Pace(started=100.0, work=0.2)
    # 0.2 s of local work is a tenth of 2 s: the next backup begins 2 s after this one.
    assert pace.wait(now=100.5) == pytest.approx(1.5)
    assert pace.wait(now=102.5) == 0.0
    # However slow the last backup was, the next one waits at most LONGEST_WAIT_S.
    assert Pace(started=100.0, work=1e6).wait(now=100.0) == _pacing.LONGEST_WAIT_S


def test_a_backup_waits_its_turn_and_the_final_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any local work at all now buys the longest wait, which is made short for the test.
    monkeypatch.setattr(_pacing, "LOCAL_WORK_SHARE", 1e-9)
    monkeypatch.setattr(_pacing, "LONGEST_WAIT_S", 4.0)
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        url = make_study(database, n_trials=3)
        study = optuna.load_study(study_name="study", storage=url)
        assert setup.store.backup(database).ok

        study.optimize(objective, n_trials=1)
        began = time.monotonic()
        paced = setup.store.backup(database)
        paced_took = time.monotonic() - began

        study.optimize(objective, n_trials=1)
        began = time.monotonic()
        final = setup.store.backup(database, final=True)
        final_took = time.monotonic() - began

        assert paced.ok, paced.error
        assert final.ok, final.error
        assert paced.finished_trials == 4
        assert paced_took >= _pacing.LONGEST_WAIT_S  # it waited its turn
        assert final_took < _pacing.LONGEST_WAIT_S  # the end of a sweep never waits
        assert final.finished_trials == 5
        assert setup.store.verify(database).ok
