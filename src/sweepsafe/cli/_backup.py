"""``sweepsafe backup``: one backup of a file or folder, waited for."""

from __future__ import annotations

import argparse
from typing import TextIO

from sweepsafe.cli._common import (
    add_drive_timeout_option,
    check_timeout,
    copy_store,
    kind_of,
    report_copy,
)
from sweepsafe.cli._errors import CommandError

__all__ = ["register"]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``backup`` to the command's parser."""
    backup = commands.add_parser(
        "backup",
        parents=[common],
        help="copy a file or folder to Drive and wait for it",
        description="Copy a file or folder to Drive and wait for it. A study database goes "
        "as a checked snapshot that never replaces a Drive copy holding trials it lacks.",
    )
    backup.add_argument("path", metavar="PATH", help="a local path under --local-root")
    backup.add_argument("--local-root", required=True, help="local folder mirrored on Drive")
    backup.add_argument(
        "--drive-root",
        required=True,
        help="its Drive folder, or an object store URL such as s3://bucket/prefix",
    )
    backup.add_argument(
        "--takeover",
        action="store_true",
        help="take the study over from another runtime that still holds its lease",
    )
    add_drive_timeout_option(backup)
    backup.set_defaults(command_function=backup_command)


def backup_command(args: argparse.Namespace, out: TextIO) -> int:
    """Copy one file or folder to Drive and wait for it; 1 if the copy failed."""
    store, path = copy_store(args)
    with store:
        kind = kind_of(path, check_timeout(args))
        if kind == "missing":
            raise CommandError(f"{path} does not exist, so there is nothing to back up")
        if kind == "other":
            raise CommandError(f"{path} is not a regular file or folder, so it cannot be copied")
        is_directory = kind == "dir"
        if args.takeover:
            store.acquire(store.study_folder_of(path, is_directory), takeover=True)
        result = store.backup(path, is_directory=is_directory, final=True)
        store.release()
    return report_copy("Backed up", result, out)
