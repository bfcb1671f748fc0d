"""``sweepsafe status``: every study under a folder, local or on Drive, read-only.

Every database is read by a helper process with a deadline, in SQLite's read-only mode:
pointing the command at a live sweep or at its Drive copy never modifies either, and a
stalled mount makes it fail in time instead of hanging.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from sweepsafe._blocking import run_blocking
from sweepsafe.cli._common import (
    DRIVE_READ_TIMEOUT_S,
    STUDY_DB_NAME,
    add_drive_timeout_option,
    ask_drive,
    check_timeout,
    kind_of,
    non_negative_float,
    object_database,
    object_root,
    read_timeout,
    stalled,
)
from sweepsafe.cli._errors import EXIT_OK, EXIT_UNSOUND, CommandError
from sweepsafe.drive import VerifyResult, check_database, folder_entries
from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.drive._operations import DATABASE_SUFFIXES

__all__ = [
    "as_json",
    "behind_note",
    "check",
    "check_word",
    "human_size",
    "iso_time",
    "register",
]

_STATE_COLUMNS = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
NOT_SQLITE = "is not an SQLite database (it does not start with the SQLite header)"


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``status`` to the command's parser."""
    status = commands.add_parser(
        "status",
        parents=[common],
        help="trials, best value, size, last change and integrity of every study under DIR",
        description="Report every study under DIR (study-*/study.db, or DIR/study.db), "
        "local or on Drive, read-only. Exit 1 if any database is not sound.",
    )
    status.add_argument(
        "directory",
        metavar="DIR",
        help="an output or Drive folder, a file, or an object store URL (s3://bucket/prefix)",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument(
        "--storage",
        metavar="URL",
        help="the database server of a shared study: also say how many workers are alive",
    )
    status.add_argument(
        "--grace-period",
        type=non_negative_float,
        default=120.0,
        help="with --storage: a worker silent this long is not counted (default 120 s)",
    )
    add_drive_timeout_option(status)
    status.set_defaults(command_function=status_command)


def check(database: Path, timeout: float = DRIVE_READ_TIMEOUT_S) -> VerifyResult:
    """Read one database through a helper, with a deadline."""
    try:
        return run_blocking(lambda: check_database(database, timeout=timeout))
    except DriveTimeout:
        return VerifyResult(path=database, exists=True, error=stalled(database, "reading", timeout))


def check_word(result: VerifyResult) -> str:
    """A word for the table: ``ok``, ``CORRUPT``, ``NOT-SQLITE``, ``INCOMPLETE`` or ``MISSING``."""
    if not result.exists:
        return "MISSING"
    if not result.is_sqlite:
        return "NOT-SQLITE"
    if not result.integrity_ok:
        return "CORRUPT"
    return "ok" if result.ok else "INCOMPLETE"


def sound(result: VerifyResult) -> bool:
    """An SQLite database that passed its integrity check (complete or not)."""
    return result.exists and result.is_sqlite and bool(result.integrity_ok)


def as_json(result: VerifyResult) -> dict[str, Any]:
    """A JSON-able dict of everything known about one database."""
    return {
        "path": str(result.path),
        "exists": result.exists,
        "size": result.size,
        "mtime": result.mtime,
        "modified": iso_time(result.mtime),
        "is_sqlite": result.is_sqlite,
        "integrity_ok": bool(result.integrity_ok),
        "sound": sound(result),
        "complete": result.ok,
        "check": check_word(result),
        "generation": result.generation,
        "newest_generation": result.newest_generation,
        "newest_finished_trials": result.newest_finished_trials,
        "trial_counts": dict(result.trial_counts),
        "studies": [
            {
                "name": study.name,
                "directions": list(study.directions),
                "trial_counts": dict(study.trial_counts),
                "best_value": study.best_value,
            }
            for study in result.studies
        ],
        "missing_files": {str(n): list(files) for n, files in result.missing_files.items()},
        "error": result.error,
    }


def find_databases(root: Path, timeout: float) -> list[Path]:
    """The databases ``status`` reports for ``root``: a file, or study folders under it.

    Raises:
        CommandError: ``root`` does not exist, or holds no study folder.
    """
    kind = kind_of(root, timeout)
    if kind == "missing":
        raise CommandError(f"{root} does not exist")
    if kind != "dir":
        return [root]
    entries = (
        ask_drive(root, "listing", timeout, lambda: folder_entries(root, timeout=timeout)) or []
    )
    return [Path(found) for found in _study_databases(str(root), entries)]


def object_store_results(url: str, timeout: float) -> tuple[str, list[VerifyResult]]:
    """Every database under an object store URL (or the one it names), each checked, and
    the URL as the store spells it.

    Raises:
        CommandError: the URL cannot be used, nothing is stored under it, it holds no
            study folder, or the store failed or did not answer.
    """
    if url.endswith(DATABASE_SUFFIXES):
        with object_database(url, timeout) as (store, database):
            return database, [store.verify(database)]
    with object_root(url, timeout) as store:
        url = store.url  # its own spelling (s3:///b/p is s3://b/p), which it knows
        try:
            entries = run_blocking(lambda: store.aentries(url))
        except DriveTimeout:
            raise CommandError(
                f"the object store did not answer within {timeout:g} s while listing {url}; "
                "check the endpoint and the network, then run again."
            ) from None
        except OSError as exc:
            raise CommandError(f"{url} cannot be listed: {exc.strerror or exc}") from None
        if entries is None:
            raise CommandError(f"{url} does not exist (nothing is stored under it)")
        return url, [store.verify(database) for database in _study_databases(url, entries)]


def _study_databases(root: str, entries: Sequence[tuple[str, str]]) -> list[str]:
    found = [f"{root}/{STUDY_DB_NAME}"] if (STUDY_DB_NAME, "file") in entries else []
    found.extend(
        f"{root}/{name}/{STUDY_DB_NAME}"
        for name, kind in entries
        if kind == "dir" and name.startswith("study-")
    )
    if not found:
        raise CommandError(
            f"no study folder (study-*/{STUDY_DB_NAME}) and no {STUDY_DB_NAME} in {root}; "
            "give the --output-dir of a sweep or its Drive folder",
            EXIT_UNSOUND,
        )
    return found


def status_command(args: argparse.Namespace, out: TextIO) -> int:
    """Print every database under ``DIR`` as a table (or JSON); 1 if any is unsound, or is
    a Drive copy whose newest generation cannot be rebuilt or that lacks trials' files."""
    timeout = read_timeout(args)
    base: Path | str
    if "://" in args.directory:
        base, results = object_store_results(args.directory.rstrip("/"), timeout)
    else:
        base = Path(os.path.abspath(args.directory))
        results = [check(path, timeout) for path in find_databases(base, check_timeout(args))]
    results = [r for r in results if r.exists or r.error is not None]
    workers = _workers(args)
    if args.json:
        body: dict[str, Any] = {"root": str(base), "databases": [as_json(r) for r in results]}
        if workers is not None:
            body["workers_seen"] = workers
        json.dump(body, out, indent=2)
        out.write("\n")
    else:
        out.write(_table(base, results))
        for result in results:
            note = behind_note(result)
            if note is not None and result.error is None:
                out.write(f"{_display_name(base, result.path)}: {note}.\n")
            if result.error is not None:
                out.write(f"{result.error}\n")
            elif result.exists and not result.is_sqlite:
                out.write(f"{result.path} {NOT_SQLITE}\n")
        if workers is not None:
            from sweepsafe._shared import hide_password

            seen = ", ".join(f"{n} in {name}" for name, n in sorted(workers.items())) or "none"
            out.write(
                f"Workers seen by heartbeat in the last {args.grace_period:g} s "
                f"({hide_password(args.storage)}): {seen}\n"
            )
    return EXIT_OK if all(sound(result) and result.ok for result in results) else EXIT_UNSOUND


def _workers(args: argparse.Namespace) -> dict[str, int] | None:
    """Live workers per study in the server given by ``--storage``, if it was given."""
    if args.storage is None:
        return None
    # Imported only here: without --storage, status needs neither SQLAlchemy nor Optuna.
    import sqlalchemy

    from sweepsafe._shared import describe_server_error, workers_seen

    try:
        return workers_seen(args.storage, args.grace_period)
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise CommandError(describe_server_error(args.storage, exc)) from None


def _table(base: Path | str, results: Sequence[VerifyResult]) -> str:
    header = ("STUDY", "NAME", *_STATE_COLUMNS, "BEST", "SIZE", "MODIFIED (UTC)", "GEN", "CHECK")
    rows: list[tuple[str, ...]] = [header]
    for result in results:
        counts = result.trial_counts
        names = ",".join(result.study_names) or "-"
        best_values = [s.best_value for s in result.studies if s.best_value is not None]
        best = f"{best_values[0]:.6g}" if len(result.studies) == 1 and best_values else "-"
        rows.append(
            (
                _display_name(base, result.path),
                names,
                *(str(counts.get(state, 0)) if sound(result) else "-" for state in _STATE_COLUMNS),
                best,
                human_size(result.size),
                iso_time(result.mtime) or "-",
                _generation_cell(result),
                check_word(result),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {2, 3, 4, 5, 6, 7, 9}
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in numeric and row is not header else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _generation_cell(result: VerifyResult) -> str:
    """``GEN``: the plain copy's generation, and Drive's newest when that one is ahead."""
    if result.generation is None:
        return "-" if result.newest_generation is None else f"?/{result.newest_generation}"
    if result.newest_generation is None or result.newest_generation == result.generation:
        return str(result.generation)
    return f"{result.generation}/{result.newest_generation}"


def behind_note(result: VerifyResult) -> str | None:
    """Say so when a Drive copy's counts are of an older generation than Drive's newest."""
    plain, newest = result.generation, result.newest_generation
    if plain is None or newest is None or plain == newest:
        return None
    holds = (
        f", which holds {result.newest_finished_trials} finished trials"
        if result.newest_finished_trials is not None
        else ""
    )
    return (
        f"the counts are of generation {plain}, the plain study.db (written whole "
        f"at the end of each sweep); the newest generation is {newest}{holds}, and a "
        "restore rebuilds it"
    )


def _display_name(base: Path | str, path: Path | str) -> str:
    if isinstance(path, str) or isinstance(base, str):
        text, root = str(path), str(base)
        if text == root:
            return text.rsplit("/", 1)[-1]
        relative = text[len(root) + 1 :] if text.startswith(root + "/") else text
        return relative.rsplit("/", 1)[0] if "/" in relative else relative
    try:
        relative_path = path.relative_to(base)
    except ValueError:
        return str(path)
    if relative_path == Path():
        return path.name
    parent = relative_path.parent
    return str(parent) if parent != Path() else str(relative_path)


def human_size(size: int | None) -> str:
    """``12.3 MB`` and the like."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def iso_time(mtime: float | None) -> str | None:
    """A UTC time like ``2026-11-29 14:00:00``."""
    if mtime is None:
        return None
    return datetime.fromtimestamp(mtime, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
