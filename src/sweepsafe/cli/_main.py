"""The ``sweepsafe`` command: run a backed-up sweep, copy and check studies, see a demo.

Output goes to stdout, diagnostics to stderr. A bad input ends in one line,
``sweepsafe: error: ...``, and a non-zero exit status (see ``docs/cli.md``);
``--verbose`` adds the library's INFO log and tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from sweepsafe.cli import _backup, _demo, _history, _restore, _run, _status, _verify
from sweepsafe.cli._errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_UNSOUND,
    CommandError,
)
from sweepsafe.cli._progress import TqdmAwareHandler
from sweepsafe.errors import DriveNotMountedError, DrivePathError, SweepsafeError

__all__ = ["main"]

PROG = "sweepsafe"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, like every other error."""

    def error(self, message: str) -> NoReturn:
        raise CommandError(f"{message} (see: {self.prog} --help)", EXIT_BAD_INPUT)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sweepsafe`` command on ``argv`` (default ``sys.argv[1:]``); return its status."""
    parser = _build_parser()
    verbose = False
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
        verbose = args.verbose
        _configure_logging(verbose=verbose)
        status: int = args.command_function(args, sys.stdout)
    except CommandError as exc:
        return _fail(str(exc), exc.exit_status, exc, verbose)
    except (DrivePathError, DriveNotMountedError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT, exc, verbose)
    except SweepsafeError as exc:
        return _fail(str(exc), EXIT_UNSOUND, exc, verbose)
    except KeyboardInterrupt as exc:
        return _fail("interrupted", EXIT_INTERRUPTED, exc, verbose)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        hint = "" if verbose else " (run with --verbose for the traceback)"
        return _fail(
            f"unexpected {type(exc).__name__}: {exc}{hint}",
            EXIT_UNSOUND,
            exc,
            verbose=verbose,
            always_trace=True,
        )
    return status


def _fail(
    message: str,
    status: int,
    exc: BaseException,
    verbose: bool,
    *,
    always_trace: bool = False,
) -> int:
    caused = exc.__cause__ is not None or (
        exc.__context__ is not None and not exc.__suppress_context__
    )
    if verbose and (always_trace or caused):
        traceback.print_exception(exc, file=sys.stderr)
    # One line, whatever the message holds.
    text = " ".join(message.split())
    sys.stderr.write(f"{PROG}: error: {text}\n")
    return status


def _configure_logging(*, verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    handler = TqdmAwareHandler(show_tracebacks=verbose)
    for name in ("sweepsafe", "optuna"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, TqdmAwareHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Keep an Optuna sweep backed up to Google Drive and resume it anywhere.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO, show tracebacks")
    # Accepted after the command too; SUPPRESS keeps it from resetting a -v given before.
    common = _Parser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log INFO, show tracebacks",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in (_demo, _run, _backup, _restore, _status, _verify, _history):
        command.register(commands, common)
    return parser
