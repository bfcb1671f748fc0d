"""A sweep's database backups are spaced so their local work stays a small share of the time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from drive_support import DriveSetup, make_study, objective, simulated_drive
from sweep_support import wait_for
from sweepsafe import create_study_db_backup_callback
from sweepsafe.drive import _pacing
from sweepsafe.drive._pacing import Pace
from sweepsafe.worker import BackupWorker


def test_a_backup_waits_until_the_last_ones_local_work_is_a_small_share_of_the_time() -> None:
    assert Pace().wait(now=5.0) == 0.0  # the first backup never waits
    pace = Pace(started=100.0, work=0.2)
    # 0.2 s of local work is a tenth of 2 s: the next backup begins 2 s after this one.
    assert pace.wait(now=100.5) == pytest.approx(1.5)
    assert pace.wait(now=102.5) == 0.0
    # However slow the last backup was, the next one waits at most LONGEST_WAIT_S.
    assert Pace(started=100.0, work=1e6).wait(now=100.0) == _pacing.LONGEST_WAIT_S


@contextlib.contextmanager
def paced_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, longest_wait: float
) -> Iterator[tuple[DriveSetup, Path, optuna.Study]]:
    """A 3-trial study on a stand-in Drive whose sweep backups, after the first, wait
    ``longest_wait`` for their turn (any local work at all now buys the longest wait)."""
    monkeypatch.setattr(_pacing, "LOCAL_WORK_SHARE", 1e-9)
    monkeypatch.setattr(_pacing, "LONGEST_WAIT_S", longest_wait)
    with simulated_drive(tmp_path) as setup:
        database = setup.local / "study-1" / "study.db"
        url = make_study(database, n_trials=3)
        yield setup, database, optuna.load_study(study_name="study", storage=url)


def test_a_sweeps_backups_wait_their_turn_and_a_backup_asked_by_name_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with paced_study(tmp_path, monkeypatch, 4.0) as (setup, database, study):
        # Called by name, a backup runs at once, however recent the last one.
        first = setup.store.backup(database)
        began = time.monotonic()
        again = setup.store.backup(database)
        assert time.monotonic() - began < _pacing.LONGEST_WAIT_S
        assert first.ok, first.error
        assert again.ok, again.error
        assert first.local_s > 0  # it says how long it worked here

        worker = BackupWorker()
        try:
            callback = create_study_db_backup_callback(database, setup.store, worker=worker)
            began = time.monotonic()
            # The first trial's backup runs at once; the next two wait their turn, in one.
            study.optimize(objective, n_trials=3, callbacks=[callback])
            wait_for(
                lambda: setup.store.history(database)[0].number == first.generation + 2,
                timeout=60,
                what="the sweep's second backup",
            )
            took = time.monotonic() - began
            flushed = worker.flush(timeout=60)
        finally:
            worker.close(timeout=60)
        assert flushed.ok
        assert took >= _pacing.LONGEST_WAIT_S
        # The sweep's two backups made two generations, and the newest holds every trial.
        newest = setup.store.history(database)[0]
        assert newest.number == first.generation + 2
        assert newest.finished_trials == 6


def test_a_flush_ends_a_backups_wait_for_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a sweep never waits for a turn: a backup waiting for one when the flush
    begins goes at once, and the flush holds every trial well before the turn."""
    with paced_study(tmp_path, monkeypatch, 600.0) as (setup, database, study):
        worker = BackupWorker()
        try:
            callback = create_study_db_backup_callback(database, setup.store, worker=worker)
            study.optimize(objective, n_trials=1, callbacks=[callback])
            wait_for(lambda: worker.stats().succeeded == 1, what="the first backup")
            # The next trial's backup now waits ten minutes for its turn.
            study.optimize(objective, n_trials=1, callbacks=[callback])
            flushed = worker.flush(timeout=60)
            # Pacing goes on after the flush: the next backup waits its turn again...
            study.optimize(objective, n_trials=1, callbacks=[callback])
            wait_for(lambda: worker.stats().started == 3, what="the third backup")
            time.sleep(1.0)  # ample for a backup that did not wait
            assert worker.stats().succeeded == 2
            # ...until the next flush.
            later = worker.flush(timeout=60)
        finally:
            worker.close(timeout=60)
        assert flushed.ok, str(flushed)
        assert later.ok, str(later)
        history = setup.store.history(database)
        assert [generation.finished_trials for generation in history] == [6, 5, 4]
