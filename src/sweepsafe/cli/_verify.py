"""``sweepsafe verify``: is one database sound, and is its Drive copy complete?"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sweepsafe.cli._common import (
    STUDY_DB_NAME,
    add_drive_timeout_option,
    check_timeout,
    kind_of,
    object_database,
    read_timeout,
)
from sweepsafe.cli._errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNSOUND, CommandError
from sweepsafe.cli._status import (
    NOT_SQLITE,
    as_json,
    behind_note,
    check,
    human_size,
    iso_time,
    sound,
)

if TYPE_CHECKING:
    from sweepsafe.drive import VerifyResult

__all__ = ["register"]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``verify`` to the command's parser."""
    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="integrity check, trial counts and completeness of one database",
        description="Check one database read-only. Exit 0 if it is sound and, for a Drive "
        "copy, no finished trial lacks its files there; 1 if not.",
    )
    verify.add_argument(
        "path",
        metavar="PATH",
        help="a study.db, or a folder holding one; or its object store URL (s3://...)",
    )
    verify.add_argument("--json", action="store_true", help="print JSON")
    add_drive_timeout_option(verify)
    verify.set_defaults(command_function=verify_command)


def verify_command(args: argparse.Namespace, out: TextIO) -> int:
    """Check one database (or the ``study.db`` of a study folder); 0 if sound, else 1.

    Raises:
        CommandError: the path does not exist (status 2), or the database is not sound or
            not complete (status 1, after the JSON when ``--json``).
    """
    if "://" in args.path:
        with object_database(args.path, read_timeout(args)) as (store, url):
            result = store.verify(url)
        shown: object = url
    else:
        given = Path(os.path.abspath(args.path))
        folder = kind_of(given, check_timeout(args)) == "dir"
        target = given / STUDY_DB_NAME if folder else given
        result = check(target, read_timeout(args))
        shown = target
        if folder and not result.exists and result.error is None:
            raise CommandError(
                f"{given} holds no {STUDY_DB_NAME}; give one study's database or its folder "
                f"(`sweepsafe status {given}` lists the studies under it)",
                EXIT_BAD_INPUT,
            )
    if not result.exists and result.error is None:
        raise CommandError(f"{shown} does not exist", EXIT_BAD_INPUT)
    if args.json:
        json.dump(as_json(result), out, indent=2)
        out.write("\n")
    if not sound(result) or not result.ok:
        problem = result.error or (
            f"{shown} {NOT_SQLITE}" if not result.is_sqlite else f"{shown} is not sound"
        )
        raise CommandError(problem, EXIT_UNSOUND)
    if not args.json:
        out.write(_describe(result, shown))
    return EXIT_OK


def _describe(result: VerifyResult, shown: object) -> str:
    lines = [
        f"{shown}: sound (integrity check ok), {human_size(result.size)}, "
        f"modified {iso_time(result.mtime)} UTC"
    ]
    note = behind_note(result)
    if note is not None:
        lines.append(f"  {note}.")
    elif result.generation is not None:
        lines.append(f"  generation {result.generation}, the newest kept on Drive")
    if not result.studies:
        lines.append("  no Optuna study in it")
    for study in result.studies:
        total = sum(study.trial_counts.values())
        counts = ", ".join(f"{n} {state}" for state, n in sorted(study.trial_counts.items()))
        line = f"  study {study.name!r}: {total} trials" + (f" ({counts})" if counts else "")
        if study.best_value is not None:
            line += f", best value {study.best_value:.6g} ({study.directions[0]})"
        lines.append(line)
    return "\n".join(lines) + "\n"
