"""A Drive mount that fails the way Colab's does, on some paths, at the worst moments."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import optuna
import pytest

from drive_support import simulated_drive, temp_files
from sweep_support import finished_trials, own_worker
from sweepsafe import backup_hpo_study_to_drive
from sweepsafe.drive._reserved_names import temp_name
from sweepsafe.drive._restore import restore_temporary
from sweepsafe.drive._unit import HOLD_BACK_S
from sweepsafe.testing import FaultPlan, simulated_store


def _study_with_files(study_dir: Path, n_trials: int) -> optuna.Study:
    """A real study in ``study_dir/study.db``; each trial writes two files of its own."""
    study_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=f"sqlite:///{study_dir / 'study.db'}",
        study_name="s",
        sampler=optuna.samplers.RandomSampler(0),
    )
    _add_trials(study, study_dir, n_trials)
    return study


def _add_trials(study: optuna.Study, study_dir: Path, n_trials: int) -> None:
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -10.0, 10.0)
        folder = study_dir / "trials" / f"trial-{trial.number:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "notes.txt").write_text(f"x={x}\n")
        (folder / "weights.bin").write_bytes(bytes([trial.number % 256]) * 5000)
        return (x - 2.0) ** 2

    study.optimize(objective, n_trials=n_trials)


def _restore_into(tmp_path: Path, setup_drive: Path, plan_path: Path, rel: str) -> Path:
    """Restore study ``rel`` from Drive into a fresh local root; the restored study folder."""
    fresh = tmp_path / "fresh"
    fresh.mkdir(exist_ok=True)
    store = simulated_store(fresh, setup_drive, plan_path)
    try:
        database = fresh / rel / "study.db"
        result = store.restore(database)
        assert result.ok, result.error
        folder = store.restore(fresh / rel / "trials", is_directory=True)
        assert folder.ok, folder.error
    finally:
        store.close()
    return fresh / rel


def _assert_same_trial_files(local: Path, restored: Path) -> None:
    for path in (local / "trials").rglob("*"):
        if path.is_file():
            copy = restored / path.relative_to(local)
            assert copy.read_bytes() == path.read_bytes(), copy


def test_a_patch_write_refused_for_space_is_not_complete_and_the_next_backup_ships_it(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "out" / "study-a"
        study = _study_with_files(study_dir, 2)
        first = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60, release=False
        )
        assert first.ok, str(first)
        _add_trials(study, study_dir, 3)
        setup.set_faults(FaultPlan(fail_paths=(("*/history/*", "ENOSPC"),)))
        failed = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60, release=False
        )
        assert not failed.ok, str(failed)
        assert "INCOMPLETE" in str(failed), str(failed)
        setup.set_faults(FaultPlan())
        again = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60
        )
        assert again.ok, str(again)
        assert again.trial_counts == {"COMPLETE": 5}
    assert temp_files(setup.drive) == []
    restored = _restore_into(tmp_path, setup.drive, setup.plan_path, "out/study-a")
    assert len(finished_trials(restored / "study.db")) == 5
    _assert_same_trial_files(study_dir, restored)


def test_a_trial_file_failing_with_eio_at_the_end_is_named_and_the_rest_reaches_drive(
    tmp_path: Path,
) -> None:
    # At the end of a sweep there is no later backup to wait for: the file is named and
    # the database goes to Drive with every other trial.
    with simulated_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "out" / "study-b"
        _study_with_files(study_dir, 3)
        setup.set_faults(FaultPlan(fail_paths=(("*/trial-00001/weights.bin", "EIO"),)))
        failed = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60, release=False
        )
        assert not failed.ok, str(failed)
        assert "INCOMPLETE" in str(failed), str(failed)
        (missing,) = failed.missing_files[1]
        assert "weights.bin" in missing, missing
        assert not (setup.drive / "out/study-b/trials/trial-00001/weights.bin").exists()
        on_drive = setup.drive / "out/study-b/study.db"
        assert len(finished_trials(on_drive)) == 3
        verified = setup.store.verify(study_dir / "study.db")
        assert not verified.ok
        assert set(verified.missing_files) == {1}
        # The mount mends: the next backup ships the file and the copy is complete.
        setup.set_faults(FaultPlan())
        again = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60
        )
        assert again.ok, str(again)
        assert setup.store.verify(study_dir / "study.db").ok
    assert temp_files(setup.drive) == []
    restored = _restore_into(tmp_path, setup.drive, setup.plan_path, "out/study-b")
    assert len(finished_trials(restored / "study.db")) == 3
    _assert_same_trial_files(study_dir, restored)


def test_a_trial_file_failing_for_a_minute_stops_holding_back_the_trials_after_it(
    tmp_path: Path,
) -> None:
    now = [time.time()]
    with simulated_drive(tmp_path, clock=lambda: now[0]) as setup:
        study_dir = setup.local / "study-e"
        database = study_dir / "study.db"
        study = _study_with_files(study_dir, 2)
        setup.set_faults(FaultPlan(fail_paths=(("*/trial-00001/weights.bin", "EIO"),)))
        assert not setup.store.backup(database).ok  # the file may land yet: all waits
        now[0] += HOLD_BACK_S / 2
        _add_trials(study, study_dir, 1)
        assert not setup.store.backup(database).ok
        assert setup.store.history(database) == []  # no generation of the database yet

        now[0] += HOLD_BACK_S / 2
        _add_trials(study, study_dir, 1)
        named = setup.store.backup(database)

        assert named.ok, named.error  # the database reached Drive...
        (missing,) = named.missing_files[1]  # ...without that file, named
        assert "trial-00001/weights.bin" in missing, missing
        for number in (0, 2, 3):
            assert (setup.drive / f"study-e/trials/trial-{number:05d}/weights.bin").exists()
        verified = setup.store.verify(database)
        assert set(verified.missing_files) == {1}, verified
        fresh = _restore_into(tmp_path, setup.drive, setup.plan_path, "study-e")
        assert len(finished_trials(fresh / "study.db")) == 4
        shutil.rmtree(fresh.parent)
        # Tried again at every backup: once it lands, the copy is complete.
        setup.set_faults(FaultPlan())
        _add_trials(study, study_dir, 1)
        assert setup.store.backup(database).ok
        assert setup.store.verify(database).missing_files == {}
    restored = _restore_into(tmp_path, setup.drive, setup.plan_path, "study-e")
    assert len(finished_trials(restored / "study.db")) == 5
    _assert_same_trial_files(study_dir, restored)


def test_a_plain_copy_that_fails_at_the_end_of_the_sweep_makes_the_report_incomplete(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "out" / "study-c"
        study = _study_with_files(study_dir, 2)
        assert backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60, release=False
        ).ok
        _add_trials(study, study_dir, 2)
        setup.set_faults(FaultPlan(fail_paths=(("*/study-c/study.db", "EIO"),)))
        report = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60
        )
        assert not report.ok, str(report)
        assert "INCOMPLETE" in str(report)
        assert "study.db NOT backed up" in str(report), str(report)


def test_a_trial_file_truncated_on_drive_is_repaired_by_the_next_backup(tmp_path: Path) -> None:
    with simulated_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "out" / "study-d"
        study = _study_with_files(study_dir, 2)
        assert backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60, release=False
        ).ok
        on_drive = setup.drive / "out/study-d/trials/trial-00000/weights.bin"
        on_drive.write_bytes(b"\0" * 10)  # a sync client or a hand cut it short
        _add_trials(study, study_dir, 1)
        report = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60
        )
        assert report.ok, str(report)
    assert on_drive.read_bytes() == (study_dir / "trials/trial-00000/weights.bin").read_bytes()
    restored = _restore_into(tmp_path, setup.drive, setup.plan_path, "out/study-d")
    _assert_same_trial_files(study_dir, restored)


def test_a_dead_runtimes_temporary_in_a_trial_folder_is_removed_by_the_final_backup(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "out" / "study-e"
        study = _study_with_files(study_dir, 2)
        assert backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60, release=False
        ).ok
        # A helper killed mid-copy with its runtime: half a file under a temporary name.
        stray = setup.drive / "out/study-e/trials/trial-00000" / temp_name("deadbeef0001aa")
        stray.write_bytes(b"half a checkpoint")
        _add_trials(study, study_dir, 1)
        report = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60
        )
        assert report.ok, str(report)
    assert temp_files(setup.drive) == []


@pytest.mark.parametrize("record", ["lease.json", "identity.json"])
def test_a_record_cut_to_nothing_on_drive_does_not_stop_the_next_runtime(
    tmp_path: Path, record: str
) -> None:
    with simulated_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "out" / "study-f"
        _study_with_files(study_dir, 2)
        assert backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60
        ).ok
    (setup.drive / "out/study-f/.sweepsafe" / record).write_bytes(b"")
    other = tmp_path / "other"
    shutil.copytree(study_dir, other / "out/study-f", ignore=shutil.ignore_patterns(".sweepsafe"))
    _add_trials(_open(other / "out/study-f"), other / "out/study-f", 1)
    store = simulated_store(other, setup.drive, setup.plan_path)
    try:
        with own_worker() as worker:
            report = backup_hpo_study_to_drive(other / "out", store, worker=worker, timeout=60)
    finally:
        store.close()
    assert report.ok, str(report)
    assert report.trial_counts == {"COMPLETE": 3}


def _open(study_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=f"sqlite:///{study_dir / 'study.db'}")


def test_a_plain_copy_cut_short_on_drive_is_named_and_every_trial_still_restores(
    tmp_path: Path,
) -> None:
    with simulated_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "out" / "study-h"
        study = _study_with_files(study_dir, 2)
        assert backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60, release=False
        ).ok
        _add_trials(study, study_dir, 2)
        assert backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60
        ).ok
    plain = setup.drive / "out/study-h/study.db"
    with open(plain, "r+b") as file:
        file.truncate(plain.stat().st_size // 2)
    (tmp_path / "v").mkdir()
    with simulated_store(tmp_path / "v", setup.drive, setup.plan_path) as store:
        verified = store.verify(tmp_path / "v/out/study-h/study.db")
    assert not verified.ok
    assert "a restore rebuilds generation 2" in str(verified.error), verified.error
    restored = _restore_into(tmp_path, setup.drive, setup.plan_path, "out/study-h")
    assert len(finished_trials(restored / "study.db")) == 4


@pytest.mark.parametrize("code", ["EACCES", "EPERM"])
def test_a_trial_file_drive_does_not_allow_is_named_and_does_not_hold_the_study_back(
    tmp_path: Path, code: str
) -> None:
    with simulated_drive(tmp_path) as setup, own_worker() as worker:
        setup.set_faults(FaultPlan(fail_paths=(("*/trial-00001/weights.bin", code),)))
        study_dir = setup.local / "out" / "study-i"
        _study_with_files(study_dir, 4)
        report = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60
        )
    assert not report.ok, str(report)
    assert report.trial_counts == {"COMPLETE": 4}, str(report)
    (missing,) = report.missing_files[1]
    assert "weights.bin" in missing
    assert "may write there" in missing, missing
    for number in (0, 2, 3):
        assert (setup.drive / f"out/study-i/trials/trial-{number:05d}/weights.bin").exists()


def test_old_generations_drive_will_not_let_go_do_not_fail_the_backups_that_follow(
    tmp_path: Path,
) -> None:
    # Thinning old generations is hygiene: a Drive that refuses to delete them (a folder
    # shared without delete rights) must not fail every backup that writes a full copy.
    with simulated_drive(tmp_path, keep_generations=1) as setup:
        study_dir = setup.local / "study-t"
        database = study_dir / "study.db"
        study = _study_with_files(study_dir, 1)
        assert setup.store.backup(database, final=True).ok
        setup.set_faults(FaultPlan(fail_remove_paths=(("*/history/*/00000001-*", "EACCES"),)))
        for _ in range(2):
            _add_trials(study, study_dir, 1)
            result = setup.store.backup(database, final=True)
            assert result.ok, result.error
        assert result.generation == 3
        history = setup.drive / "study-t/.sweepsafe/history/study.db"
        assert list(history.glob("00000001-*"))  # still there, as Drive refused
        setup.set_faults(FaultPlan())
        _add_trials(study, study_dir, 1)
        assert setup.store.backup(database, final=True).ok
        assert not list(history.glob("00000001-*"))  # thinned once Drive allows it
    restored = _restore_into(tmp_path, setup.drive, setup.plan_path, "study-t")
    assert len(finished_trials(restored / "study.db")) == 4


def test_a_restore_temporary_a_kill_left_in_the_study_folder_is_not_backed_up(
    tmp_path: Path,
) -> None:
    # A runtime killed while a restored database waited to replace the local one leaves
    # it in the study folder: sweepsafe's own temporary, never the user's file to copy.
    with simulated_drive(tmp_path) as setup, own_worker() as worker:
        study_dir = setup.local / "out" / "study-r"
        _study_with_files(study_dir, 2)
        left = restore_temporary(study_dir / "study.db")
        shutil.copyfile(study_dir / "study.db", left)
        report = backup_hpo_study_to_drive(
            setup.local / "out", setup.store, worker=worker, timeout=60
        )
        assert report.ok, str(report)
    assert not (setup.drive / "out/study-r" / left.name).exists()
    assert (setup.drive / "out/study-r/trials/trial-00001/weights.bin").exists()
