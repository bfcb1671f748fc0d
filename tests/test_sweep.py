"""run_sweep end to end: real Optuna studies in real SQLite files, a simulated slow Drive."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import optuna
import pytest
from optuna.trial import Trial, TrialState

from drive_support import DriveSetup, simulated_drive
from sweep_support import (
    CountingStore,
    finished_trials,
    integrity,
    own_worker,
    trial_states,
    wait_for,
)
from sweepsafe.backup import backup_hpo_study_to_drive
from sweepsafe.drive import DriveStore
from sweepsafe.errors import DrivePathError, SweepsafeError
from sweepsafe.sweep import run_sweep, study_dir_for, trial_dir
from sweepsafe.testing import FaultPlan
from sweepsafe.worker import BackupWorker

optuna.logging.set_verbosity(optuna.logging.WARNING)


# Where the sweeps of the running test keep their study folders; run_sweep names each
# study after its folder, so the objective finds its trial folders as a user's would.
OUTPUT_DIR: list[Path] = []


@pytest.fixture(autouse=True)
def _output_dir(tmp_path: Path) -> None:
    OUTPUT_DIR[:] = [tmp_path / "local" / "out"]


def quadratic(trial: Trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    folder = trial_dir(OUTPUT_DIR[0] / trial.study.study_name, trial)
    (folder / "result.txt").write_text(f"{x}\n")
    return (x - 2) ** 2


def test_study_dir_is_stable_and_depends_on_the_key(tmp_path: Path) -> None:
    a = study_dir_for(tmp_path, {"model": "resnet", "lr": [1e-4, 1e-2]})
    b = study_dir_for(tmp_path, {"lr": [1e-4, 1e-2], "model": "resnet"})
    c = study_dir_for(tmp_path, {"model": "vit", "lr": [1e-4, 1e-2]})
    assert a == b != c
    assert a.parent == tmp_path
    assert a.name.startswith("study-")
    assert len(a.name) - len("study-") >= 12
    assert study_dir_for(tmp_path, "sweep-1") == study_dir_for(str(tmp_path), "sweep-1")
    with pytest.raises(TypeError, match="JSON"):
        study_dir_for(tmp_path, {"fn": object()})


def test_trial_dir_layout(tmp_path: Path) -> None:
    assert trial_dir(tmp_path, 42) == tmp_path / "trials" / "trial-00042"
    assert (tmp_path / "trials" / "trial-00042").is_dir()


def test_study_db_reaches_drive_before_the_first_trial_ends(tmp_path: Path) -> None:
    """The first backup does not wait for the first callback: trial 0 sees it on Drive."""
    with (
        simulated_drive(tmp_path, FaultPlan(latency_s=0.05)) as drive,
        own_worker() as worker,
    ):
        study_dir = study_dir_for(drive.local / "out", "first")
        drive_db = drive.store.drive_path_for(study_dir / "study.db")
        seen: list[int] = []

        def objective(trial: Trial) -> float:
            if trial.number == 0:
                wait_for(drive_db.exists, what="the immediate backup of study.db")
                seen.append(len(finished_trials(drive_db)))
            return quadratic(trial)

        result = run_sweep(
            objective,
            output_dir=drive.local / "out",
            study_key="first",
            n_trials=3,
            backup_to_drive=drive.store,
            worker=worker,
        )
        assert seen == [0]
        assert result.backup_ok, str(result.backup_report)


def test_resumed_study_is_backed_up_before_its_first_new_trial_ends(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    run_sweep(
        quadratic,
        output_dir=drive.local / "out",
        study_key="resume-first",
        n_trials=4,
        backup_to_drive=drive.store,
        worker=private_worker,
    )
    study_dir = study_dir_for(drive.local / "out", "resume-first")
    drive_db = drive.store.drive_path_for(study_dir / "study.db")
    # Someone deleted the study's folder on Drive; the local study is intact.
    shutil.rmtree(drive_db.parent)
    counts: list[int] = []

    def objective(trial: Trial) -> float:
        if not counts:
            wait_for(drive_db.exists, what="the immediate backup of the resumed study")
            counts.append(len(finished_trials(drive_db)))
        return quadratic(trial)

    result = run_sweep(
        objective,
        output_dir=drive.local / "out",
        study_key="resume-first",
        n_trials=6,
        backup_to_drive=drive.store,
        worker=private_worker,
    )
    assert counts == [4]
    assert result.backup_ok, result.backup_report
    # Every trial's files are back on Drive too, not only the database.
    local_files = sorted(
        p.relative_to(study_dir).as_posix() for p in (study_dir / "trials").rglob("*.txt")
    )
    drive_files = sorted(
        p.relative_to(drive_db.parent).as_posix()
        for p in (drive_db.parent / "trials").rglob("*.txt")
    )
    assert local_files == drive_files
    assert len(drive_files) == 6


def test_slow_drive_coalesces_copies_and_final_copy_has_every_trial(tmp_path: Path) -> None:
    with (
        simulated_drive(tmp_path, FaultPlan(latency_s=0.5)) as drive,
        own_worker() as worker,
    ):
        counting = CountingStore(drive.store)
        result = run_sweep(
            quadratic,
            output_dir=drive.local / "out",
            study_key="coalesce",
            n_trials=40,
            backup_to_drive=counting,
            worker=worker,
        )
        database = result.study_dir / "study.db"
        copies = counting.copies_of(database)
        assert 1 <= len(copies) < 40 / 2, len(copies)
        assert worker.stats().coalesced > 0
        drive_db = drive.store.drive_path_for(database)
        assert integrity(drive_db) == "ok"
        assert finished_trials(drive_db) == finished_trials(database)
        assert len(finished_trials(drive_db)) == 40
        report = result.backup_report
        assert report is not None
        assert report.ok, str(report)
        assert not report.on_drive


def test_trial_folder_backup_is_incremental_across_trials(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    counting = CountingStore(drive.store)
    result = run_sweep(
        quadratic,
        output_dir=drive.local / "out",
        study_key="incremental",
        n_trials=15,
        backup_to_drive=counting,
        worker=private_worker,
    )
    trials = result.study_dir / "trials"
    seen = counting.copies_under(trials)
    assert all(r.ok for r in seen)
    assert sum(r.files_copied for r in seen) <= 15  # each trial's file once at most
    inodes = {p: p.stat().st_ino for p in drive.store.drive_path_for(trials).rglob("*.txt")}
    assert len(inodes) == 15
    # Another end-of-sweep backup walks the whole folder and copies nothing again.
    again = backup_hpo_study_to_drive(
        drive.local / "out", counting, worker=private_worker, timeout=60
    )
    assert again.ok, str(again)
    (walk,) = counting.copies_of(trials)[-1:]
    assert (walk.files_copied, walk.files_unchanged) == (0, 15)
    assert {p: p.stat().st_ino for p in inodes} == inodes
    for number in range(15):
        local_file = trials / f"trial-{number:05d}" / "result.txt"
        assert drive.store.drive_path_for(local_file).read_bytes() == local_file.read_bytes()


def test_deleting_local_folder_resumes_from_drive(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    first = run_sweep(
        quadratic,
        output_dir=drive.local / "out",
        study_key={"sweep": "resume"},
        n_trials=5,
        backup_to_drive=drive.store,
        worker=private_worker,
    )
    before = finished_trials(first.study_dir / "study.db")
    shutil.rmtree(drive.local / "out")  # the runtime died and its disk is gone
    second = run_sweep(
        quadratic,
        output_dir=drive.local / "out",
        study_key={"sweep": "resume"},
        n_trials=9,
        backup_to_drive=drive.store,
        worker=private_worker,
    )
    assert second.restored_from_drive
    assert second.resumed_trials == 5
    after = finished_trials(second.study_dir / "study.db")
    assert after[:5] == before
    assert len(after) == 9
    assert trial_states(second.study_dir / "study.db").get("RUNNING", 0) == 0
    assert (second.study_dir / "trials" / "trial-00004" / "result.txt").is_file()


def test_trials_left_running_by_a_dead_runtime_are_failed_on_resume(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    study_dir = study_dir_for(drive.local / "out", "stale")
    study_dir.mkdir(parents=True)
    study = optuna.create_study(
        storage=f"sqlite:///{study_dir / 'study.db'}", study_name=study_dir.name
    )
    study.tell(study.ask(), 1.0)
    study.ask()  # left RUNNING: the runtime died during this trial
    assert drive.store.backup(study_dir / "study.db").ok
    shutil.rmtree(drive.local / "out")
    result = run_sweep(
        quadratic,
        output_dir=drive.local / "out",
        study_key="stale",
        n_trials=3,
        backup_to_drive=drive.store,
        worker=private_worker,
    )
    states = trial_states(result.study_dir / "study.db")
    assert states.get("RUNNING", 0) == 0
    assert states["FAIL"] == 1
    assert len(finished_trials(result.study_dir / "study.db")) == 3


def test_rerun_after_finishing_runs_no_more_trials(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    kwargs = {
        "output_dir": drive.local / "out",
        "study_key": "done",
        "n_trials": 4,
        "backup_to_drive": drive.store,
        "worker": private_worker,
    }
    run_sweep(quadratic, **kwargs)  # type: ignore[arg-type]
    again = run_sweep(quadratic, **kwargs)  # type: ignore[arg-type]
    assert len(again.study.trials) == 4
    assert again.backup_ok


@pytest.mark.parametrize("exception", [RuntimeError("objective broke"), KeyboardInterrupt()])
def test_exception_in_objective_still_ends_with_complete_drive_copy(
    tmp_path: Path, exception: BaseException
) -> None:
    with (
        simulated_drive(tmp_path, FaultPlan(latency_s=0.1)) as drive,
        own_worker() as worker,
    ):

        def objective(trial: Trial) -> float:
            if trial.number == 6:
                raise exception
            return quadratic(trial)

        with pytest.raises(type(exception)):
            run_sweep(
                objective,
                output_dir=drive.local / "out",
                study_key="boom",
                n_trials=20,
                backup_to_drive=drive.store,
                worker=worker,
            )
        database = study_dir_for(drive.local / "out", "boom") / "study.db"
        drive_db = drive.store.drive_path_for(database)
        assert integrity(drive_db) == "ok"
        assert len(finished_trials(drive_db)) == 6
        assert finished_trials(drive_db) == finished_trials(database)


def test_failing_drive_never_stops_the_sweep_and_report_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        simulated_drive(tmp_path) as drive,
        own_worker(max_attempts=2) as worker,
    ):

        def objective(trial: Trial) -> float:
            if trial.number == 0:
                FaultPlan(disconnected=True).write(drive.plan_path)  # the mount drops mid-sweep
            return quadratic(trial)

        with caplog.at_level(logging.WARNING, logger="sweepsafe"):
            result = run_sweep(
                objective,
                output_dir=drive.local / "out",
                study_key="dead-drive",
                n_trials=10,
                backup_to_drive=drive.store,
                worker=worker,
                flush_timeout=30,
            )
        assert len(finished_trials(result.study_dir / "study.db")) == 10
        report = result.backup_report
        assert report is not None
        assert not report.ok
        text = str(report)
        assert "study.db" in text
        assert "INCOMPLETE" in text
        assert "not connected" in text.lower()
        assert "not connected" in caplog.text.lower()


def test_unreachable_drive_at_start_refuses_instead_of_forking_the_study(tmp_path: Path) -> None:
    """With no local study and a dead mount, sweepsafe cannot know if Drive has one."""
    with (
        simulated_drive(tmp_path, FaultPlan(disconnected=True)) as drive,
        own_worker() as worker,
    ):
        with pytest.raises(
            SweepsafeError, match=r"not connected.*restore=False \(sweepsafe run --no-restore\)"
        ):
            run_sweep(
                quadratic,
                output_dir=drive.local / "out",
                study_key="dead-at-start",
                n_trials=2,
                backup_to_drive=drive.store,
                worker=worker,
            )
        result = run_sweep(
            quadratic,
            output_dir=drive.local / "out",
            study_key="dead-at-start",
            n_trials=2,
            backup_to_drive=drive.store,
            worker=worker,
            restore=False,
            flush_timeout=10,
        )
        assert len(result.study.trials) == 2
        assert not result.backup_ok


def test_an_output_dir_outside_the_stores_folder_is_refused_before_any_trial(
    tmp_path: Path,
) -> None:
    """A study outside the folder its store backs up could never reach Drive: every
    backup would fail. The sweep is refused at once, naming both folders, whether or not
    the study exists already, and nothing runs or reaches Drive."""
    elsewhere = tmp_path / "elsewhere"
    ran: list[int] = []

    def objective(trial: Trial) -> float:
        ran.append(trial.number)
        return 0.0

    with simulated_drive(tmp_path) as drive, own_worker() as worker:
        for existing in (False, True):
            if existing:
                study_dir = study_dir_for(elsewhere, "outside")
                study_dir.mkdir(parents=True)
                optuna.create_study(
                    study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'study.db'}"
                )
            with pytest.raises(ValueError, match="is not inside") as caught:
                run_sweep(
                    objective,
                    output_dir=elsewhere,
                    study_key="outside",
                    n_trials=2,
                    backup_to_drive=drive.store,
                    worker=worker,
                )
            message = str(caught.value)
            assert str(elsewhere) in message
            assert str(drive.local) in message
            assert "mount" not in message  # nothing is wrong with Drive
            assert existing or not elsewhere.exists()
        assert ran == []
        assert not drive.drive.exists() or not any(drive.drive.iterdir())


def test_hung_drive_returns_within_flush_timeout(tmp_path: Path) -> None:
    with (
        simulated_drive(tmp_path, drive_timeout=60) as drive,
        own_worker(close_timeout=1.0) as worker,
    ):

        def objective(trial: Trial) -> float:
            if trial.number == 1:
                FaultPlan(hang=True).write(drive.plan_path)  # the mount stalls mid-sweep
            return quadratic(trial)

        result = run_sweep(
            objective,
            output_dir=drive.local / "out",
            study_key="hung",
            n_trials=3,
            backup_to_drive=drive.store,
            worker=worker,
            flush_timeout=1.0,
        )
        report = result.backup_report
        assert report is not None
        assert report.timed_out
        assert not report.ok
        assert "study.db" in str(report)
        assert len(finished_trials(result.study_dir / "study.db")) == 3


def test_output_dir_on_drive_runs_without_backups_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    drive = tmp_path / "drive"
    drive.mkdir()
    monkeypatch.setenv("SWEEPSAFE_DRIVE_ROOTS", str(drive))
    local = tmp_path / "local"
    local.mkdir()
    OUTPUT_DIR[:] = [drive / "out"]
    store = DriveStore(local, drive / "backup")
    with caplog.at_level(logging.WARNING, logger="sweepsafe"), own_worker() as worker:
        result = run_sweep(
            quadratic,
            output_dir=drive / "out",
            study_key="on-drive",
            n_trials=3,
            backup_to_drive=store,
            worker=worker,
        )
    store.close()
    assert "slow" in caplog.text
    assert "Drive" in caplog.text
    report = result.backup_report
    assert report is not None
    assert report.on_drive
    assert report.ok, str(report)
    assert report.trial_counts.get("COMPLETE") == 3
    assert not (drive / "backup").exists()
    assert worker.stats().submitted == 0


def test_local_root_on_drive_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEPSAFE_DRIVE_ROOTS", str(tmp_path / "drive"))
    with pytest.raises(DrivePathError, match="Drive"):
        DriveStore(tmp_path / "drive" / "out", tmp_path / "backup")


def test_parallel_trials_with_n_jobs_4(tmp_path: Path) -> None:
    with (
        simulated_drive(tmp_path, FaultPlan(latency_s=0.05)) as drive,
        own_worker() as worker,
    ):
        result = run_sweep(
            quadratic,
            output_dir=drive.local / "out",
            study_key="parallel",
            n_trials=24,
            n_jobs=4,
            backup_to_drive=drive.store,
            worker=worker,
        )
        assert result.backup_ok, str(result.backup_report)
        drive_db = drive.store.drive_path_for(result.study_dir / "study.db")
        assert len(finished_trials(result.study_dir / "study.db")) == 24
        assert finished_trials(drive_db) == finished_trials(result.study_dir / "study.db")


def test_unrestorable_drive_copy_refuses_to_start_a_new_study(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    run_sweep(
        quadratic,
        output_dir=drive.local / "out",
        study_key="corrupt",
        n_trials=2,
        backup_to_drive=drive.store,
        worker=private_worker,
    )
    study_dir = study_dir_for(drive.local / "out", "corrupt")
    drive_db = drive.store.drive_path_for(study_dir / "study.db")
    # Every whole copy on Drive is damaged: the plain one and the kept bases.
    history = drive_db.parent / ".sweepsafe" / "history"
    damaged: dict[Path, bytes] = {}
    for copy in [drive_db, *(p for p in history.rglob("*.db") if p.is_file())]:
        content = bytearray(copy.read_bytes())
        content[4096:8192] = b"\xff" * 4096
        damaged[copy] = bytes(content)
        copy.write_bytes(damaged[copy])
    shutil.rmtree(drive.local / "out")
    with pytest.raises(SweepsafeError, match="could not be restored"):
        run_sweep(
            quadratic,
            output_dir=drive.local / "out",
            study_key="corrupt",
            n_trials=4,
            backup_to_drive=drive.store,
            worker=private_worker,
        )
    for copy, content in damaged.items():
        assert copy.read_bytes() == content  # the Drive copy is left alone


def test_callbacks_run_before_the_backup_callbacks_of_their_trial(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    submitted_before: list[int] = []

    def mine(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        submitted_before.append(private_worker.stats().submitted)

    result = run_sweep(
        quadratic,
        output_dir=drive.local / "out",
        study_key="callbacks",
        n_trials=3,
        callbacks=[mine],
        backup_to_drive=drive.store,
        worker=private_worker,
    )
    # study.db once at the start, then two backups per trial (its folder, study.db):
    # none yet for the trial the user's callback is called for.
    assert submitted_before == [1, 3, 5]
    assert all(t.state == TrialState.COMPLETE for t in result.study.trials)


def test_run_sweep_works_in_a_notebook_cell(
    drive: DriveSetup, private_worker: BackupWorker
) -> None:
    """A Jupyter or Colab cell runs on a thread whose asyncio loop is already running."""

    async def cell() -> None:
        first = run_sweep(
            quadratic,
            output_dir=drive.local / "out",
            study_key="notebook",
            n_trials=3,
            backup_to_drive=drive.store,
            worker=private_worker,
        )
        assert first.backup_ok, str(first.backup_report)
        shutil.rmtree(drive.local / "out")
        second = run_sweep(
            quadratic,
            output_dir=drive.local / "out",
            study_key="notebook",
            n_trials=4,
            backup_to_drive=drive.store,
            worker=private_worker,
        )
        assert second.restored_from_drive
        assert second.backup_ok, str(second.backup_report)

    asyncio.run(cell())
