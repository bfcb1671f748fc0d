"""What the campaigns check, using only sqlite3, Optuna and hashlib (never sweepsafe).

A check that used sweepsafe's own verification could share its bugs; these read the
files the way a user on a new runtime would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

# How the store names the temporary file of a copy in flight: ".{name}.sweepsafe-tmp-*".
TEMP_MARKER = ".sweepsafe-tmp"


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial as Optuna reads it: enough to compare two copies of a study."""

    number: int
    state: str
    params: tuple[tuple[str, Any], ...]
    values: tuple[float, ...] | None


@dataclass(frozen=True)
class DatabaseCheck:
    """One SQLite file as sqlite3 and Optuna see it."""

    path: Path
    exists: bool
    integrity: str | None = None
    """``PRAGMA integrity_check``'s answer ("ok" when sound)."""
    load_error: str | None = None
    """Why Optuna could not load the study, if it could not."""
    finished: tuple[TrialRecord, ...] = ()
    """COMPLETE trials in trial-number order."""
    states: tuple[tuple[str, int], ...] = ()
    studies: int = 0
    """Studies in the file: 0 when a process died inside ``create_study``."""

    @property
    def sound(self) -> bool:
        """Sound and holding one study (what a Drive copy must be)."""
        return self.readable and self.studies == 1

    @property
    def readable(self) -> bool:
        """Passes the integrity check and Optuna reads it (it may hold no study yet)."""
        return self.exists and self.integrity == "ok" and self.load_error is None

    @property
    def count(self) -> int:
        return len(self.finished)


def integrity_of(database: Path, *, read_only: bool = True) -> str:
    """``PRAGMA integrity_check`` of ``database`` (opened read-only unless told)."""
    mode = "ro" if read_only else "rw"
    connection = sqlite3.connect(f"file:{database}?mode={mode}", uri=True)
    try:
        rows = connection.execute("PRAGMA integrity_check").fetchall()
        return "; ".join(str(row[0]) for row in rows)
    finally:
        connection.close()


def check_database(database: Path, *, include_sidecars: bool = False) -> DatabaseCheck:
    """Integrity-check ``database`` in place, then load a scratch copy of it with Optuna.

    Optuna gets a copy because opening a database for writing may change it (roll back
    a hot journal). ``include_sidecars`` copies ``-journal``/``-wal`` too: use it for the
    local database of a killed process, never for a Drive copy (which must stand alone).
    """
    if not database.is_file():
        return DatabaseCheck(path=database, exists=False)
    with tempfile.TemporaryDirectory(prefix="campaign-check-") as scratch:
        copy = Path(scratch) / "study.db"
        shutil.copyfile(database, copy)
        if include_sidecars:
            for suffix in ("-journal", "-wal"):
                sidecar = database.with_name(database.name + suffix)
                if sidecar.is_file():
                    shutil.copyfile(sidecar, copy.with_name(copy.name + suffix))
        try:
            # A killed writer's hot journal must be rolled back, which needs write access.
            integrity = (
                integrity_of(copy, read_only=False) if include_sidecars else integrity_of(database)
            )
        except sqlite3.Error as exc:
            return DatabaseCheck(path=database, exists=True, integrity=f"unreadable: {exc}")
        try:
            studies, finished, states = _load_with_optuna(copy)
        except Exception as exc:
            return DatabaseCheck(
                path=database, exists=True, integrity=integrity, load_error=repr(exc)
            )
    return DatabaseCheck(
        path=database,
        exists=True,
        integrity=integrity,
        finished=finished,
        states=states,
        studies=studies,
    )


def _load_with_optuna(
    database: Path,
) -> tuple[int, tuple[TrialRecord, ...], tuple[tuple[str, int], ...]]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{database}")
    try:
        summaries = optuna.get_all_study_summaries(storage)
        if len(summaries) != 1:
            return len(summaries), (), ()
        study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
        finished = tuple(
            TrialRecord(
                number=trial.number,
                state=trial.state.name,
                params=tuple(sorted(trial.params.items())),
                values=tuple(trial.values) if trial.values is not None else None,
            )
            for trial in sorted(trials, key=lambda trial: trial.number)
            if trial.state == TrialState.COMPLETE
        )
        return 1, finished, tuple(sorted(counts.items()))
    finally:
        storage.engine.dispose()


def is_prefix(shorter: Iterable[TrialRecord], longer: Iterable[TrialRecord]) -> bool:
    """True when ``shorter`` is exactly the first trials of ``longer``."""
    head, full = list(shorter), list(longer)
    return len(head) <= len(full) and full[: len(head)] == head


def is_kept_in(earlier: Iterable[TrialRecord], later: Iterable[TrialRecord], n_jobs: int) -> bool:
    """True when ``later`` holds every trial of ``earlier``, unchanged.

    With one job the trials finish in number order, so ``earlier`` must be a prefix;
    with several they finish in any order, so it must be a subset.
    """
    if n_jobs == 1:
        return is_prefix(earlier, later)
    return set(earlier) <= set(later)


def temp_files(root: Path) -> list[Path]:
    """Temporary files of copies in flight left under ``root``."""
    if not root.exists():
        return []
    return sorted(path for path in root.rglob("*") if TEMP_MARKER in path.name)


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` that is not a dot-file, by relative path.

    Dot-files are the store's own (temporary copies, manifests); the objective writes none.
    """
    if not root.exists():
        return {}
    hashes: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        hashes[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def hidden_files(root: Path) -> list[Path]:
    """Dot-files under ``root`` that are not temporary copies (manifests and such)."""
    if not root.exists():
        return []
    return sorted(
        path for path in root.rglob(".*") if path.is_file() and TEMP_MARKER not in path.name
    )


def read_versions(log: Path) -> dict[str, set[str]]:
    """Every version (SHA-256) each file ever had, from the child's versions log."""
    versions: dict[str, set[str]] = {}
    if not log.exists():
        return versions
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the last line of a killed writer may be cut short
        versions.setdefault(entry["path"], set()).add(entry["sha256"])
    return versions


def newest_on_drive(drive_root: Path, study_rel: Path, scratch: Path) -> DatabaseCheck:
    """The study a new runtime would get from Drive: its newest generation, rebuilt.

    Uses sweepsafe's public restore in a store of its own (a fresh local folder), as a
    user on a new runtime would, then checks the result with sqlite3 and Optuna.
    """
    from sweepsafe import DriveStore

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    target = scratch / study_rel / "study.db"
    with DriveStore(scratch, drive_root, drive_timeout=30.0) as store:
        result = store.restore(target)
    if not result.ok:
        return DatabaseCheck(path=target, exists=False, load_error=result.error)
    return check_database(target)


def drive_finished_count(drive_root: Path, study_rel: Path) -> int | None:
    """Finished trials in the newest generation on Drive, from its header (None if none)."""
    from sweepsafe import DriveStore

    with DriveStore(drive_root.parent / ".campaign-observer", drive_root) as store:
        generations = store.history(drive_root / study_rel / "study.db")
    return generations[0].finished_trials if generations else None


def trials_without_files(
    finished: Iterable[TrialRecord], drive_study: Path, names: Iterable[str]
) -> list[int]:
    """Finished trials whose folder on Drive lacks one of the files ``names``."""
    wanted = tuple(names)
    return [
        record.number
        for record in finished
        if not all(
            (drive_study / "trials" / f"trial-{record.number:05d}" / name).is_file()
            for name in wanted
        )
    ]
