"""``sweepsafe status`` and ``sweepsafe verify``: read Optuna databases without changing them.

Every database is opened read-only (SQLite URI ``mode=ro``), so pointing these commands
at a live sweep or at its Drive copy never modifies either.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

from sweepsafe.cli._errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNSOUND, CommandError

__all__ = [
    "DatabaseReport",
    "StudySummary",
    "find_databases",
    "inspect_database",
    "print_status",
    "print_verification",
]

STUDY_DB_NAME = "study.db"
_SQLITE_HEADER = b"SQLite format 3\x00"
_STATE_COLUMNS = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
_NO_COUNTS: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True)
class StudySummary:
    """One Optuna study inside a database."""

    name: str
    directions: tuple[str, ...]
    """``"minimize"`` or ``"maximize"`` per objective."""
    trial_counts: Mapping[str, int]
    """Trial state name (``"COMPLETE"``, ...) -> count."""
    best_value: float | None
    """Best objective value of the COMPLETE trials; None for several objectives or none."""


@dataclass(frozen=True)
class DatabaseReport:
    """What one ``study.db`` holds and whether it is sound."""

    path: Path
    exists: bool
    size: int | None = None
    mtime: float | None = None
    """Seconds since the epoch: for a Drive copy, the time of its last backup."""
    is_sqlite: bool = False
    integrity_ok: bool = False
    studies: tuple[StudySummary, ...] = ()
    error: str | None = None
    """Why the database is not sound, in one sentence."""

    @property
    def sound(self) -> bool:
        """It is an SQLite database that passed ``PRAGMA integrity_check``."""
        return self.exists and self.is_sqlite and self.integrity_ok and self.error is None

    @property
    def trial_counts(self) -> Mapping[str, int]:
        """Trials per state, over every study in the database."""
        totals: dict[str, int] = {}
        for study in self.studies:
            for state, count in study.trial_counts.items():
                totals[state] = totals.get(state, 0) + count
        return MappingProxyType(totals) if totals else _NO_COUNTS

    @property
    def check(self) -> str:
        """A word for the table: ``ok``, ``CORRUPT``, ``NOT-SQLITE`` or ``MISSING``."""
        if not self.exists:
            return "MISSING"
        if not self.is_sqlite:
            return "NOT-SQLITE"
        return "ok" if self.sound else "CORRUPT"

    def as_json(self) -> dict[str, Any]:
        """A JSON-able dict of everything in the report."""
        return {
            "path": str(self.path),
            "exists": self.exists,
            "size": self.size,
            "mtime": self.mtime,
            "modified": _iso_time(self.mtime),
            "is_sqlite": self.is_sqlite,
            "integrity_ok": self.integrity_ok,
            "sound": self.sound,
            "check": self.check,
            "trial_counts": dict(self.trial_counts),
            "studies": [
                {
                    "name": study.name,
                    "directions": list(study.directions),
                    "trial_counts": dict(study.trial_counts),
                    "best_value": study.best_value,
                }
                for study in self.studies
            ],
            "error": self.error,
        }


def inspect_database(path: str | os.PathLike[str]) -> DatabaseReport:
    """Check one database read-only: header, ``PRAGMA integrity_check``, Optuna trials."""
    database = Path(os.path.abspath(path))
    try:
        info = database.stat()
        with database.open("rb") as file:
            header = file.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return DatabaseReport(path=database, exists=False, error=f"{database} does not exist")
    except IsADirectoryError:
        return DatabaseReport(
            path=database, exists=True, error=f"{database} is a folder, not a database"
        )
    except OSError as exc:
        return DatabaseReport(
            path=database, exists=True, error=f"{database} cannot be read: {exc.strerror or exc}"
        )
    size, mtime = info.st_size, info.st_mtime
    if header != _SQLITE_HEADER:
        return DatabaseReport(
            path=database,
            exists=True,
            size=size,
            mtime=mtime,
            error=f"{database} is not an SQLite database (it does not start with the "
            "SQLite header)",
        )
    try:
        with closing(_connect_read_only(database)) as connection:
            problems = [row[0] for row in connection.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                return DatabaseReport(
                    path=database,
                    exists=True,
                    size=size,
                    mtime=mtime,
                    is_sqlite=True,
                    error=f"{database} failed PRAGMA integrity_check: {problems[0]}"
                    + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""),
                )
            studies = _read_studies(connection)
    except sqlite3.Error as exc:
        return DatabaseReport(
            path=database,
            exists=True,
            size=size,
            mtime=mtime,
            is_sqlite=True,
            error=f"{database} is corrupt or unreadable: {exc}",
        )
    return DatabaseReport(
        path=database,
        exists=True,
        size=size,
        mtime=mtime,
        is_sqlite=True,
        integrity_ok=True,
        studies=studies,
    )


def _connect_read_only(database: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)


def _read_studies(connection: sqlite3.Connection) -> tuple[StudySummary, ...]:
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    if not {"studies", "trials", "study_directions", "trial_values"} <= tables:
        return ()
    studies: list[StudySummary] = []
    for study_id, name in connection.execute(
        "SELECT study_id, study_name FROM studies ORDER BY study_id"
    ).fetchall():
        directions = tuple(
            str(direction).lower()
            for (direction,) in connection.execute(
                "SELECT direction FROM study_directions WHERE study_id = ? ORDER BY objective",
                (study_id,),
            )
        )
        counts = {
            str(state): int(count)
            for state, count in connection.execute(
                "SELECT state, COUNT(*) FROM trials WHERE study_id = ? GROUP BY state",
                (study_id,),
            )
        }
        best: float | None = None
        if len(directions) == 1 and directions[0] in ("minimize", "maximize"):
            aggregate = "MIN" if directions[0] == "minimize" else "MAX"
            (value,) = connection.execute(
                f"SELECT {aggregate}(v.value) FROM trial_values AS v "
                "JOIN trials AS t ON v.trial_id = t.trial_id "
                "WHERE t.study_id = ? AND t.state = 'COMPLETE' AND v.objective = 0",
                (study_id,),
            ).fetchone()
            best = None if value is None else float(value)
        studies.append(StudySummary(str(name), directions, MappingProxyType(counts), best))
    return tuple(studies)


def find_databases(root: str | os.PathLike[str]) -> list[Path]:
    """The databases ``status`` reports for ``root``: a file, or study folders under it.

    Raises:
        CommandError: ``root`` does not exist, or holds no study folder.
    """
    base = Path(os.path.abspath(root))
    if not os.path.lexists(base):
        raise CommandError(f"{base} does not exist")
    if not base.is_dir():
        return [base]
    found = [base / STUDY_DB_NAME] if (base / STUDY_DB_NAME).exists() else []
    found.extend(sorted(path / STUDY_DB_NAME for path in base.glob("study-*") if path.is_dir()))
    found = [path for path in found if os.path.lexists(path)]
    if not found:
        raise CommandError(
            f"no study folder (study-*/{STUDY_DB_NAME}) and no {STUDY_DB_NAME} in {base}; "
            "give the --output-dir of a sweep or its Drive folder",
            EXIT_UNSOUND,
        )
    return found


def print_status(root: str, *, as_json: bool, out: TextIO) -> int:
    """Print every database under ``root`` as a table (or JSON); 1 if any is unsound."""
    base = Path(os.path.abspath(root))
    reports = [inspect_database(path) for path in find_databases(base)]
    if as_json:
        json.dump({"root": str(base), "databases": [r.as_json() for r in reports]}, out, indent=2)
        out.write("\n")
    else:
        out.write(_status_table(base, reports))
        for report in reports:
            if report.error is not None:
                out.write(f"{report.error}\n")
    return EXIT_OK if all(report.sound for report in reports) else EXIT_UNSOUND


def _status_table(base: Path, reports: Sequence[DatabaseReport]) -> str:
    header = ("STUDY", "NAME", *_STATE_COLUMNS, "BEST", "SIZE", "MODIFIED (UTC)", "CHECK")
    rows: list[tuple[str, ...]] = [header]
    for report in reports:
        counts = report.trial_counts
        names = ",".join(study.name for study in report.studies) or "-"
        best_values = [s.best_value for s in report.studies if s.best_value is not None]
        best = f"{best_values[0]:.6g}" if len(report.studies) == 1 and best_values else "-"
        rows.append(
            (
                _display_name(base, report.path),
                names,
                *(str(counts.get(state, 0)) if report.sound else "-" for state in _STATE_COLUMNS),
                best,
                _human_size(report.size),
                _iso_time(report.mtime) or "-",
                report.check,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {2, 3, 4, 5, 6, 7}
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in numeric and row is not header else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def print_verification(path: str, *, as_json: bool, out: TextIO) -> int:
    """Check one database (or the ``study.db`` of a study folder); 0 if sound, else 1.

    Raises:
        CommandError: the path does not exist (status 2), or the database is not sound
            (status 1, after the JSON when ``as_json``).
    """
    target = Path(os.path.abspath(path))
    if target.is_dir() and (target / STUDY_DB_NAME).exists():
        target = target / STUDY_DB_NAME
    report = inspect_database(target)
    if not report.exists:
        raise CommandError(f"{target} does not exist", EXIT_BAD_INPUT)
    if as_json:
        json.dump(report.as_json(), out, indent=2)
        out.write("\n")
    if not report.sound:
        raise CommandError(report.error or f"{target} is not sound", EXIT_UNSOUND)
    if not as_json:
        out.write(_describe_sound(report))
    return EXIT_OK


def _describe_sound(report: DatabaseReport) -> str:
    lines = [
        f"{report.path}: sound (integrity check ok), {_human_size(report.size)}, "
        f"modified {_iso_time(report.mtime)} UTC"
    ]
    if not report.studies:
        lines.append("  no Optuna study in it")
    for study in report.studies:
        total = sum(study.trial_counts.values())
        counts = ", ".join(f"{n} {state}" for state, n in sorted(study.trial_counts.items()))
        line = f"  study {study.name!r}: {total} trials" + (f" ({counts})" if counts else "")
        if study.best_value is not None:
            line += f", best value {study.best_value:.6g} ({study.directions[0]})"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _display_name(base: Path, path: Path) -> str:
    try:
        relative = path.relative_to(base)
    except ValueError:
        return str(path)
    if relative == Path():
        return path.name
    parent = relative.parent
    return str(parent) if parent != Path() else str(relative)


def _human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _iso_time(mtime: float | None) -> str | None:
    if mtime is None:
        return None
    return datetime.fromtimestamp(mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
