"""Kill campaign: SIGKILL a real sweep at random moments, then check the Drive copy and resume.

Each run starts ``sweep.py`` in a child process, against a simulated Drive that
takes 0.05-0.3 s per file plus 0.1-1 s per MiB, so copies are often in flight. The
seed picks, per run, the phase to aim at (spread evenly over: starting up, the first
trial, between trials, the final flush) and a random instant inside it; the child's
events tell the campaign when that phase began. At that instant the whole "runtime"
(the child and every process it started) gets SIGKILL. Then, with sqlite3 and Optuna
only (never sweepsafe's code):

* the Drive ``study.db`` exists if the immediate backup had reached Drive before the kill
  (otherwise its absence is allowed and said), passes ``PRAGMA integrity_check`` and
  loads with ``optuna.load_study``;
* its COMPLETE trials are a prefix of the local database's (numbers, params, values);
* every file in the Drive trial folders is byte-identical to a version the local file
  had (the child logs the hash of every version before writing it);
* the sweep, restarted on a FRESH local folder (the dead runtime's disk is gone),
  restores from Drive and finishes: exactly ``n_trials`` finished trials, a complete
  Drive copy identical to the local study, and no temporary file left on Drive.
  One run in five restarts on the same disk instead (a kernel restart: the local study
  is ahead of Drive and wins), and one in five first starts a runtime that is killed
  again while it restores (Drive must be no worse after it) before the one that finishes.

    python -m tools.campaigns.kill --runs 100 --seed 1
    python -m tools.campaigns.kill --runs 4 --seed 1 --quick
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from sweepsafe.testing import FaultPlan
from tools.campaigns.checks import (
    DatabaseCheck,
    check_database,
    drive_finished_count,
    file_hashes,
    is_kept_in,
    newest_on_drive,
    read_versions,
    temp_files,
    trials_without_files,
)
from tools.campaigns.child import ChildEvent, ChildSweep, pause

AIMED_PHASES = ("startup", "first trial", "between trials", "final flush")
RESTARTS = (
    "fresh disk",
    "stale runtime comes back",
    "same disk",
    "two runtimes at once",
    "killed during restore",
)
"""How the sweep comes back, by run: on a new runtime with an empty disk; on a new runtime,
after which the dead one's disk comes back and runs the sweep again (a stale runtime);
after a kernel restart that kept the disk; on two new runtimes started at once (two
notebook tabs); or on a new runtime that is itself killed while restoring, and then on
another one."""
FILES_OF_A_FINISHED_TRIAL = ("result.json",)
CHILD_TIMEOUT_S = 120.0


@dataclass
class KillRun:
    """What one kill did and what the checks found."""

    index: int
    n_trials: int
    latency_s: float
    latency_per_mib_s: float
    aimed: str
    n_jobs: int = 1
    restart: str = "fresh disk"
    landed: str = "?"
    in_flight: list[str] = field(default_factory=list)
    drive_db_at_kill: bool = False
    first_copy_seen: bool = False
    """The child had said that the immediate backup of study.db reached Drive."""
    local_finished: int | None = None
    drive_finished: int | None = None
    corrupt: int = 0
    temp_files_after_kill: int = 0
    resumed: bool = False
    restore_s: float | None = None
    restore_reference_s: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int | None:
        """Finished trials the kill cost: local finished minus Drive finished at the kill."""
        if self.local_finished is None:
            return None
        return self.local_finished - (self.drive_finished or 0)

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class KillSummary:
    """The whole campaign."""

    seed: int
    quick: bool
    runs: list[KillRun]
    duration_s: float

    @property
    def failures(self) -> list[str]:
        found = [f"run {run.index}: {failure}" for run in self.runs for failure in run.failures]
        past_first_trial = [run for run in self.runs if run.local_finished]
        if len(past_first_trial) >= 3 and not any(run.first_copy_seen for run in self.runs):
            # Without this event the "Drive copy must exist" check would never apply.
            found.append(
                "no run ever reported the immediate backup reaching Drive: the check that "
                "the Drive copy exists after it is blind (did its log message change?)"
            )
        return found

    @property
    def corrupt(self) -> int:
        return sum(run.corrupt for run in self.runs)

    @property
    def resumes_ok(self) -> int:
        return sum(run.resumed for run in self.runs)

    @property
    def lost(self) -> list[int]:
        return [run.lost for run in self.runs if run.lost is not None]

    @property
    def restore_times(self) -> list[float]:
        return [run.restore_s for run in self.runs if run.restore_s is not None]

    @property
    def restore_references(self) -> list[float]:
        return [run.restore_reference_s for run in self.runs if run.restore_reference_s is not None]


class DriveSampler:
    """Reads the Drive copy over and over while runtimes write it, as a user could.

    Every sample, the newest generation's finished trials (from its header) must be no
    fewer than ever before; every few samples it is rebuilt, and each of its finished
    trials must have its files on Drive: a finished trial never reaches Drive before them.
    """

    def __init__(self, run: KillRun, drive: Path, study_rel: Path, scratch: Path) -> None:
        self._run = run
        self._drive = drive
        self._study_rel = study_rel
        self._scratch = scratch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.best = 0
        self.samples = 0

    def _loop(self) -> None:
        while not self._stop.wait(0.15):
            try:
                count = drive_finished_count(self._drive, self._study_rel)
            except Exception:
                continue
            if count is None:
                continue
            self.samples += 1
            if count < self.best:
                self._run.corrupt += 1
                self._run.failures.append(
                    f"the Drive copy went back from {self.best} to {count} finished trials"
                )
            if count > self.best or self.samples % 5 == 0:
                self._check_files()
            self.best = max(self.best, count)

    def _check_files(self) -> None:
        rebuilt = newest_on_drive(self._drive, self._study_rel, self._scratch)
        if not rebuilt.sound:
            return  # a generation being written while listed; the next sample sees it
        lacking = trials_without_files(
            rebuilt.finished, self._drive / self._study_rel, FILES_OF_A_FINISHED_TRIAL
        )
        if lacking:
            self._run.corrupt += 1
            self._run.failures.append(
                f"the Drive copy listed finished trials {lacking[:5]} whose files were not on Drive"
            )

    def __enter__(self) -> DriveSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@contextlib.contextmanager
def sampled(
    run: KillRun, drive: Path, study_rel: Path | None, scratch: Path
) -> Iterator[DriveSampler | None]:
    """A DriveSampler while the block runs, when the study's place is known."""
    if study_rel is None:
        yield None
        return
    with DriveSampler(run, drive, study_rel, scratch) as sampler:
        yield sampler


def _sweep_args(
    local: Path,
    drive: Path,
    plan: Path,
    run: KillRun,
    seed: int,
    max_kib: int,
    log: Path | None,
    n_trials: int | None = None,
) -> list[str]:
    args = [
        "--n-jobs",
        str(run.n_jobs),
        "--local-root",
        str(local),
        "--drive-root",
        str(drive),
        "--plan",
        str(plan),
        "--n-trials",
        str(n_trials or run.n_trials),
        "--seed",
        str(seed),
        "--max-kib",
        str(max_kib),
        "--flush-timeout",
        "60",
    ]
    if log is not None:
        args += ["--versions-log", str(log)]
    return args


def _wait_for_aimed_phase(
    child: ChildSweep, run: KillRun, rng: random.Random, max_kib: int
) -> tuple[ChildEvent | None, float]:
    """Wait for the event that opens the aimed phase; return it and the delay to kill after."""
    latency, per_mib = run.latency_s, run.latency_per_mib_s
    one_big_copy = latency + per_mib * max_kib / 1024
    if run.aimed == "startup":
        return child.wait_for_event("run_sweep_called", CHILD_TIMEOUT_S), rng.uniform(0, 0.25)
    if run.aimed == "first trial":
        event = child.wait_for_event("trial_start", CHILD_TIMEOUT_S, number=0)
        return event, rng.uniform(0, latency + 0.03)
    if run.aimed == "between trials":
        number = rng.randint(1, max(1, run.n_trials - 2))
        event = child.wait_for_event("trial_done", CHILD_TIMEOUT_S, number=number)
        # Trials take 20-50 ms: a short delay keeps the kill among the trials.
        return event, rng.uniform(0, 0.12)
    event = child.wait_for_event("final_flush", CHILD_TIMEOUT_S)
    return event, rng.uniform(0, 3 * one_big_copy)


def _landed_phase(events: list[ChildEvent]) -> str:
    names = [event.name for event in events]
    if "run_sweep_called" not in names:
        return "before run_sweep"
    if "sweep_returned" in names:
        return "after the sweep returned"
    if "final_flush" in names:
        return "final flush"
    if "trial_start" not in names:
        return "restore / study creation"
    if "initial_backup_done" not in names:
        return "first trial, immediate backup in flight"
    done = [event.get("number") for event in events if event.name == "trial_done"]
    return f"between trials (after {len(done)})"


def run_one(index: int, seed: int, root: Path, quick: bool) -> KillRun:
    """One kill and its checks; the run's folder is removed when it passed."""
    rng = random.Random(f"{seed}:{index}")
    n_trials = rng.randint(5, 8) if quick else rng.randint(10, 24)
    max_kib = 256 if quick else 1024
    run = KillRun(
        index=index,
        n_trials=n_trials,
        latency_s=round(rng.uniform(0.05, 0.3), 3),
        latency_per_mib_s=round(rng.uniform(0.1, 1.0), 3),
        aimed=AIMED_PHASES[index % len(AIMED_PHASES)],
        restart=RESTARTS[index % len(RESTARTS)],
        # One run in six runs two trials at once: the callbacks then race each other.
        n_jobs=2 if index % 6 == 5 else 1,
    )
    run_dir = root / f"run-{index:03d}"
    first_local, fresh_local, drive = (
        run_dir / "runtime-1",
        run_dir / "runtime-2",
        run_dir / "drive",
    )
    child_tmp = run_dir / "tmp-1"
    for folder in (first_local, fresh_local, drive, child_tmp):
        folder.mkdir(parents=True)
    plan = run_dir / "fault-plan.json"
    FaultPlan(latency_s=run.latency_s, latency_per_mib_s=run.latency_per_mib_s).write(plan)
    versions_log = run_dir / "versions.jsonl"

    child = ChildSweep(
        _sweep_args(first_local, drive, plan, run, seed + index, max_kib, versions_log),
        stderr_path=run_dir / "child-1.stderr",
        env={"TMPDIR": str(child_tmp)},
    )
    trigger, delay = _wait_for_aimed_phase(child, run, rng, max_kib)
    if trigger is None:
        child.kill_like_a_dead_runtime()
        run.failures.append(
            f"the child ended before the aimed phase ({run.aimed}): {child.stderr_text()[-800:]}"
        )
        return run
    pause(delay)
    child.kill_like_a_dead_runtime()
    events = child.snapshot()
    run.landed = _landed_phase(events)
    started = next((e for e in events if e.name == "run_sweep_called"), None)
    study_dir = Path(started.get("study_dir")) if started is not None else None
    _check_at_kill(run, events, study_dir, first_local, drive, child_tmp, versions_log)

    relative = study_dir.relative_to(first_local) if study_dir is not None else None
    if relative is not None:
        run.restore_reference_s = _plain_restore_time(drive / relative, run_dir / "reference")
    FaultPlan().write(plan)
    resume_local = fresh_local
    stale_disk = run_dir / "runtime-1-disk"
    if run.restart == "same disk":
        # A kernel restart: the process died, its local folder is still there.
        resume_local = first_local
    else:
        # The runtime is gone with its disk: a new one starts from an empty local folder.
        if run.restart == "stale runtime comes back":
            shutil.copytree(first_local, stale_disk, symlinks=True)
        shutil.rmtree(first_local)
    if run.restart == "killed during restore" and relative is not None:
        _kill_during_restore(run, rng, run_dir, fresh_local, drive, plan, relative, seed, max_kib)
        shutil.rmtree(fresh_local)
        resume_local = run_dir / "runtime-3"
        resume_local.mkdir()
    with sampled(run, drive, relative, run_dir / "sampled"):
        if run.restart == "two runtimes at once" and relative is not None:
            _two_at_once(run, run_dir, drive, plan, relative, seed, max_kib)
        else:
            _resume_and_check(run, run_dir, resume_local, drive, plan, relative, seed, max_kib)
        if run.restart == "stale runtime comes back" and relative is not None and run.resumed:
            _stale_comes_back(run, run_dir, stale_disk, drive, plan, relative, seed, max_kib)
    if run.ok:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


def _check_at_kill(
    run: KillRun,
    events: list[ChildEvent],
    study_dir: Path | None,
    local_root: Path,
    drive: Path,
    child_tmp: Path,
    versions_log: Path,
) -> None:
    leftovers = temp_files(drive)
    run.temp_files_after_kill = len(leftovers)
    for path in leftovers:
        # A temporary's name does not carry its target's: say in which folder it was.
        folder = path.parent.relative_to(drive).as_posix()
        run.in_flight.append(f"Drive copy into {folder}/")
    # The store snapshots a database into a scratch folder of the local root first.
    snapshots = [
        path
        for folder in (child_tmp, *local_root.glob(".*/snapshots"))
        for path in folder.rglob("*")
        if path.is_file()
    ]
    if snapshots:
        run.in_flight.append(f"local snapshot of study.db ({len(snapshots)} file(s))")
    if study_dir is None:
        return
    drive_study = drive / study_dir.relative_to(local_root)
    plain = check_database(drive_study / "study.db")
    if plain.exists and not plain.sound:
        run.corrupt += 1
        run.failures.append(f"the plain Drive study.db is not sound: {plain.integrity}")
    drive_check = newest_on_drive(
        drive, study_dir.relative_to(local_root), local_root.parent / "at-kill"
    )
    lacking = trials_without_files(drive_check.finished, drive_study, FILES_OF_A_FINISHED_TRIAL)
    if lacking:
        run.corrupt += 1
        run.failures.append(f"Drive lists finished trials {lacking[:5]} without their files")
    local_check = check_database(study_dir / "study.db", include_sidecars=True)
    first_backup_done = any(event.name == "initial_backup_done" for event in events)
    run.drive_db_at_kill = drive_check.exists
    run.first_copy_seen = first_backup_done
    if local_check.readable:
        # No study in it yet when the kill came inside create_study: nothing finished.
        run.local_finished = local_check.count
    elif local_check.exists:
        run.failures.append(f"the local database is unreadable after the kill: {local_check}")
    if not drive_check.exists:
        if first_backup_done:
            run.failures.append("the immediate backup had reached Drive but study.db is gone")
            run.corrupt += 1
        else:
            run.landed += "; Drive copy absent (allowed: killed before the first copy landed)"
        run.drive_finished = 0 if run.local_finished is not None else None
    else:
        _check_drive_database(run, drive_check, local_check)
    versions = read_versions(versions_log)
    for relative, digest in file_hashes(drive_study / "trials").items():
        known = versions.get(f"trials/{relative}", set())
        if digest not in known:
            run.corrupt += 1
            run.failures.append(
                f"Drive file trials/{relative} matches none of the {len(known)} versions "
                "the local file had"
            )


def _check_drive_database(run: KillRun, drive: DatabaseCheck, local: DatabaseCheck) -> None:
    if not drive.sound:
        run.corrupt += 1
        run.failures.append(
            f"Drive study.db is not sound: integrity={drive.integrity!r}, "
            f"load={drive.load_error}, studies={drive.studies}"
        )
        return
    run.drive_finished = drive.count
    if local.readable and not is_kept_in(drive.finished, local.finished, run.n_jobs):
        run.corrupt += 1
        run.failures.append(
            "the Drive copy's COMPLETE trials are not kept locally (one job: a prefix): Drive "
            f"{[t.number for t in drive.finished]} vs local {[t.number for t in local.finished]}"
        )


def _plain_restore_time(drive_study: Path, scratch: Path) -> float | None:
    """Reference: copy the Drive study folder by hand and open it with Optuna."""
    if not (drive_study / "study.db").is_file():
        return None
    started = time.perf_counter()
    shutil.copytree(drive_study, scratch)
    storage = optuna.storages.RDBStorage(f"sqlite:///{scratch / 'study.db'}")
    try:
        name = optuna.get_all_study_summaries(storage)[0].study_name
        optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()
    elapsed = time.perf_counter() - started
    shutil.rmtree(scratch)
    return elapsed


def _kill_during_restore(
    run: KillRun,
    rng: random.Random,
    run_dir: Path,
    local: Path,
    drive: Path,
    plan: Path,
    relative: Path,
    seed: int,
    max_kib: int,
) -> None:
    """Start a new runtime and kill it while it restores: Drive must be no worse after."""
    before = newest_on_drive(drive, relative, run_dir / "before-restore")
    child = ChildSweep(
        _sweep_args(local, drive, plan, run, seed + 50_000 + run.index, max_kib, None),
        stderr_path=run_dir / "child-restore.stderr",
    )
    if child.wait_for_event("run_sweep_called", CHILD_TIMEOUT_S) is None:
        child.kill_like_a_dead_runtime()
        run.failures.append(f"the restoring runtime did not start: {child.stderr_text()[-800:]}")
        return
    pause(rng.uniform(0, 0.4))
    child.kill_like_a_dead_runtime()
    after = newest_on_drive(drive, relative, run_dir / "after-restore")
    if before.sound and not (after.sound and is_kept_in(before.finished, after.finished, 1)):
        run.corrupt += 1
        run.failures.append(
            "killing a runtime during its restore made the Drive copy worse: "
            f"{before.count} -> {after.count} trials, integrity {after.integrity}"
        )


def _resume_and_check(
    run: KillRun,
    run_dir: Path,
    local: Path,
    drive: Path,
    plan: Path,
    relative: Path | None,
    seed: int,
    max_kib: int,
) -> None:
    drive_before = (
        newest_on_drive(drive, relative, run_dir / "before-resume")
        if relative is not None
        else None
    )
    local_before = local / relative / "study.db" if relative is not None else None
    local_had_db = local_before is not None and local_before.exists()
    child = ChildSweep(
        _sweep_args(local, drive, plan, run, seed + 100_000 + run.index, max_kib, None),
        stderr_path=run_dir / "child-2.stderr",
    )
    code = child.wait(CHILD_TIMEOUT_S)
    events = child.snapshot()
    called = child.first("run_sweep_called")
    returned = child.first("sweep_returned")
    if code != 0 or returned is None or called is None:
        run.failures.append(
            f"the resumed sweep failed (exit {code}): {child.stderr_text()[-1500:]}"
        )
        return
    reopened = next((e for e in events if e.name in ("trial_start", "sweep_returned")), returned)
    if not local_had_db:
        run.restore_s = reopened.received - called.received
    study_dir = Path(called.get("study_dir"))
    if relative is not None and study_dir.relative_to(local) != relative:
        run.failures.append(f"the resumed sweep used another study folder: {study_dir}")
        return
    had_copy = drive_before is not None and drive_before.exists
    should_restore = had_copy and not local_had_db
    if returned.get("restored_from_drive") != should_restore:
        run.failures.append(
            f"restored_from_drive={returned.get('restored_from_drive')} but Drive "
            f"{'held' if had_copy else 'did not hold'} a copy and the local study.db "
            f"{'was' if local_had_db else 'was not'} there"
        )
    local_check = check_database(study_dir / "study.db")
    drive_study = drive / study_dir.relative_to(local)
    drive_check = check_database(drive_study / "study.db")
    problems = []
    if local_check.count != run.n_trials:
        problems.append(f"the resumed study has {local_check.count} finished trials")
    report = returned.get("report") or {}
    if not report.get("ok"):
        problems.append(f"the final backup report is not ok: {report.get('text')}")
    if not drive_check.sound:
        problems.append(f"the final Drive copy is not sound: {drive_check.integrity}")
    elif drive_check.finished != local_check.finished:
        problems.append("the final Drive copy's finished trials differ from the local study")
    kept = drive_before is None or not drive_before.sound
    if not kept and not is_kept_in(drive_before.finished, local_check.finished, run.n_jobs):
        problems.append("trials the Drive copy held at the kill were not kept")
    leftovers = temp_files(drive)
    if leftovers:
        problems.append(
            f"{len(leftovers)} temporary file(s) left on Drive after a later backup: "
            + ", ".join(str(path.relative_to(drive)) for path in leftovers[:3])
        )
    local_files = file_hashes(study_dir / "trials")
    drive_files = file_hashes(drive_study / "trials")
    differing = [name for name, digest in local_files.items() if drive_files.get(name) != digest]
    if differing:
        problems.append(
            f"{len(differing)} trial file(s) missing or different on Drive at the end: "
            + ", ".join(differing[:3])
        )
    run.failures.extend(problems)
    run.resumed = not problems


def _two_at_once(
    run: KillRun, run_dir: Path, drive: Path, plan: Path, relative: Path, seed: int, max_kib: int
) -> None:
    """Two new runtimes start at once (two notebook tabs): one sweeps, the other is refused
    in one sentence, or finds the sweep done when it starts after the first ended."""
    children = [
        ChildSweep(
            _sweep_args(
                run_dir / f"tab-{tab}", drive, plan, run, seed + 200_000 + tab, max_kib, None
            ),
            stderr_path=run_dir / f"child-tab-{tab}.stderr",
        )
        for tab in (1, 2)
    ]
    codes = [child.wait(CHILD_TIMEOUT_S) for child in children]
    finished = [child for child, code in zip(children, codes, strict=True) if code == 0]
    refused = [child for child, code in zip(children, codes, strict=True) if code == 3]
    if len(finished) + len(refused) != 2 or not finished:
        run.failures.append(
            f"two runtimes at once: exit codes {codes}: "
            + " | ".join(child.stderr_text()[-600:] for child in children)
        )
        return
    for child in refused:
        event = child.first("refused")
        message = str(event.get("message")) if event is not None else ""
        if event is None or event.get("kind") != "LeaseHeldError" or "\n" in message:
            run.failures.append(f"the refused runtime said: {event and event.fields}")
        elif "takeover" not in message:
            run.failures.append(f"the refusal does not say how to take over: {message}")
    drive_check = newest_on_drive(drive, relative, run_dir / "after-tabs")
    if drive_check.count != run.n_trials:
        run.failures.append(
            f"two runtimes at once: the Drive copy ends with {drive_check.count} of "
            f"{run.n_trials} finished trials"
        )
    leftovers = temp_files(drive)
    if leftovers:
        run.failures.append(f"{len(leftovers)} temporary file(s) left on Drive by two runtimes")
    run.resumed = not run.failures


def _stale_comes_back(
    run: KillRun,
    run_dir: Path,
    stale_disk: Path,
    drive: Path,
    plan: Path,
    relative: Path,
    seed: int,
    max_kib: int,
) -> None:
    """The dead runtime's disk comes back and runs the sweep again, asking for more trials.

    Its local study is older than Drive's. If it holds nothing the Drive copy lacks, the
    Drive copy comes back and the sweep goes on; if the kill lost trials that the next
    runtime redid differently, the two diverged, and it must refuse in one sentence
    rather than replace either. Either way the Drive copy loses nothing (the sampler).
    """
    more = run.n_trials + 2
    # Drive is newer than the stale disk unless nothing ran since the kill (a kill after
    # the sweep returned leaves both with every trial): only a newer copy comes back.
    stale_count = check_database(stale_disk / relative / "study.db").count
    drive_count = newest_on_drive(drive, relative, run_dir / "before-stale").count
    newer_on_drive = drive_count > stale_count
    child = ChildSweep(
        _sweep_args(stale_disk, drive, plan, run, seed + 300_000, max_kib, None, n_trials=more),
        stderr_path=run_dir / "child-stale.stderr",
    )
    code = child.wait(CHILD_TIMEOUT_S)
    if code == 3:
        event = child.first("refused")
        message = str(event.get("message")) if event is not None else ""
        if event is None or event.get("kind") != "StudyConflictError" or "diverged" not in message:
            run.failures.append(f"the stale runtime was refused for another reason: {message}")
        run.landed += "; the stale runtime had diverged and was refused"
        return
    returned = child.first("sweep_returned")
    if code != 0 or returned is None:
        run.failures.append(f"the stale runtime failed (exit {code}): {child.stderr_text()[-800:]}")
        return
    if bool(returned.get("restored_from_drive")) != newer_on_drive:
        run.failures.append(
            f"the stale runtime restored_from_drive={returned.get('restored_from_drive')} "
            f"with {drive_count} finished trials on Drive and {stale_count} on its disk"
        )
    drive_check = newest_on_drive(drive, relative, run_dir / "after-stale")
    if drive_check.count != more:
        run.failures.append(f"after the stale runtime Drive holds {drive_check.count} of {more}")


def run_campaign(runs: int, seed: int, quick: bool = False, verbose: bool = True) -> KillSummary:
    """Run ``runs`` kills; print one line per run and the totals."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    results: list[KillRun] = []
    with tempfile.TemporaryDirectory(prefix="sweepsafe-kill-") as tmp:
        root = Path(tmp)
        for index in range(runs):
            run = run_one(index, seed, root, quick)
            results.append(run)
            if verbose:
                print(_describe_run(run), flush=True)
            if not run.ok:
                kept = Path(tempfile.gettempdir()) / f"sweepsafe-kill-failed-{seed}-{index}"
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(root / f"run-{index:03d}", kept, symlinks=True)
                (kept / "failure.txt").write_text(_describe_run(run) + "\n")
                if verbose:
                    print(f"    kept the failed run's files in {kept}", flush=True)
    summary = KillSummary(
        seed=seed, quick=quick, runs=results, duration_s=time.perf_counter() - started
    )
    if verbose:
        print(describe_summary(summary), flush=True)
    return summary


def _describe_run(run: KillRun) -> str:
    lost = "-" if run.lost is None else str(run.lost)
    restore = "-" if run.restore_s is None else f"{run.restore_s:.2f}s"
    flight = f" [{'; '.join(run.in_flight)}]" if run.in_flight else ""
    verdict = "ok" if run.ok else "FAILED: " + " | ".join(run.failures)
    return (
        f"run {run.index:3d}  aimed {run.aimed:<14} landed {run.landed}{flight}\n"
        f"          restart: {run.restart}; "
        f"trials {run.n_trials}, local finished {run.local_finished}, "
        f"Drive finished {run.drive_finished}, lost {lost}, corrupt {run.corrupt}, "
        f"resume {'ok' if run.resumed else 'NO'} (restore {restore})  {verdict}"
    )


def _in_flight_kind(item: str) -> str:
    if item.startswith("local snapshot"):
        return "a local snapshot of study.db"
    if "/trials/" in item:
        return "a Drive copy of a trial file"
    if "/.sweepsafe/" in item:
        return "a Drive copy of a generation or a record of the study"
    return "a Drive copy of study.db"


def describe_summary(summary: KillSummary) -> str:
    lost = summary.lost
    restores = summary.restore_times
    landed = _landed_counts(summary)
    in_flight = sum(1 for run in summary.runs if run.in_flight)
    kinds = Counter(_in_flight_kind(item) for run in summary.runs for item in set(run.in_flight))
    lines = [
        f"kill campaign, seed {summary.seed}{' (quick)' if summary.quick else ''}: "
        f"{len(summary.runs)} kills in {summary.duration_s:.0f} s",
        "  landed: " + ", ".join(f"{name} {count}" for name, count in sorted(landed.items())),
        f"  kills with a copy or snapshot in flight: {in_flight} ("
        + ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items()))
        + ")",
        f"  corrupt copies: {summary.corrupt} (goal 0)",
        f"  trials lost by the kill: max {max(lost, default=0)}, "
        f"mean {statistics.fmean(lost) if lost else 0:.2f}",
        f"  resumes that worked: {summary.resumes_ok} of {len(summary.runs)} (goal all; "
        + ", ".join(
            f"{restart} {count}"
            for restart, count in sorted(Counter(run.restart for run in summary.runs).items())
        )
        + ")",
    ]
    if restores:
        lines.append(
            f"  restore + reopen time: median {statistics.median(restores):.2f} s, "
            f"max {max(restores):.2f} s"
        )
    failures = summary.failures
    lines.append(f"  failed checks: {len(failures)}")
    lines.extend(f"    {failure}" for failure in failures[:20])
    return "\n".join(lines)


def measure(quick: bool = False, runs: int | None = None) -> list[dict[str, Any]]:
    """The campaign's figures as benchmark rows (100 kills, or 8 with ``quick``)."""
    if runs is None:
        runs = 8 if quick else 100
    summary = run_campaign(runs, seed=1, quick=quick, verbose=False)
    return summary_rows(summary)


def _landed_counts(summary: KillSummary) -> Counter[str]:
    return Counter(run.landed.split(" (")[0].split(";")[0] for run in summary.runs)


def summary_rows(summary: KillSummary) -> list[dict[str, Any]]:
    count = len(summary.runs)
    landed = _landed_counts(summary)
    in_flight = sum(1 for run in summary.runs if run.in_flight)
    lost = summary.lost
    restores, references = summary.restore_times, summary.restore_references
    rows: list[dict[str, Any]] = [
        {
            "name": f"kill campaign: SIGKILLs at random moments (seed {summary.seed})",
            "value": count,
            "unit": "kills",
            "reference": None,
            "ratio": None,
            "goal": "100 kills" if not summary.quick else "quick run",
            "met": count >= 100 or (None if summary.quick else False),
        },
        {
            "name": "kill campaign: corrupt Drive copies",
            "value": summary.corrupt,
            "unit": "copies",
            "reference": f"{count} kills",
            "ratio": round(summary.corrupt / count, 3) if count else None,
            "goal": "0",
            "met": summary.corrupt == 0,
        },
        {
            "name": "kill campaign: restarts that resumed and finished the sweep ("
            + ", ".join(
                f"{restart} {number}"
                for restart, number in sorted(Counter(run.restart for run in summary.runs).items())
            )
            + ")",
            "value": summary.resumes_ok,
            "unit": "resumes",
            "reference": f"{count} kills",
            "ratio": round(summary.resumes_ok / count, 3) if count else None,
            "goal": "all",
            "met": summary.resumes_ok == count,
        },
        {
            "name": "kill campaign: where the kills landed",
            "value": ", ".join(f"{phase} {number}" for phase, number in sorted(landed.items())),
            "unit": "",
            "reference": None,
            "ratio": None,
            "goal": "every phase hit",
            "met": len(landed) >= 4 if count >= 8 else None,
        },
        {
            "name": "kill campaign: kills with a copy or snapshot in flight",
            "value": in_flight,
            "unit": "kills",
            "reference": f"{count} kills",
            "ratio": round(in_flight / count, 2) if count else None,
            "goal": "many",
            "met": None,
        },
        {
            "name": "kill campaign: trials lost by a kill, max (mean)",
            "value": f"{max(lost, default=0)} ({statistics.fmean(lost) if lost else 0:.2f})",
            "unit": "trials",
            "reference": None,
            "ratio": None,
            "goal": "bounded by the copies in flight",
            "met": None,
        },
        {
            "name": "kill campaign: failed checks",
            "value": len(summary.failures),
            "unit": "checks",
            "reference": None,
            "ratio": None,
            "goal": "0",
            "met": not summary.failures,
            "note": " | ".join(summary.failures[:5]),
        },
    ]
    if restores and references:
        median, reference = statistics.median(restores), statistics.median(references)
        rows.append(
            {
                "name": "kill campaign: restore + reopen in a new process vs copytree + "
                "load_study (medians)",
                "value": round(median, 3),
                "unit": "s",
                "reference": round(reference, 3),
                "ratio": round(median / reference, 2) if reference else None,
                "goal": "informative: the restore also starts a Drive helper, checks "
                "integrity on both sides and fsyncs every file",
                "met": None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer trials, smaller files")
    args = parser.parse_args(argv)
    summary = run_campaign(args.runs, args.seed, args.quick)
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
