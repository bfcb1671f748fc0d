"""Kept generations on Drive: going back to one, thinning by age, patch chains, kills.

Real Optuna studies in real SQLite files, real subprocesses and signals; Drive is the
simulated stand-in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import Trial, TrialState

from drive_support import simulated_drive, temp_files
from sweep_support import finished_trials, integrity, own_worker, wait_for
from sweepsafe.drive import DriveStore
from sweepsafe.drive._page_diff import PageDelta, diff_files, sha256_file
from sweepsafe.drive._patch_format import decode_patch, encode_patch
from sweepsafe.sweep import run_sweep, study_dir_for, trial_dir
from sweepsafe.testing import FaultPlan, simulated_store

optuna.logging.set_verbosity(optuna.logging.WARNING)

PATCH_MAGIC = b"\x89SSPD\r\n\x1a"
SQLITE_MAGIC = b"SQLite format 3\x00"


@contextmanager
def stand_in(tmp_path: Path, **store_kwargs: Any) -> Iterator[tuple[DriveStore, Path, Path]]:
    """A store over ``tmp_path/local`` -> ``tmp_path/drive``: (store, plan file, local root)."""
    with simulated_drive(tmp_path, **store_kwargs) as setup:
        yield setup.store, setup.plan_path, setup.local


def history_folder(drive_db: Path) -> Path:
    return drive_db.parent / ".sweepsafe" / "history" / drive_db.name


SCHEMA_COOKIE = slice(40, 44)


def normalised(database: Path, into: Path) -> bytes:
    """The database rewritten by ``VACUUM INTO``: equal content gives equal bytes.

    Less its schema cookie, a counter of schema changes that SQLite's online backup
    (how a snapshot is taken) sets anew in every copy it writes.
    """
    into.unlink(missing_ok=True)
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        connection.execute("VACUUM INTO ?", (str(into),))
    finally:
        connection.close()
    image = bytearray(into.read_bytes())
    image[SCHEMA_COOKIE] = bytes(4)
    return bytes(image)


@contextmanager
def drive_copy(drive: Path, where: Path) -> Iterator[DriveStore]:
    """A store over a copy of ``drive``, so that restoring from it changes nothing else."""
    shutil.copytree(drive, where / "drive")
    (where / "local").mkdir()
    store = simulated_store(where / "local", where / "drive", FaultPlan())
    try:
        yield store
    finally:
        store.close()


def sweep_objective(trial: Trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    folder = trial_dir(Path(trial.study.user_attrs["study_dir"]), trial)
    (folder / "result.txt").write_text(f"{x}\n")
    return (x - 2) ** 2


def sweep(local: Path, store: Any, worker: Any, n_trials: int, **options: Any) -> Any:
    study_dir = study_dir_for(local / "out", "history")

    def objective(trial: Trial) -> float:
        trial.study.set_user_attr("study_dir", str(study_dir))
        return sweep_objective(trial)

    return run_sweep(
        objective,
        output_dir=local / "out",
        study_key="history",
        n_trials=n_trials,
        sampler=optuna.samplers.RandomSampler(seed=n_trials),
        backup_to_drive=store,
        worker=worker,
        **options,
    )


# -- going back to a generation --------------------------------------------------------------


def test_run_sweep_resumes_from_a_chosen_generation_and_drive_follows_it(tmp_path: Path) -> None:
    with stand_in(tmp_path) as (store, _, local), own_worker() as worker:
        first = sweep(local, store, worker, 3)
        database = first.study_dir / "study.db"
        chosen = store.history(database)[0]
        kept = finished_trials(database)
        assert chosen.finished_trials == 3
        sweep(local, store, worker, 6)  # three more trials the user wants undone
        undone_head = store.history(database)[0].number

        # Documented way to resume from a generation: restore it, then run_sweep.
        restored = store.restore(database, generation=chosen.number)
        assert restored.ok, restored.error
        assert restored.generation == chosen.number
        assert finished_trials(database) == kept
        aside = [n for n in restored.notes if "set aside as" in n]
        assert len(aside) == 1
        assert Path(aside[0].rsplit(" as ", 1)[1]).name.startswith("study.db.before-restore-")
        assert any(f"as generation {undone_head + 1}" in n for n in restored.notes)

        again = sweep(local, store, worker, 5)
        assert again.backup_ok, str(again.backup_report)
        assert not again.restored_from_drive
        after = finished_trials(database)
        assert after[:3] == kept
        assert len(after) == 5
        newest = store.history(database)[0]
        assert newest.number > undone_head + 1
        assert newest.finished_trials == 5
        verified = store.verify(database)
        assert verified.ok, verified.error
        assert verified.generation == newest.number  # the final flush refreshed the plain copy
        # The undone generation is still kept: the rollback itself can be undone.
        generations = {g.number: g.finished_trials for g in store.history(database)}
        assert generations[undone_head] == 6


def test_a_new_study_over_the_drive_copy_is_refused_and_the_old_one_comes_back(
    tmp_path: Path,
) -> None:
    with stand_in(tmp_path) as (store, _, local), own_worker() as worker:
        first = sweep(local, store, worker, 4)
        database = first.study_dir / "study.db"
        kept = finished_trials(database)
        drive_db = store.drive_path_for(database)
        plain = drive_db.read_bytes()
        generations = store.history(database)
        trial_file = drive_db.parent / "trials" / "trial-00000" / "result.txt"
        trial_text = trial_file.read_text()

        shutil.rmtree(first.study_dir)  # the user deletes the local study ...
        second = sweep(local, store, worker, 2, restore=False)  # ... and starts anew
        assert not second.backup_ok
        assert "ahead of this runtime" in str(second.backup_report)
        assert drive_db.read_bytes() == plain
        assert store.history(database) == generations
        assert trial_file.read_text() == trial_text  # nor the files of its trials
        assert len(finished_trials(database)) == 2

        restored = store.restore(database, generation=generations[0].number)
        assert restored.ok, restored.error
        assert finished_trials(database) == kept
        assert any("set aside" in note for note in restored.notes)
        again = sweep(local, store, worker, 6)
        assert again.backup_ok, str(again.backup_report)
        assert finished_trials(database)[:4] == kept


def test_a_trial_folder_of_a_study_started_anew_is_checked_against_drive_before_it_goes(
    tmp_path: Path,
) -> None:
    """Whatever the order of its backups, a study started anew over the Drive copy does
    not replace that copy's trial files: a trial folder backed up before the new study's
    database is checked against Drive's first, and refused with it."""
    with stand_in(tmp_path) as (store, _, local), own_worker() as worker:
        first = sweep(local, store, worker, 4)
        drive_db = store.drive_path_for(first.study_dir / "study.db")
        trial_file = drive_db.parent / "trials" / "trial-00000" / "result.txt"
        trial_text = trial_file.read_text()

        shutil.rmtree(first.study_dir)  # the user deletes the local study ...
        sweep(local, None, worker, 2)  # ... and runs a new one, not yet backed up
        folder = store.backup(first.study_dir / "trials" / "trial-00000", is_directory=True)
        assert not folder.ok
        assert folder.error is not None
        assert "ahead of this runtime" in folder.error
        assert trial_file.read_text() == trial_text


def test_a_bad_write_that_reached_drive_is_undone_by_restoring_before_it(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    with (
        stand_in(tmp_path, clock=lambda: now[0]) as (store, _, local),
        own_worker() as worker,
    ):
        first = sweep(local, store, worker, 4)
        database = first.study_dir / "study.db"
        good_best = first.study.best_value
        moment = now[0] + 30.0
        now[0] += 60.0
        # A buggy script adds trials with nonsense values; they keep every finished
        # trial, so the monotonic rule lets them through to Drive.
        study = optuna.load_study(
            study_name=first.study.study_name, storage=f"sqlite:///{database}"
        )
        for _ in range(3):
            study.add_trial(
                optuna.trial.create_trial(
                    params={"x": 0.0},
                    distributions={"x": optuna.distributions.FloatDistribution(-10, 10)},
                    value=-1e9,
                )
            )
        del study
        assert store.backup(database).ok
        assert store.history(database)[0].best_value == -1e9

        restored = store.restore(database, before=moment)
        assert restored.ok, restored.error
        assert restored.generation is not None
        assert restored.finished_trials == 4
        assert store.history(database)[0].best_value == good_best
        again = sweep(local, store, worker, 6)
        assert again.backup_ok
        assert again.study.best_value > -1e9
        assert store.history(database)[0].finished_trials == 6


# -- retention --------------------------------------------------------------------------------

HOUR = 3600.0
DAY = 24 * HOUR


def base_records(folder: Path) -> dict[int, dict[str, Any]]:
    records = {}
    for path in folder.glob("*.json"):
        records[int(path.name[:8])] = json.loads(path.read_text())
    return records


def test_thinning_keeps_the_newest_and_a_day_and_a_week_old_generation(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    with stand_in(tmp_path, keep_generations=10, compact_fraction=0.0, clock=lambda: now[0]) as (
        store,
        _,
        local,
    ):
        database = local / "study-1" / "study.db"
        url = f"sqlite:///{database}"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=url, study_name="s")
        folder = history_folder(store.drive_path_for(database))
        start = now[0]
        trials_at: dict[int, int] = {}
        # Nine and a half days of a base every six hours (each one archived), then a
        # base every ten minutes (too close together to be archived).
        spacing = 6 * HOUR
        steps = [spacing] * 38 + [HOUR / 6] * 4
        for step in steps:
            study.add_trial(optuna.trial.create_trial(value=now[0] - start))
            result = store.backup(database)
            assert result.ok, result.error
            assert result.generation is not None
            trials_at[result.generation] = len(study.trials)
            records = base_records(folder)
            ages = {n: now[0] - r["created"] for n, r in records.items()}
            assert len(records) <= 10
            assert max(records) == result.generation  # the newest always survives
            for mark in (HOUR, DAY, 7 * DAY):
                if now[0] - start >= mark:
                    # One aged between the mark and twice it, give or take the spacing.
                    assert any(mark <= age < 2 * mark + spacing for age in ages.values()), (
                        mark,
                        sorted(ages.values()),
                    )
            now[0] += step
        del study

        records = base_records(folder)
        archived = sorted(int(p.name[:8]) for p in folder.glob("*.db"))
        assert len(records) == 10
        assert archived == sorted(n for n, r in records.items() if r["where"] == "archive")
        oldest = min(records)
        patches = sorted(int(p.name[:8]) for p in folder.glob("*.patch"))
        assert patches == list(range(oldest + 1, max(trials_at) + 1))
        assert not [p for p in folder.iterdir() if not p.name.endswith((".json", ".db", ".patch"))]

        # Every kept generation restores (from a copy of Drive, so each check stands alone).
        for number, generation in enumerate(sorted(trials_at)):
            if generation < oldest or (number % 10 and generation not in records):
                continue
            with drive_copy(store.drive_root, tmp_path / f"check-{generation}") as checker:
                target = checker.local_root / "study-1" / "study.db"
                restored = checker.restore(target, generation=generation)
                assert restored.ok, (generation, restored.error)
                assert len(finished_trials(target)) == trials_at[generation]
                assert integrity(target) == "ok"


# -- patch round trips ------------------------------------------------------------------------

operation = st.one_of(
    st.tuples(st.just("complete"), st.floats(-1e6, 1e6, allow_nan=False)),
    st.tuples(st.just("fail"), st.just(0.0)),
    st.tuples(st.just("prune"), st.floats(-10, 10, allow_nan=False)),
    st.tuples(st.just("running"), st.just(0.0)),
    st.tuples(st.just("attr"), st.integers(0, 20_000).map(float)),
    st.tuples(st.just("finish_running"), st.floats(-10, 10, allow_nan=False)),
)


def apply(study: optuna.Study, op: str, value: float) -> None:
    if op == "complete":
        study.tell(study.ask({"x": optuna.distributions.FloatDistribution(-1e6, 1e6)}), value)
    elif op == "fail":
        study.tell(study.ask(), state=TrialState.FAIL)
    elif op == "prune":
        trial = study.ask()
        trial.report(value, 0)
        study.tell(trial, state=TrialState.PRUNED)
    elif op == "running":
        study.ask().set_user_attr("note", "left running")
    elif op == "attr":
        # A long attribute spills into overflow pages; short ones change one page.
        study.set_user_attr(f"a{int(value) % 3}", "x" * int(value))
    else:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            study.tell(running[0].number, value)


STUDY_TABLES = (
    "studies",
    "study_directions",
    "study_user_attributes",
    "trials",
    "trial_values",
    "trial_params",
    "trial_intermediate_values",
    "trial_user_attributes",
)


def table_rows(database: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of Optuna's study and trial tables: the trials, compared as data."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return {
            table: connection.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in STUDY_TABLES
        }
    finally:
        connection.close()


@pytest.fixture(scope="module")
def empty_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Optuna study with no trials yet, made once (creating one takes a while)."""
    database = tmp_path_factory.mktemp("template") / "study.db"
    optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
    return database


@settings(
    max_examples=4,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(st.lists(operation, min_size=1, max_size=4), min_size=2, max_size=4))
def test_every_generation_restores_to_the_local_study_of_its_moment(
    tmp_path: Path, empty_study: Path, steps: list[list[tuple[str, float]]]
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as scratch:
        root = Path(scratch)
        with stand_in(root) as (store, _, local):
            database = local / "study-1" / "study.db"
            database.parent.mkdir(parents=True)
            shutil.copyfile(empty_study, database)
            study = optuna.load_study(storage=f"sqlite:///{database}", study_name="s")
            moments: dict[int, tuple[dict[str, list[tuple[Any, ...]]], bytes]] = {}
            for step in steps:
                for op, value in step:
                    apply(study, op, value)
                result = store.backup(database)
                assert result.ok, result.error
                assert result.generation is not None
                moments[result.generation] = (
                    table_rows(database),
                    normalised(database, root / "local.vacuum"),
                )
            del study
            kinds = {g.number: g.kind for g in store.history(database) if g.kind == "patch"}
            assert set(kinds) >= set(list(moments)[1:])  # every later one is a patch
            for generation, (rows, image) in moments.items():
                where = root / f"check-{generation}"
                where.mkdir()
                with drive_copy(store.drive_root, where) as checker:
                    target = checker.local_root / "study-1" / "study.db"
                    restored = checker.restore(target, generation=generation)
                    assert restored.ok, restored.error
                    assert table_rows(target) == rows
                    assert normalised(target, where / "restored.vacuum") == image


# -- a damaged or missing patch ---------------------------------------------------------------


@contextmanager
def five_generations(tmp_path: Path) -> Iterator[tuple[DriveStore, Path, Path, dict[int, int]]]:
    """A study backed up as generation 1 (a base) and patches 2 to 5."""
    with stand_in(tmp_path) as (store, _, local):
        database = local / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        finished: dict[int, int] = {}
        for _ in range(5):
            study.tell(study.ask(), 1.0)
            result = store.backup(database)
            assert result.ok, result.error
            assert result.generation is not None
            finished[result.generation] = len(study.trials)
        del study
        assert sorted(finished) == [1, 2, 3, 4, 5]
        yield store, database, history_folder(store.drive_path_for(database)), finished


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped byte in the newest patch", "missing middle patch"])
def test_a_broken_chain_is_named_and_its_last_good_generation_restores_by_name(
    tmp_path: Path, damage: str
) -> None:
    with five_generations(tmp_path) as (store, database, folder, finished):
        if damage.startswith("flipped"):
            (patch,) = folder.glob("00000005-*.patch")
            flip_middle_byte(patch)
            good, broken = 4, 5
        else:
            (patch,) = folder.glob("00000003-*.patch")
            patch.unlink()
            good, broken = 2, 3

        # A new runtime whose disk kept the study: its study holds more, so it stays.
        with drive_copy(store.drive_root, tmp_path / "kept-disk") as other:
            target = other.local_root / "study-1" / "study.db"
            target.parent.mkdir(parents=True)
            shutil.copyfile(database, target)
            local_before = target.read_bytes()
            kept = other.restore(target)
            assert kept.ok, kept.error
            assert kept.files_copied == 0
            assert target.read_bytes() == local_before
            assert any(f"stopped at generation {good}" in n for n in kept.notes), kept.notes

        # A new runtime with no local study is told, and nothing is restored: a sweep
        # going on from an older generation would stop its backups at the newer copy.
        with drive_copy(store.drive_root, tmp_path / "new-runtime") as fresh:
            target = fresh.local_root / "study-1" / "study.db"
            refused = fresh.restore(target)
            assert not refused.ok
            assert refused.reason == "refused"
            error = refused.error or ""
            assert f"generation {broken} is missing or damaged" in error
            assert f"generation {good} is the newest that can" in error
            assert f"--generation {good}" in error
            if damage.startswith("flipped"):
                assert patch.name in error
            assert not target.exists()
            # Asked for the broken generation on purpose, it refuses and replaces nothing.
            asked = fresh.restore(target, generation=broken)
            assert not asked.ok
            assert f"generation {broken}" in (asked.error or "")
            assert not target.exists()

            # Asked for the good one by name, it comes back, becomes the newest on Drive,
            # and the study's backups go on from it.
            restored = fresh.restore(target, generation=good)
            assert restored.ok, restored.error
            assert len(finished_trials(target)) == finished[good]
            assert integrity(target) == "ok"
            study = optuna.load_study(storage=f"sqlite:///{target}", study_name="s")
            study.tell(study.ask(), 2.0)
            del study
            backed_up = fresh.backup(target)
            assert backed_up.ok, backed_up.error
            newest = fresh.history(target)[0]
            assert newest.number == backed_up.generation
            assert newest.finished_trials == finished[good] + 1


def test_a_patch_of_several_megabytes_restores_as_the_newest_generation(tmp_path: Path) -> None:
    # Training code may store big values in a trial (a plot, a config, a vocabulary as a
    # user attribute): one trial can change megabytes of a large study at once.
    with stand_in(tmp_path) as (store, _, local):
        database = local / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        for _ in range(24):
            trial = study.ask()
            trial.set_user_attr("blob", os.urandom(1 << 20).hex())  # 2 MB each, incompressible
            study.tell(trial, 1.0)
        assert store.backup(database).ok
        trial = study.ask()
        trial.set_user_attr("blob", os.urandom(6 << 20).hex())  # 12 MB in one trial
        study.tell(trial, 2.0)
        result = store.backup(database)
        assert result.ok, result.error
        del study
        (newest, *_) = store.history(database)
        assert newest.kind == "patch"
        assert newest.size > 5 << 20

        with drive_copy(store.drive_root, tmp_path / "new-runtime") as fresh:
            target = fresh.local_root / "study-1" / "study.db"
            restored = fresh.restore(target)
            assert restored.ok, restored.error
            assert restored.generation == newest.number, restored.notes
            assert not restored.notes
            assert len(finished_trials(target)) == 25


def test_a_patch_drive_fails_to_read_fails_the_restore_instead_of_going_back(
    tmp_path: Path,
) -> None:
    # An I/O error is not damage: Drive often answers the same read a moment later. A
    # restore that stopped before it would bring back an older study, whose sweep would
    # then meet the newer Drive copy and stop its backups.
    with five_generations(tmp_path) as (store, _database, folder, finished):
        (patch,) = folder.glob("00000003-*.patch")
        plan_path = tmp_path / "plan.json"
        FaultPlan(fail_read_paths=((f"*/{patch.name}", "EIO"),)).write(plan_path)
        shutil.copytree(store.drive_root, tmp_path / "copy" / "drive")
        fresh = simulated_store(tmp_path / "copy" / "local", tmp_path / "copy" / "drive", plan_path)
        try:
            target = fresh.local_root / "study-1" / "study.db"
            failed = fresh.restore(target)
            assert not failed.ok
            assert failed.retryable
            assert patch.name in (failed.error or "")
            assert "Input/output error" in (failed.error or "")
            assert not target.exists()

            FaultPlan().write(plan_path)  # Drive answers again
            restored = fresh.restore(target)
            assert restored.ok, restored.error
            assert restored.generation == 5
            assert len(finished_trials(target)) == finished[5]
        finally:
            fresh.close()


def test_a_study_folder_below_another_folder_restores_its_newest_generation_on_a_fresh_disk(
    tmp_path: Path,
) -> None:
    # run_sweep's layout: LOCAL/out/study-<hash>/study.db, two levels below the local root.
    with stand_in(tmp_path) as (store, _, local):
        database = local / "out" / "study-1" / "study.db"
        database.parent.mkdir(parents=True)
        study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
        for _ in range(4):
            study.tell(study.ask(), 1.0)
            assert store.backup(database).ok
        del study
        newest = store.history(database)[0]
        assert newest.kind == "patch"  # the plain study.db on Drive is older than this

        with drive_copy(store.drive_root, tmp_path / "fresh") as fresh:
            target = fresh.local_root / "out" / "study-1" / "study.db"
            restored = fresh.restore(target)
            assert restored.ok, restored.error
            assert restored.generation == newest.number
            assert len(finished_trials(target)) == 4


def test_a_patch_that_does_not_make_its_result_stops_the_chain_before_it(tmp_path: Path) -> None:
    with five_generations(tmp_path) as (store, _database, folder, finished):
        # Checksums intact, pages wrong: what a writer bug would leave. The fast path
        # (patches applied unchecked, the end hashed) must notice and find the culprit.
        (path,) = folder.glob("00000005-*.patch")
        good = decode_patch(path.read_bytes())
        header = good.header
        pages = tuple((number, bytes(len(page))) for number, page in good.pages)
        delta = PageDelta(header.page_size, header.page_count, header.result_sha256, pages)
        path.write_bytes(
            encode_patch(
                delta,
                generation=header.generation,
                parent_generation=header.parent_generation,
                parent_sha256=header.parent_sha256,
                created=header.created,
                meta=header.meta,
            )
        )
        with drive_copy(store.drive_root, tmp_path / "new-runtime") as fresh:
            target = fresh.local_root / "study-1" / "study.db"
            refused = fresh.restore(target)
            assert not refused.ok
            assert path.name in (refused.error or "")
            assert "stopped at generation 4" in (refused.error or "")
            assert not target.exists()
            restored = fresh.restore(target, generation=4)
            assert restored.ok, restored.error
            assert len(finished_trials(target)) == finished[4]
            assert integrity(target) == "ok"


def test_restore_follows_the_branch_that_went_on_when_two_runtimes_forked_the_history(
    tmp_path: Path,
) -> None:
    """Two runtimes that both believed they held the study (a lease the mount showed
    late) can each publish a generation after the same one. A restore follows the branch
    the later generations build on, whatever order Drive lists the files in."""
    with five_generations(tmp_path) as (store, _database, folder, finished):
        (real,) = folder.glob("00000002-*.patch")
        header = decode_patch(real.read_bytes()).header
        with drive_copy(store.drive_root, tmp_path / "generation-1") as fresh:
            first = fresh.local_root / "study-1" / "study.db"
            assert fresh.restore(first, generation=1).ok
        assert sha256_file(first) == header.parent_sha256
        # The other runtime's generation 2: generation 1 with a change of its own.
        theirs = tmp_path / "theirs.db"
        shutil.copyfile(first, theirs)
        connection = sqlite3.connect(theirs)
        try:
            connection.execute("PRAGMA user_version = 7")
            connection.commit()
        finally:
            connection.close()
        fork = encode_patch(
            diff_files(first, theirs),
            generation=2,
            parent_generation=1,
            parent_sha256=header.parent_sha256,
            created=header.created,
            meta=header.meta,
        )
        for tag in "01234567":  # listed before, after and among the real one
            (folder / f"00000002-{tag}.patch").write_bytes(fork)

        with drive_copy(store.drive_root, tmp_path / "new-runtime") as fresh:
            target = fresh.local_root / "study-1" / "study.db"
            restored = fresh.restore(target)
            assert restored.ok, restored.error
            assert restored.generation == 5
            assert len(finished_trials(target)) == finished[5]
            assert integrity(target) == "ok"


# -- kills ------------------------------------------------------------------------------------

CHILD = """
import json, sys
from pathlib import Path
import optuna
from sweepsafe.testing import FaultPlan, simulated_store

optuna.logging.set_verbosity(optuna.logging.WARNING)
local, drive, plan, fifo, final = sys.argv[1:6]
store = simulated_store(local, drive, plan)
database = Path(local) / "study-1" / "study.db"
study = optuna.load_study(study_name="s", storage=f"sqlite:///{database}")

def more(n):
    for _ in range(n):
        study.tell(study.ask(), 1.0)

for _ in range(3):
    more(2)
    result = store.backup(database)
    assert result.ok, result.error
more(2)
print(json.dumps({"generation": result.generation, "finished": len(study.trials)}), flush=True)
FaultPlan(pause_fifo=fifo).write(plan)
result = store.backup(database, final=final == "final")
print("done", result, flush=True)
"""


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the helpers a runtime started)."""
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces or parentheses; the fields follow its last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def committing(drive: Path) -> list[tuple[Path, bytes]]:
    """Temporaries on Drive waiting to be committed, with their first bytes."""
    return [(path, path.read_bytes()[:512]) for path in temp_files(drive)]


def is_target(kind: str, unit_drive: Path, path: Path, head: bytes) -> bool:
    if kind == "patch":
        return head.startswith(PATCH_MAGIC)
    if kind == "base":
        return path.parent == unit_drive and head.startswith(SQLITE_MAGIC)
    return path.parent.name == "study.db" and head.startswith(b"{") and b'"where"' in head


def wait_for_reader(fifo: Path, child: subprocess.Popen[str], timeout: float = 60.0) -> int:
    """Open the pipe for writing once a helper waits on it; the descriptor."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            if child.poll() is not None:
                output = child.stdout.read() if child.stdout else ""
                raise AssertionError(f"the child ended first: {output}") from None
            if time.monotonic() > deadline:
                raise AssertionError("no helper reached a commit in time") from None
            pause.wait(0.005)


@pytest.mark.parametrize("kind", ["patch", "base", "base record"])
def test_a_kill_while_a_generation_is_written_leaves_a_restorable_chain(
    tmp_path: Path, kind: str
) -> None:
    local, drive = tmp_path / "local", tmp_path / "drive"
    database = local / "study-1" / "study.db"
    database.parent.mkdir(parents=True)
    optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
    plan, fifo = tmp_path / "plan.json", tmp_path / "gate"
    FaultPlan().write(plan)
    os.mkfifo(fifo)
    final = "patch" if kind == "patch" else "final"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(local), str(drive), str(plan), str(fifo), final],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready = json.loads(child.stdout.readline())
        unit_drive = drive / "study-1"
        while True:
            gate = wait_for_reader(fifo, child)
            pending = committing(drive)
            if any(is_target(kind, unit_drive, p, h) for p, h in pending):
                break
            # Let this commit through (a broken pipe: its reader was already leaving).
            with contextlib.suppress(BrokenPipeError):
                os.write(gate, b"x")
            os.close(gate)
            wait_for(
                lambda: not any(os.path.exists(p) for p, _ in pending),  # noqa: B023
                what="the released commit",
            )
        # The runtime dies with its helpers, one of them holding the commit.
        for pid in child_processes(child.pid):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait(timeout=30)
        os.close(gate)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        assert child.stdout is not None
        child.stdout.close()
    assert temp_files(drive), "the kill left no temporary: it did not land mid-write"
    expected = ready["generation"] + (0 if kind == "patch" else 1)

    # A new runtime on an empty disk restores a whole, checked database.
    fresh_local = tmp_path / "fresh"
    fresh_local.mkdir()
    store = simulated_store(fresh_local, drive, FaultPlan())
    try:
        target = fresh_local / "study-1" / "study.db"
        restored = store.restore(target)
        assert restored.ok, restored.error
        assert restored.generation == expected
        assert integrity(target) == "ok"
        finished = len(finished_trials(target))
        assert finished == (ready["finished"] - 2 if kind == "patch" else ready["finished"])
        # Its next backup (the dead runtime's lease is free) leaves no temporary behind.
        with optuna_study(target) as study:
            study.tell(study.ask(), 2.0)
        result = store.backup(target, final=True)
        assert result.ok, result.error
        assert temp_files(drive) == []
        assert store.verify(target).ok
    finally:
        store.close()


@contextmanager
def optuna_study(database: Path) -> Iterator[optuna.Study]:
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{database}")
    try:
        yield study
    finally:
        del study
