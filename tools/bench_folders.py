"""Benchmark trial-folder backups as training code writes them, each figure beside its
reference measured in the same run.

Rows:

* a checkpoint (200 MB) rewritten at the end of every trial of 1 s and of 3 s, backed
  up after every trial by a folder callback, through a FUSE stand-in for Drive taking
  0.5 s per file: the versions that reached Drive, against one per copy-time (the
  mean time of a copy during the sweep, with the idle machine's beside it), and the
  share of the bytes written to Drive that were thrown away (goal: at most 10%);
* the backup of one new trial folder of 100 files, and of a trial folder with
  nothing new, in a study of 10,000 and of 100,000 backed-up files, against
  ``cp -au`` of the trials folder to a copy of it (goal: at most 0.05 s at 100,000
  files for the resync, and flat in the number of files);
* a 1,000-trial sweep's per-trial backups: folder entries scanned in all, against
  the files written (linear: about 1; a walk of all of trials/ after every trial:
  about half the number of trials), and
  the time of the last 100 backups against the first 100;
* the final flush of an 80-trial sweep (trials of 50 ms, two small files each) with
  Drive at 0.5 s per file, against the sweep's own time in the same run (goal: at
  most 3x), for 4, 8, 16 and 32 files at once; and a folder of 80 small files.

    python tools/bench_folders.py           # full sizes, about 8 minutes
    python tools/bench_folders.py --quick   # 50 MB checkpoint, 20,000 files: about 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from sweepsafe import BackupResult, BackupWorker, DriveStore, run_sweep, study_dir_for, trial_dir
from sweepsafe.backup import create_incremental_backup_callback
from sweepsafe.testing import FaultPlan, FuseDrive, fuse_unavailable_reason, simulated_store

optuna.logging.set_verbosity(optuna.logging.WARNING)

MB = 1_000_000


@dataclass
class Row:
    name: str
    value: float
    unit: str
    reference: float | None
    reference_name: str
    ratio: float | None
    goal: str = ""
    met: bool | None = None


@dataclass
class Scratch:
    """A fresh folder for each measurement, removed afterwards."""

    root: Path
    _count: int = 0

    def new(self, name: str) -> Path:
        self._count += 1
        path = self.root / f"{self._count:02d}-{name}"
        path.mkdir(parents=True)
        return path


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _require(result: BackupResult) -> BackupResult:
    if not result.ok:
        raise SystemExit(f"a backup failed: {result.error}")
    return result


# -- 1. a checkpoint rewritten every trial --------------------------------------------------


class RecordingStore(DriveStore):
    """A DriveStore that notes, when each backup of the checkpoint folder lands, which
    version of the checkpoint reached Drive (read from the Drive copy's first bytes)."""

    checkpoint_on_drive: Path
    landed: list[tuple[float, int, int, float]]  # (time, version, bytes, copy duration)
    failed: int

    async def abackup(self, path: Any, is_directory: bool = False, **options: Any) -> BackupResult:
        started = time.perf_counter()
        result = await super().abackup(path, is_directory, **options)
        now = time.perf_counter()
        if result.ok and result.files_copied:
            with open(self.checkpoint_on_drive, "rb") as file:
                version = int(file.read(8))
            self.landed.append((now, version, result.bytes_copied, now - started))
        elif not result.ok:
            self.failed += 1
        return result


def _checkpoint(version: int, size: int) -> bytes:
    return b"%08d" % version * (size // 8)


def _save_checkpoint(path: Path, version: int, size: int) -> None:
    """Rewrite ``path`` in place, in pieces, as ``torch.save(model, "last.pt")`` does."""
    data = _checkpoint(version, size)
    with open(path, "wb") as file:
        for start in range(0, size, 8 << 20):
            file.write(data[start : start + (8 << 20)])


@contextlib.contextmanager
def _fuse_store(work: Path, plan: FaultPlan) -> Iterator[tuple[RecordingStore, FuseDrive]]:
    plan_path = work / "plan.json"
    plan.write(plan_path)
    with FuseDrive(work / "backing", work / "mount", plan_path) as fuse:
        store = RecordingStore(work / "local", fuse.mount_point / "sweeps", drive_timeout=120)
        try:
            yield store, fuse
        finally:
            store.close()


def measure_checkpoint(scratch: Scratch, size: int, trial_s: float, trials: int) -> list[Row]:
    reason = fuse_unavailable_reason()
    if reason is not None:
        print(f"skipped the checkpoint rows: {reason}")
        return []
    work = scratch.new(f"checkpoint-{trial_s:g}s")
    (work / "local").mkdir()
    folder = work / "local" / "study-ckpt" / "checkpoints"
    folder.mkdir(parents=True)
    checkpoint = folder / "last.pt"
    with _fuse_store(work, FaultPlan(latency_s=0.5)) as (store, fuse):
        store.checkpoint_on_drive = work / "backing" / "sweeps" / "study-ckpt" / "checkpoints"
        store.checkpoint_on_drive /= "last.pt"
        store.landed = []
        store.failed = 0
        # The reference: one copy of a new version left alone, once the study's copy
        # on Drive exists (its first backup also writes its identity and lease).
        _save_checkpoint(checkpoint, 0, size)
        _require(store.backup(folder, is_directory=True))
        _save_checkpoint(checkpoint, 99_999_999, size)
        started = time.perf_counter()
        _require(store.backup(folder, is_directory=True))
        copy_s = time.perf_counter() - started
        store.landed.clear()
        written_before = int(fuse.stats()["bytes_written"])

        worker = BackupWorker()
        callback = create_incremental_backup_callback(
            folder, store, is_directory=True, worker=worker
        )

        saving = [0.0]

        def objective(trial: optuna.Trial) -> float:
            # Train, then save the checkpoint at the end of the trial.
            time.sleep(max(0.0, trial_s - saving[0]))
            began = time.perf_counter()
            _save_checkpoint(checkpoint, trial.number + 1, size)
            saving[0] = time.perf_counter() - began
            return trial.suggest_float("x", 0, 1)

        study = optuna.create_study()
        started = time.perf_counter()
        study.optimize(objective, n_trials=trials, callbacks=[callback])
        sweep_end = time.perf_counter()
        sweep_s = sweep_end - started
        flush = worker.flush(600)
        worker.close(timeout=5)
        if not flush.ok:
            raise SystemExit(f"the checkpoint backups failed: {flush}")
        written = int(fuse.stats()["bytes_written"]) - written_before
    during = [entry for entry in store.landed if entry[0] <= sweep_end]
    landed = {entry[1] for entry in store.landed}
    landed_bytes = sum(entry[2] for entry in store.landed)
    # A copy during the sweep shares the machine with training; its copy-time is the
    # mean of the copies made then. At most one version per trial, and one per
    # copy-time from the end of the first trial (nothing to copy before); the last one
    # written lands in the final flush.
    # Copies that began before the sweep ended: the final flush's copy runs on an idle
    # machine, after the sweep, and is not one of them.
    in_sweep = [entry for entry in store.landed if entry[0] - entry[3] < sweep_end]
    in_sweep = in_sweep or store.landed
    copy_in_sweep_s = sum(entry[3] for entry in in_sweep) / max(1, len(in_sweep))
    possible = min(trials, 1 + (sweep_s - trial_s) / copy_in_sweep_s)
    per_copy_time = len(landed) / possible
    discarded = max(0.0, 1 - landed_bytes / written) if written else 0.0
    label = f"{size / MB:.0f} MB checkpoint, {trials} trials of {trial_s:g} s"
    return [
        Row(
            f"{label}: versions that reached Drive ({len(during)} during the sweep, the last "
            f"after it; {store.failed} failed backups)",
            len(landed),
            "versions",
            possible,
            f"min(trials, 1 + (sweep {sweep_s:.1f} s - 1 trial) / copy-time "
            f"{copy_in_sweep_s:.1f} s; {copy_s:.1f} s with the machine idle)",
            per_copy_time,
            ">= 1 per copy-time",
            per_copy_time >= 1.0,
        ),
        Row(
            f"{label}: bytes written to Drive and thrown away",
            discarded * 100,
            "%",
            written / MB,
            "MB written to Drive",
            None,
            "<= 10%",
            discarded <= 0.10,
        ),
    ]


# -- 2. resync after one new trial folder ----------------------------------------------------


def _make_trials(trials: Path, folders: int, per_folder: int) -> None:
    for number in range(folders):
        folder = trials / f"trial-{number:05d}"
        folder.mkdir(parents=True)
        for index in range(per_folder):
            (folder / f"f{index:03d}.json").write_bytes(b'{"step": %d}' % index)


def measure_resync(scratch: Scratch, sizes: tuple[int, ...]) -> list[Row]:
    rows: list[Row] = []
    per_folder = 100
    new_trial_s: dict[int, float] = {}
    resync_s: dict[int, float] = {}
    for files in sizes:
        work = scratch.new(f"resync-{files}")
        trials = work / "local" / "study-big" / "trials"
        _make_trials(trials, files // per_folder, per_folder)
        store = simulated_store(work / "local", work / "drive", FaultPlan(), file_concurrency=16)
        with store:
            started = time.perf_counter()
            _require(store.backup(trials, is_directory=True))
            first_s = time.perf_counter() - started
            mirror = work / "cp-copy"
            subprocess.run(["cp", "-a", str(trials), str(mirror)], check=True)
            # Not yet backed up: its folder alone is scanned and copied.
            new = trials / "trial-new"
            new.mkdir()
            for index in range(per_folder):
                (new / f"f{index:03d}.json").write_bytes(b"{}")
            started = time.perf_counter()
            _require(store.backup(new, is_directory=True))
            new_trial_s[files] = time.perf_counter() - started
            started = time.perf_counter()
            subprocess.run(["cp", "-au", f"{trials}/.", str(mirror)], check=True)
            cp_new_s = time.perf_counter() - started
            started = time.perf_counter()
            _require(store.backup(new, is_directory=True))
            resync_s[files] = time.perf_counter() - started
            started = time.perf_counter()
            subprocess.run(["cp", "-au", f"{trials}/.", str(mirror)], check=True)
            cp_same_s = time.perf_counter() - started
        rows += [
            Row(
                f"first backup of {files:,} files (16 at once)",
                first_s,
                "s",
                None,
                "",
                None,
            ),
            Row(
                f"new trial folder of {per_folder} files, {files:,} files backed up",
                new_trial_s[files],
                "s",
                cp_new_s,
                "cp -au of trials/ (copies the new folder)",
                _ratio(new_trial_s[files], cp_new_s),
            ),
            Row(
                f"resync of that trial folder, nothing new, {files:,} files",
                resync_s[files],
                "s",
                cp_same_s,
                "cp -au of trials/, nothing new",
                _ratio(resync_s[files], cp_same_s),
                "<= 0.05 s",
                resync_s[files] <= 0.05,
            ),
        ]
        shutil.rmtree(work, ignore_errors=True)
    if len(sizes) > 1:
        small, big = sizes[0], sizes[-1]
        for name, times in (("new trial folder", new_trial_s), ("resync", resync_s)):
            ratio = times[big] / times[small]
            rows.append(
                Row(
                    f"{name}: time at {big:,} files / at {small:,} files",
                    ratio,
                    "x",
                    big / small,
                    "files ratio",
                    None,
                    "flat (about 1)",
                    ratio <= 2.0,
                )
            )
    return rows


# -- 3. scan work over a 1,000-trial sweep ---------------------------------------------------


@contextlib.contextmanager
def _counting_scans(under: Path) -> Iterator[dict[str, int]]:
    """Count the folder entries ``os.scandir`` yields below ``under`` meanwhile."""
    counts = {"entries": 0, "folders": 0}
    real = os.scandir

    class Counted:
        def __init__(self, path: Any) -> None:
            self._it = real(path)

        def __enter__(self) -> Counted:
            return self

        def __exit__(self, *exc: object) -> None:
            self._it.close()

        def __iter__(self) -> Iterator[os.DirEntry[str]]:
            for entry in self._it:
                counts["entries"] += 1
                yield entry

    def counting(path: Any = ".") -> Any:
        if Path(os.fsdecode(path)).is_relative_to(under):
            counts["folders"] += 1
            return Counted(path)
        return real(path)

    os.scandir = counting
    try:
        yield counts
    finally:
        os.scandir = real


def measure_sweep_scans(scratch: Scratch, trials: int, files_per_trial: int) -> list[Row]:
    work = scratch.new("scans")
    study = work / "local" / "study-long"
    times: list[float] = []

    def folder_of(number: int) -> Path:
        return study / "trials" / f"trial-{number:05d}"

    with (
        simulated_store(work / "local", work / "drive", FaultPlan()) as store,
        _counting_scans(study / "trials") as counts,
    ):
        for number in range(trials):
            folder = folder_of(number)
            for index in range(files_per_trial):
                _write(folder / f"out-{index}.txt", b"%d" % number)
            started = time.perf_counter()
            _require(store.backup(folder, is_directory=True))
            times.append(time.perf_counter() - started)
        per_trial_entries = counts["entries"]
        started = time.perf_counter()
        _require(store.backup(folder_of(trials - 1), is_directory=True))
        resync_s = time.perf_counter() - started
        started = time.perf_counter()
        _require(store.backup(study / "trials", is_directory=True))
        walk_s = time.perf_counter() - started
    written = trials * files_per_trial
    first, last = sum(times[:100]) / 100, sum(times[-100:]) / 100
    # Walking all of trials/ after every trial would scan every folder and file so far.
    walked = sum(n * (files_per_trial + 1) for n in range(1, trials + 1))
    return [
        Row(
            f"{trials}-trial sweep: folder entries scanned by per-trial backups",
            per_trial_entries,
            "entries",
            written,
            "files written",
            per_trial_entries / written,
            "linear (about 1)",
            per_trial_entries / written <= 1.5,
        ),
        Row(
            f"{trials}-trial sweep: entries a walk of trials/ per trial would scan",
            walked,
            "entries",
            written,
            "files written",
            walked / written,
        ),
        Row(
            f"{trials}-trial sweep: mean per-trial backup, last 100 / first 100",
            last,
            "s",
            first,
            "first 100",
            last / first,
            "flat (about 1)",
            last / first <= 2.0,
        ),
        Row(
            f"{trials}-trial sweep: a walk of all of trials/, nothing new",
            walk_s,
            "s",
            resync_s,
            "a per-trial backup, nothing new",
            _ratio(walk_s, resync_s),
        ),
    ]


# -- 4. final flush of many small files ------------------------------------------------------


@dataclass
class _SweepTimes:
    sweep_s: float
    flush_s: float
    files_on_drive: int
    ok: bool
    notes: list[str] = field(default_factory=list)


def _small_file_sweep(work: Path, trials: int, concurrency: int | None) -> _SweepTimes:
    output = work / "local"
    study_dir = study_dir_for(output, "flush")
    ended: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        folder = trial_dir(study_dir, trial)
        (folder / "metrics.json").write_text(f'{{"loss": {trial.number}}}')
        (folder / "log.txt").write_text(f"trial {trial.number}\n")
        time.sleep(0.05)
        return trial.suggest_float("x", 0, 1)

    def note_end(study: object, trial: object) -> None:
        ended.append(time.perf_counter())

    if concurrency is None:
        started = time.perf_counter()
        run_sweep(objective, output_dir=output, study_key="flush", n_trials=trials)
        return _SweepTimes(time.perf_counter() - started, 0.0, 0, True)
    worker = BackupWorker()
    with simulated_store(
        output, work / "drive", FaultPlan(latency_s=0.5), file_concurrency=concurrency
    ) as store:
        started = time.perf_counter()
        result = run_sweep(
            objective,
            output_dir=output,
            study_key="flush",
            n_trials=trials,
            backup_to_drive=store,
            worker=worker,
            callbacks=[note_end],
        )
        ended_all = time.perf_counter()
        worker.close(timeout=5)
    report = result.backup_report
    on_drive = len(list((work / "drive").rglob("trial-*/*.*")))
    return _SweepTimes(
        ended[-1] - started,
        ended_all - ended[-1],
        on_drive,
        report is not None and report.ok,
    )


def measure_final_flush(
    scratch: Scratch, trials: int, concurrencies: tuple[int, ...]
) -> tuple[list[Row], dict[int, float]]:
    rows: list[Row] = []
    bare = _small_file_sweep(scratch.new("flush-no-backup"), trials, None)
    ratios: dict[int, float] = {}
    for concurrency in concurrencies:
        times = _small_file_sweep(scratch.new(f"flush-{concurrency}"), trials, concurrency)
        if not times.ok or times.files_on_drive != 2 * trials:
            raise SystemExit(f"the sweep's backup is incomplete ({times})")
        ratios[concurrency] = times.flush_s / times.sweep_s
        rows.append(
            Row(
                f"final flush, {trials} trials x 2 small files, Drive 0.5 s/file, "
                f"{concurrency} at once",
                times.flush_s,
                "s",
                times.sweep_s,
                f"the sweep itself (without backups: {bare.sweep_s:.1f} s)",
                ratios[concurrency],
                "<= 3x",
                ratios[concurrency] <= 3,
            )
        )
    return rows, ratios


def measure_small_folder(scratch: Scratch, files: int, concurrencies: tuple[int, ...]) -> list[Row]:
    rows: list[Row] = []
    serial = files * 0.5
    for concurrency in concurrencies:
        work = scratch.new(f"small-folder-{concurrency}")
        folder = work / "local" / "study-small" / "trials" / "trial-00000"
        for index in range(files):
            _write(folder / f"plot-{index:03d}.json", b"{}")
        plan = work / "plan.json"
        FaultPlan().write(plan)
        with simulated_store(
            work / "local", work / "drive", plan, file_concurrency=concurrency
        ) as store:
            # Start the helper processes first, as the backups of a running sweep have.
            warm = work / "local" / "study-small" / "warm"
            for index in range(concurrency):
                _write(warm / f"{index}.txt", b"warm")
            _require(store.backup(warm, is_directory=True))
            FaultPlan(latency_s=0.5).write(plan)
            started = time.perf_counter()
            _require(store.backup(folder, is_directory=True))
            elapsed = time.perf_counter() - started
        rows.append(
            Row(
                f"folder of {files} small files, Drive 0.5 s/file, {concurrency} at once",
                elapsed,
                "s",
                serial,
                "0.5 s x files (one at a time)",
                _ratio(elapsed, serial),
            )
        )
    return rows


# -- the table -------------------------------------------------------------------------------


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def print_table(rows: list[Row]) -> None:
    print("| figure | value | reference | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        reference = ""
        if row.reference is not None:
            reference = f"{_cell(row.reference)} ({row.reference_name})"
        elif row.reference_name:
            reference = row.reference_name
        met = "" if row.met is None else ("yes" if row.met else "no")
        print(
            f"| {row.name} | {_cell(row.value)} {row.unit} | {reference} | "
            f"{_cell(row.ratio)} | {row.goal} | {met} |"
        )


def measure_rows(quick: bool) -> list[Row]:
    concurrencies = (4, 8, 16, 32)
    steps: list[tuple[str, Callable[[Scratch], list[Row]]]] = [
        (
            "checkpoint, 1 s trials",
            lambda s: measure_checkpoint(s, (50 if quick else 200) * MB, 1.0, 8),
        ),
        (
            "checkpoint, 3 s trials",
            lambda s: measure_checkpoint(s, (50 if quick else 200) * MB, 3.0, 4),
        ),
        ("resync", lambda s: measure_resync(s, (2_000, 20_000) if quick else (10_000, 100_000))),
        ("sweep scans", lambda s: measure_sweep_scans(s, 300 if quick else 1_000, 3)),
        ("small folder", lambda s: measure_small_folder(s, 80, concurrencies)),
    ]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sweepsafe-bench-folders-") as root:
        scratch = Scratch(Path(root))
        for name, step in steps:
            started = time.perf_counter()
            rows += step(scratch)
            print(f"measured {name} in {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        flush_rows, ratios = measure_final_flush(scratch, 80, concurrencies)
        rows += flush_rows
        print(f"measured final flush in {time.perf_counter() - started:.0f} s", flush=True)
    best = min(ratios, key=lambda concurrency: ratios[concurrency])
    print(f"lowest final-flush ratio: {best} files at once ({ratios[best]:.2f}x)")
    return rows


def measure(quick: bool = False) -> list[dict[str, object]]:
    """The rows of ``tools/bench.py`` (the reference's name goes into the row's name)."""
    return [
        {
            "name": f"{row.name} (ref: {row.reference_name})" if row.reference_name else row.name,
            "value": row.value,
            "unit": row.unit,
            "reference": row.reference,
            "ratio": row.ratio,
            "goal": row.goal,
            "met": row.met,
        }
        for row in measure_rows(quick)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about a minute")
    args = parser.parse_args()
    rows = measure_rows(args.quick)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
