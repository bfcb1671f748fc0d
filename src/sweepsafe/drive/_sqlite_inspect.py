"""Reading SQLite and Optuna databases without ever changing them.

The store reads its local databases this way, and the Drive helper process reads Drive
copies the same way in its own process. Standard library only: the helper, run by file
path, imports this module from its own folder.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from typing import Any

__all__ = [
    "FINISHED_STATES",
    "SQLITE_HEADER",
    "connect_read_only",
    "finished_count",
    "finished_not_in",
    "finished_trials",
    "inspect_sqlite",
    "inspect_sqlite_rolled_back",
    "integrity_problem",
    "is_optuna_schema",
    "is_sqlite_file",
    "read_studies",
]

SQLITE_HEADER = b"SQLite format 3\x00"
FINISHED_STATES = ("COMPLETE", "PRUNED")
"""Optuna trial states that count as finished."""


def is_sqlite_file(path: str) -> bool:
    """True when the file starts with the SQLite header (whatever its name)."""
    try:
        with open(path, "rb") as file:
            return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except (IsADirectoryError, PermissionError):
        return False


def connect_read_only(path: str, timeout: float = 30.0) -> sqlite3.Connection:
    """A read-only connection that never creates or changes the file."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)


def integrity_problem(connection: sqlite3.Connection, *, quick: bool = False) -> str | None:
    """None when ``PRAGMA integrity_check`` (or ``quick_check``) says ok, else what it found."""
    pragma = "quick_check" if quick else "integrity_check"
    rows = [str(row[0]) for row in connection.execute(f"PRAGMA {pragma}").fetchall()]
    if rows == ["ok"]:
        return None
    more = f" (and {len(rows) - 1} more problems)" if len(rows) > 1 else ""
    return f"PRAGMA {pragma} found: {rows[0] if rows else 'no answer'}{more}"


def is_optuna_schema(connection: sqlite3.Connection) -> bool:
    """The database has Optuna's core tables."""
    tables = {
        str(row[0])
        for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    return {"studies", "trials", "study_directions", "trial_values"} <= tables


def read_studies(connection: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every Optuna study: name, directions, trial counts by state, best value."""
    studies: list[dict[str, Any]] = []
    for study_id, name in connection.execute(
        "SELECT study_id, study_name FROM studies ORDER BY study_id"
    ).fetchall():
        directions = [
            str(direction).lower()
            for (direction,) in connection.execute(
                "SELECT direction FROM study_directions WHERE study_id = ? ORDER BY objective",
                (study_id,),
            )
        ]
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
        studies.append(
            {"name": str(name), "directions": directions, "trial_counts": counts, "best": best}
        )
    return studies


_FINISHED_SELECT = (
    "SELECT s.study_name, t.number, COALESCE(t.datetime_start, '') FROM {db}.trials AS t "
    "JOIN {db}.studies AS s ON s.study_id = t.study_id WHERE t.state IN (?, ?)"
)


def finished_trials(connection: sqlite3.Connection) -> set[tuple[str, int, str]]:
    """(study name, trial number, start time) of every finished trial."""
    rows = connection.execute(_FINISHED_SELECT.format(db="main"), FINISHED_STATES).fetchall()
    return {(str(name), int(number), str(start)) for name, number, start in rows}


def finished_not_in(
    connection: sqlite3.Connection, schema: str, other: str
) -> set[tuple[str, int, str]]:
    """The finished trials of database ``schema`` that database ``other`` lacks, as
    :func:`finished_trials` names them; both are attached to ``connection``.

    SQLite compares the two, so only the trials that differ become Python objects.
    """
    rows = connection.execute(
        f"{_FINISHED_SELECT.format(db=schema)} EXCEPT {_FINISHED_SELECT.format(db=other)}",
        FINISHED_STATES + FINISHED_STATES,
    ).fetchall()
    return {(str(name), int(number), str(start)) for name, number, start in rows}


def finished_count(connection: sqlite3.Connection) -> int:
    """How many finished trials :func:`finished_trials` would name."""
    (count,) = connection.execute(
        f"SELECT COUNT(*) FROM ({_FINISHED_SELECT.format(db='main')})", FINISHED_STATES
    ).fetchone()
    return int(count)


def inspect_sqlite(path: str, *, quick: bool = False) -> dict[str, Any]:
    """Integrity and, for an Optuna database, its studies; never changes the file."""
    connection = connect_read_only(path)
    try:
        problem = integrity_problem(connection, quick=quick)
        optuna = problem is None and is_optuna_schema(connection)
        studies = read_studies(connection) if optuna else []
    finally:
        connection.close()
    return {"integrity_problem": problem, "is_optuna": optuna, "studies": studies}


def inspect_sqlite_rolled_back(path: str, *, quick: bool = False) -> dict[str, Any] | None:
    """:func:`inspect_sqlite` of the database as SQLite will read it once the hot journal
    a killed writer left beside it is rolled back; None when it has no such journal.

    A read-only connection cannot roll a journal back and fails ("attempt to write a
    readonly database"), which says nothing about the database. The rollback happens in
    a private copy: the file itself never changes.
    """
    journal = path + "-journal"
    try:
        if os.path.getsize(journal) == 0:
            return None
    except OSError:
        return None
    with tempfile.TemporaryDirectory(prefix="sweepsafe-inspect-") as work:
        copy = os.path.join(work, "copy.db")
        shutil.copyfile(path, copy)
        shutil.copyfile(journal, copy + "-journal")
        connection = sqlite3.connect(copy)
        try:
            connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
        finally:
            connection.close()
        return inspect_sqlite(copy, quick=quick)
