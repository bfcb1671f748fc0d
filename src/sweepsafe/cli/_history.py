"""``sweepsafe history``: the generations of a study kept on Drive."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sweepsafe.cli._common import (
    STUDY_DB_NAME,
    add_drive_timeout_option,
    ask_drive,
    check_timeout,
    kind_of,
    object_database,
    read_timeout,
)
from sweepsafe.cli._errors import EXIT_BAD_INPUT, EXIT_OK, CommandError
from sweepsafe.cli._status import human_size, iso_time
from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.drive._helper_client import HelperPool
from sweepsafe.drive._reading import generations_of

if TYPE_CHECKING:
    from sweepsafe.drive._results import GenerationInfo

__all__ = ["register"]


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``history`` to the command's parser."""
    history = commands.add_parser(
        "history",
        parents=[common],
        help="the generations of a study kept on Drive, newest first",
        description="List the generations of a study's database kept on Drive: when each "
        "was published, its finished trials, best value and size. Bring one back with "
        "sweepsafe restore --generation N (or --before TIME).",
    )
    history.add_argument(
        "path",
        metavar="DIR",
        help="a study folder on Drive, or its study.db; or its object store URL (s3://...)",
    )
    history.add_argument("--json", action="store_true", help="print JSON")
    add_drive_timeout_option(history)
    history.set_defaults(command_function=history_command)


def _drive_generations(target: Path, timeout: float) -> list[GenerationInfo]:
    pool = HelperPool()
    try:
        return ask_drive(
            target,
            "listing the history of",
            timeout,
            lambda: generations_of(pool, target, timeout),
        )
    finally:
        pool.close()


def history_command(args: argparse.Namespace, out: TextIO) -> int:
    """Print the generations of one study's database; 2 if there are none."""
    timeout = read_timeout(args)
    target: object
    if "://" in args.path:
        with object_database(args.path, timeout) as (store, target):
            try:
                generations = store.history(target)
            except DriveTimeout:
                raise CommandError(
                    f"the object store did not answer within {timeout:g} s while listing "
                    f"the history of {target}; check the endpoint and the network, then "
                    "run again."
                ) from None
            except OSError as exc:
                raise CommandError(
                    f"the history of {target} cannot be read: {exc.strerror or exc}"
                ) from None
    else:
        target = Path(os.path.abspath(args.path))
        if kind_of(target, check_timeout(args)) == "dir":
            target = target / STUDY_DB_NAME
        generations = _drive_generations(target, timeout)
    if not generations:
        raise CommandError(
            f"no generations of {target} are kept (give a study folder on Drive that "
            "sweepsafe backed up)",
            EXIT_BAD_INPUT,
        )
    if args.json:
        rows = [
            {
                "generation": g.number,
                "kind": g.kind,
                "created": g.created,
                "finished_trials": g.finished_trials,
                "best_value": g.best_value,
                "size": g.size,
                "runtime": g.runtime,
                "problem": g.problem,
            }
            for g in generations
        ]
        json.dump({"database": str(target), "generations": rows}, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(f"{target}: {len({g.number for g in generations})} generations kept\n")
    out.write(
        f"  {'GEN':>6}  {'PUBLISHED (UTC)':19}  {'FINISHED':>8}  {'BEST':>12}  {'SIZE':>9}  KIND\n"
    )
    for g in generations:
        best = f"{g.best_value:.6g}" if g.best_value is not None else "-"
        finished = str(g.finished_trials) if g.finished_trials is not None else "-"
        kind = g.kind if g.problem is None else f"{g.kind} ({g.problem})"
        out.write(
            f"  {g.number:>6}  {iso_time(g.created) or '-':19}  {finished:>8}  {best:>12}  "
            f"{human_size(g.size):>9}  {kind}\n"
        )
    return EXIT_OK
