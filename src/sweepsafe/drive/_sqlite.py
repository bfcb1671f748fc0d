"""Consistent local snapshots of live SQLite databases, and integrity checks.

A live database is never copied byte by byte: the online backup API copies a
consistent image (WAL content included) into a file on local disk, holding the
source's read lock only for that fast local step. These functions block; callers run
them in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from sweepsafe.drive._helper_process import SQLITE_HEADER

SIDECAR_SUFFIXES = ("-wal", "-shm", "-journal")
"""Files SQLite keeps beside a database; never copied on their own."""

BUSY_TIMEOUT_S = 30.0


class SnapshotError(Exception):
    """The source database could not be snapshotted, or the snapshot is not sound."""


def is_sqlite_file(path: Path) -> bool:
    """True when the file starts with the SQLite header (whatever its name)."""
    with open(path, "rb") as file:
        return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def is_sidecar(name: str) -> bool:
    """True for ``*-wal``, ``*-shm`` and ``*-journal`` files."""
    return name.endswith(SIDECAR_SUFFIXES)


def snapshot_sqlite(source: Path, target: Path) -> None:
    """Write a consistent, quick-checked copy of the database ``source`` to ``target``.

    ``target`` is a new file on local disk, in rollback-journal mode so that a copy
    opened on Drive needs no ``-wal``/``-shm`` files. Raises :class:`SnapshotError` if
    the source cannot be read as a database or the snapshot fails ``quick_check``.
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
                rows = writer.execute("PRAGMA quick_check").fetchall()
            finally:
                writer.close()
        finally:
            reader.close()
    except sqlite3.DatabaseError as exc:
        raise SnapshotError(f"{exc}") from exc
    if [tuple(row) for row in rows] != [("ok",)]:
        detail = "; ".join(str(row[0]) for row in rows[:3])
        raise SnapshotError(f"the snapshot failed PRAGMA quick_check ({detail})")


def check_integrity(path: Path) -> str | None:
    """``None`` when ``PRAGMA integrity_check`` says ok, else what it found."""
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            rows = connection.execute("PRAGMA integrity_check").fetchall()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    if [tuple(row) for row in rows] == [("ok",)]:
        return None
    return "; ".join(str(row[0]) for row in rows[:3])


def remove_quietly(path: Path) -> None:
    """Remove a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
