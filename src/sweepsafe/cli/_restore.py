"""``sweepsafe restore``: bring a file, a folder or a database generation back from Drive."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from sweepsafe._blocking import run_blocking
from sweepsafe.cli._common import (
    add_drive_timeout_option,
    check_timeout,
    copy_store,
    kind_of,
    positive_int,
    report_copy,
)
from sweepsafe.cli._errors import EXIT_BAD_INPUT, CommandError
from sweepsafe.drive import DriveStore, ObjectStore
from sweepsafe.drive._drive_errors import DriveTimeout

__all__ = ["register"]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``restore`` to the command's parser."""
    restore = commands.add_parser(
        "restore",
        parents=[common],
        help="copy a file or folder back from Drive, checked",
        description="Copy a file or folder back from Drive. A database is restored only if "
        "it is a sound Optuna study holding every finished trial of the local one; local "
        "files changed since their last backup are kept. --generation and --before bring "
        "back an older generation of a database, to undo a bad write: the local database "
        "is set aside, the generation becomes the newest on Drive again (the later ones "
        "stay in its history), and the next sweepsafe run or run_sweep goes on from it.",
    )
    restore.add_argument("path", metavar="PATH", help="a local path under --local-root")
    restore.add_argument("--local-root", required=True, help="local folder mirrored on Drive")
    restore.add_argument(
        "--drive-root",
        required=True,
        help="its Drive folder, or an object store URL such as s3://bucket/prefix",
    )
    when = restore.add_mutually_exclusive_group()
    when.add_argument(
        "--generation",
        type=positive_int,
        metavar="N",
        help="this generation (see sweepsafe history)",
    )
    when.add_argument(
        "--before",
        type=_moment,
        metavar="TIME",
        help="the newest generation published at or before TIME: ISO 8601 in UTC, as "
        "sweepsafe history prints it (e.g. 2026-11-29T14:00), or with an offset (+01:00)",
    )
    restore.add_argument(
        "--into",
        metavar="URL",
        help="then load the restored study into this empty database server "
        "(postgresql://user@host/db), to share it between workers",
    )
    restore.add_argument(
        "--takeover",
        action="store_true",
        help="take the study over from another runtime that still holds its lease",
    )
    add_drive_timeout_option(restore)
    restore.set_defaults(command_function=restore_command)


def _moment(text: str) -> float:
    """Seconds since the epoch; a time without an offset is UTC, as ``history`` prints."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time like 2026-11-29T14:00 or 2026-11-29 14:00:00 (UTC)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if moment.microsecond == 0:
        # `history` prints whole seconds: a time copied from it names the generations
        # published within that second too.
        return moment.timestamp() + 0.999999
    return moment.timestamp()


def _kind_of_copy(store: DriveStore, path: Path, timeout: float) -> str:
    """What the copy of ``path`` is, on Drive or in an object store, within ``timeout``."""
    if not isinstance(store, ObjectStore):
        return kind_of(store.drive_path_for(path), timeout)
    try:
        return run_blocking(lambda: store.akind(path))
    except (OSError, DriveTimeout) as exc:
        raise CommandError(
            f"the object store {store.url} cannot be read ({exc}); check the URL, the "
            "credentials and the network"
        ) from None


def restore_command(args: argparse.Namespace, out: TextIO) -> int:
    """Copy the Drive copy of one file, folder or database back; 1 if nothing was restored."""
    store, path = copy_store(args)
    with store:
        kind = _kind_of_copy(store, path, check_timeout(args))
        if args.takeover:
            store.acquire(store.study_folder_of(path, kind == "dir"), takeover=True)
        result = store.restore(
            path, is_directory=kind == "dir", generation=args.generation, before=args.before
        )
        if args.takeover:
            store.release()
    if result.reason == "no-copy":
        raise CommandError(result.error or f"Google Drive holds no copy of {path}", EXIT_BAD_INPUT)
    if kind == "dir" and (args.generation is not None or args.before is not None):
        # Refused before anything was read: a generation belongs to one database.
        raise CommandError(result.error or f"{path} is a folder", EXIT_BAD_INPUT)
    status = report_copy("Restored", result, out)
    if args.into is not None:
        if result.kind != "sqlite":
            raise CommandError(f"--into loads a study database; {path} is not one")
        # Imported only here: a plain restore needs neither SQLAlchemy nor Optuna.
        import sqlalchemy

        from sweepsafe._shared import describe_server_error, hide_password
        from sweepsafe.export import load_into_server

        try:
            names = load_into_server(path, args.into)
        except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as exc:
            message = (
                str(exc) if isinstance(exc, ValueError) else describe_server_error(args.into, exc)
            )
            raise CommandError(f"{message} ({hide_password(args.into)})", EXIT_BAD_INPUT) from None
        out.write(f"Loaded {', '.join(names)} into {hide_password(args.into)}\n")
    return status
