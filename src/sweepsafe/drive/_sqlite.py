"""Consistent local snapshots of live SQLite databases, and what a database holds.

A live database is never copied byte by byte: the online backup API copies a
consistent image (WAL content included) into a file on local disk, holding the source's
read lock only for that fast local step. These functions block; callers run them in a
worker thread. Reading a database shares its code with the Drive helper, which reads
Drive copies the same way in its own process.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweepsafe.drive._sqlite_inspect import (
    connect_read_only,
    finished_count,
    finished_not_in,
    finished_trials,
    integrity_problem,
    is_optuna_schema,
    is_sqlite_file,
    read_studies,
)

__all__ = [
    "SIDECAR_SUFFIXES",
    "DatabaseContent",
    "SnapshotError",
    "check_database",
    "is_optuna_database",
    "is_sqlite_file",
    "read_content",
    "read_content_since",
    "recover_hot_journal",
    "snapshot_sqlite",
]

SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
"""Files SQLite keeps beside a database; a snapshot of the database holds their content."""

BUSY_TIMEOUT_S = 30.0

FinishedTrial = tuple[str, int, str]
"""(study name, trial number, start time) of a finished (COMPLETE or PRUNED) trial."""


class SnapshotError(Exception):
    """The source database could not be snapshotted soundly, or is not what was expected."""


def snapshot_sqlite(source: Path, target: Path) -> None:
    """Write a consistent, quick-checked copy of the database ``source`` to ``target``.

    ``target`` is a new file on local disk, in rollback-journal mode so that a copy
    opened on Drive needs no ``-wal``/``-shm`` files.

    Raises:
        SnapshotError: ``source`` cannot be read as a database, or the snapshot fails
            ``quick_check``.
        OSError: the local disk is full (``ENOSPC``): worth retrying once there is room.
    """
    try:
        reader = sqlite3.connect(source, timeout=BUSY_TIMEOUT_S)
        try:
            writer = sqlite3.connect(target)
            try:
                # A scratch file: it is fsynced where it matters, on Drive.
                writer.execute("PRAGMA synchronous=OFF").fetchall()
                # One step (pages=-1): the read lock is held once, for a local copy.
                reader.backup(writer, pages=-1)
                writer.execute("PRAGMA journal_mode=DELETE").fetchall()
                problem = integrity_problem(writer, quick=True)
            finally:
                writer.close()
        finally:
            reader.close()
    except sqlite3.DatabaseError as exc:
        if _is_disk_full(exc):
            raise OSError(
                errno.ENOSPC, "no room on the local disk for a snapshot of the database", target
            ) from exc
        raise SnapshotError(str(exc)) from exc
    if problem is not None:
        raise SnapshotError(f"the snapshot failed: {problem}")


def recover_hot_journal(database: Path) -> None:
    """Let SQLite roll back a transaction a killed writer left in a ``-journal``.

    A hot journal can only be rolled back by a connection that may write; until then a
    read-only connection fails ("attempt to write a readonly database"). Only for a
    database this process owns (a local study before Optuna opens it): never a Drive copy.
    """
    journal = database.with_name(database.name + "-journal")
    if not journal.exists() or journal.stat().st_size == 0:
        return
    try:
        connection = sqlite3.connect(database, timeout=BUSY_TIMEOUT_S)
        try:
            connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError:
        return  # the check that follows says what is wrong with it


def _is_disk_full(exc: sqlite3.DatabaseError) -> bool:
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in str(exc)


@dataclass(frozen=True)
class DatabaseContent:
    """What a checked database holds: its finished trials, and if it is an Optuna study."""

    is_optuna: bool
    finished: frozenset[FinishedTrial]
    studies: tuple[dict[str, Any], ...] = ()
    """Per Optuna study: ``name``, ``directions``, ``trial_counts`` by state, ``best``."""

    @property
    def finished_count(self) -> int:
        """How many finished trials, over every study."""
        return len(self.finished)

    def missing_from(self, newer: DatabaseContent) -> frozenset[FinishedTrial]:
        """Finished trials of this database that ``newer`` lacks."""
        return self.finished - newer.finished


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the database at ``path``.

    Raises:
        SnapshotError: not SQLite, or it cannot be read.
    """
    if not is_sqlite_file(os.fspath(path)):
        raise SnapshotError(f"{path} is not an SQLite database")
    try:
        connection = connect_read_only(os.fspath(path), BUSY_TIMEOUT_S)
        try:
            yield connection
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise SnapshotError(f"{path} cannot be read as a database ({exc})") from exc


def check_database(path: Path) -> None:
    """Run ``PRAGMA integrity_check`` on the database at ``path``, on a connection of its own.

    Raises:
        SnapshotError: not SQLite, or the check fails.
    """
    with _read_only(path) as connection:
        problem = integrity_problem(connection)
    if problem is not None:
        raise SnapshotError(f"{path} {problem}")


def read_content(path: Path, *, check: str | None = "quick") -> DatabaseContent:
    """Read a database's finished trials, after ``quick_check`` or ``integrity_check``.

    ``check`` is ``"quick"``, ``"full"`` or None (already checked).

    Raises:
        SnapshotError: not SQLite, or the check fails.
    """
    with _read_only(path) as connection:
        if check is not None:
            problem = integrity_problem(connection, quick=check == "quick")
            if problem is not None:
                raise SnapshotError(f"{path} {problem}")
        if not is_optuna_schema(connection):
            return DatabaseContent(is_optuna=False, finished=frozenset())
        return DatabaseContent(
            is_optuna=True,
            finished=frozenset(finished_trials(connection)),
            studies=tuple(read_studies(connection)),
        )


def is_optuna_database(path: Path) -> bool:
    """The SQLite database at ``path`` has Optuna's tables.

    Raises:
        SnapshotError: not SQLite, or unreadable.
    """
    with _read_only(path) as connection:
        return is_optuna_schema(connection)


def read_content_since(
    path: Path, earlier: Path, earlier_content: DatabaseContent
) -> DatabaseContent:
    """``read_content(path, check=None)``, read as the difference from ``earlier``, an
    older snapshot of the same database that holds ``earlier_content``.

    A snapshot taken after a trial differs from the one before it in a few trials.
    SQLite compares the two files, so only those trials become Python objects: reading
    a study of 20,000 trials whole holds Python's lock for tens of milliseconds, which
    the sweep's own thread would wait for at every backup. Should the finished trials
    not add up to the count SQLite gives (``earlier`` is not what ``earlier_content``
    says, or not an Optuna study), the whole file is read instead.

    Raises:
        SnapshotError: ``path`` is not SQLite, or cannot be read.
    """
    if not earlier_content.is_optuna:
        return read_content(path, check=None)
    try:
        with _read_only(path) as connection:
            if not is_optuna_schema(connection):
                return DatabaseContent(is_optuna=False, finished=frozenset())
            connection.execute("ATTACH DATABASE ? AS earlier", (f"file:{earlier}?mode=ro",))
            lost = finished_not_in(connection, "earlier", "main")
            added = finished_not_in(connection, "main", "earlier")
            count = finished_count(connection)
            studies = tuple(read_studies(connection))
    except SnapshotError:
        return read_content(path, check=None)  # it names what is wrong, if anything is
    finished = (earlier_content.finished - lost) | added
    if len(finished) != count:
        return read_content(path, check=None)
    return DatabaseContent(is_optuna=True, finished=frozenset(finished), studies=studies)
