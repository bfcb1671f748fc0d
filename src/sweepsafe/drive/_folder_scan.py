"""Scanning a local folder for the files of a backup.

A scan names every regular file of a folder with its signature, keyed by its path
relative to the study folder, and sets aside what is not backed up: sweepsafe's own
folders and temporaries, excluded names, the side files of SQLite databases, links
that lead elsewhere, FIFOs and sockets.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat as stat_module
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sweepsafe.drive._folder_job import EntryProblem, folder_prefix
from sweepsafe.drive._local_state import Signature, database_signature, file_signature
from sweepsafe.drive._reserved_names import STATE_DIR_NAME, is_temp_name
from sweepsafe.drive._sqlite import SIDECAR_SUFFIXES
from sweepsafe.drive._sqlite_inspect import is_sqlite_file
from sweepsafe.paths import is_within

__all__ = ["scan_local"]


@dataclass(frozen=True)
class _LocalFile:
    path: str
    signature: Signature


@dataclass
class _Scan:
    files: dict[str, _LocalFile] = field(default_factory=dict)
    problems: list[EntryProblem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def scan_local(unit_local: Path, folder: Path, exclude: Sequence[str]) -> _Scan:
    """The files of ``folder`` to back up, keyed by path relative to the study folder.

    Blocking. Skips sweepsafe's own folders and temporaries, ``exclude`` matches
    (patterns relative to ``folder``) and the side files of SQLite databases. A symlink
    to a file inside the study folder is backed up as that file; any other link (to a
    folder, out of the study folder, or dangling) is skipped and named, as are FIFOs and
    sockets. An unreadable folder is named; entries that vanish meanwhile are ignored.
    """
    scan = _Scan()
    unit_real = os.path.realpath(unit_local)
    excluded = (
        re.compile("|".join(fnmatch.translate(p) for p in exclude)).match if exclude else None
    )
    unit_prefix = folder_prefix(unit_local, folder)
    pending = [(str(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as found:
                entries = list(found)
        except FileNotFoundError:
            continue
        except OSError as exc:
            rel = (unit_prefix + prefix).rstrip("/") or "."
            scan.problems.append(
                EntryProblem(rel, f"folder cannot be read: {exc.strerror or exc}", False)
            )
            continue
        names = {entry.name for entry in entries}
        for entry in entries:
            name = entry.name
            if name == STATE_DIR_NAME or is_temp_name(name):
                continue
            rel = prefix + name
            if excluded is not None and excluded(rel):
                continue
            if name.endswith(SIDECAR_SUFFIXES) and _is_database_side_file(directory, name, names):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            unit_rel = unit_prefix + rel
            if stat_module.S_ISDIR(info.st_mode):
                pending.append((entry.path, rel + "/"))
            elif stat_module.S_ISREG(info.st_mode):
                signature = (
                    database_signature(entry.path, info)
                    if name + "-wal" in names
                    else file_signature(info)
                )
                scan.files[unit_rel] = _LocalFile(entry.path, signature)
            elif stat_module.S_ISLNK(info.st_mode):
                _scan_link(entry.path, unit_rel, unit_real, scan)
            else:
                scan.skipped.append(f"{unit_rel} (not a regular file)")
    return scan


def _scan_link(path: str, unit_rel: str, unit_real: str, scan: _Scan) -> None:
    target = os.path.realpath(path)
    if not is_within(target, unit_real):
        scan.skipped.append(f"{unit_rel} (a link to {target}, outside the study folder)")
        return
    try:
        info = os.stat(target)
    except OSError:
        scan.skipped.append(f"{unit_rel} (a dangling link)")
        return
    if stat_module.S_ISREG(info.st_mode):
        scan.files[unit_rel] = _LocalFile(path, file_signature(info))
    else:
        scan.skipped.append(f"{unit_rel} (a link to a folder; its target is backed up as itself)")


def _is_database_side_file(directory: str, name: str, names: set[str]) -> bool:
    """``name`` is the ``-wal``, ``-shm`` or ``-journal`` of a database beside it."""
    for suffix in SIDECAR_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if base in names and is_sqlite_file(os.path.join(directory, base)):
                return True
    return False
