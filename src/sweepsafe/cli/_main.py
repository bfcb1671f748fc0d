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

import optuna

from sweepsafe.cli._demo import demo_command
from sweepsafe.cli._errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_UNSOUND,
    CommandError,
)
from sweepsafe.cli._progress import TqdmAwareHandler
from sweepsafe.cli._run import backup_command, restore_command, run_command
from sweepsafe.cli._status import print_status, print_verification
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
        status: int = args.command_function(args)
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
    if verbose and (always_trace or exc.__cause__ is not None or exc.__context__ is not None):
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
    # Optuna's own handler would log every trial a second time.
    optuna.logging.disable_default_handler()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("it must be more than 0")
    return value


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

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="run a real sweep against a slowed stand-in for Drive and show the overhead",
        description="Run a seeded Optuna sweep twice, without and with backups to a local "
        "folder slowed like Drive, and report the overhead and the Drive copy.",
    )
    demo.add_argument("--trials", type=_positive_int, default=60, help="trials (default 60)")
    demo.add_argument(
        "--trial-seconds",
        type=_non_negative_float,
        default=0.05,
        help="time each trial sleeps (default 0.05)",
    )
    demo.add_argument(
        "--drive-latency",
        type=_non_negative_float,
        default=0.5,
        help="seconds the stand-in Drive takes per file written (default 0.5)",
    )
    demo.add_argument(
        "--workdir", help="an empty or new folder to run in, kept (default: a temporary one)"
    )
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    _add_progress_options(demo)
    demo.set_defaults(command_function=_demo)

    run = commands.add_parser(
        "run",
        parents=[common],
        help="run your objective with backups to Drive; run again to resume",
        description="Run MODULE:FUNCTION as an Optuna objective. The study lives in "
        "OUTPUT_DIR/study-<hash of KEY> and is backed up to the Drive folder after every "
        "trial; running the same command again resumes it, from Drive if the local "
        "folder is gone.",
    )
    run.add_argument("objective", metavar="MODULE:FUNCTION", help="e.g. train:objective")
    run.add_argument("--output-dir", required=True, help="local folder of the study")
    run.add_argument("--study-key", required=True, help="names the study; same key, same study")
    run.add_argument(
        "--drive-dir",
        help="Drive folder for the copies (on Colab: /content/drive/MyDrive/sweepsafe)",
    )
    run.add_argument(
        "--trials", type=_positive_int, help="total finished trials the study should have"
    )
    run.add_argument("--timeout", type=_positive_float, help="stop starting trials after S s")
    run.add_argument("--direction", choices=("minimize", "maximize"), default="minimize")
    run.add_argument("--n-jobs", type=_positive_int, default=1, help="trials run in parallel")
    run.add_argument(
        "--no-restore",
        dest="restore_disabled",
        action="store_true",
        help="never restore from Drive (a new study will overwrite the Drive copy)",
    )
    run.add_argument(
        "--flush-timeout",
        type=_non_negative_float,
        default=300.0,
        help="seconds to wait for the final backup (default 300)",
    )
    _add_progress_options(run)
    run.set_defaults(command_function=_run)

    for name, function, verb in (
        ("backup", _backup, "copy a file or folder to Drive and wait for it"),
        ("restore", _restore, "copy a file or folder back from Drive"),
    ):
        copy = commands.add_parser(name, parents=[common], help=verb, description=verb + ".")
        copy.add_argument("path", metavar="PATH", help="a local path under --local-root")
        copy.add_argument("--local-root", required=True, help="local folder mirrored on Drive")
        copy.add_argument("--drive-root", required=True, help="its Drive folder")
        copy.set_defaults(command_function=function)

    status = commands.add_parser(
        "status",
        parents=[common],
        help="trials, best value, size, last change and integrity of every study under DIR",
        description="Report every study under DIR (study-*/study.db, or DIR/study.db), "
        "local or on Drive, read-only. Exit 1 if any database is not sound.",
    )
    status.add_argument("directory", metavar="DIR", help="an output or Drive folder, or a file")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(command_function=_status)

    verify = commands.add_parser(
        "verify",
        parents=[common],
        help="integrity check and trial counts of one database",
        description="Check one database read-only. Exit 0 if it is sound, 1 if not.",
    )
    verify.add_argument("path", metavar="PATH", help="a study.db, or a folder holding one")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(command_function=_verify)
    return parser


def _add_progress_options(command: argparse.ArgumentParser) -> None:
    shown = command.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        help="always draw the progress bar on stderr (default: only on a terminal)",
    )
    shown.add_argument(
        "--no-progress", dest="progress", action="store_const", const=False, help="never draw it"
    )


def _show_progress(args: argparse.Namespace) -> bool:
    return bool(args.progress) if args.progress is not None else sys.stderr.isatty()


def _demo(args: argparse.Namespace) -> int:
    return demo_command(args, sys.stdout, show_progress=_show_progress(args))


def _run(args: argparse.Namespace) -> int:
    return run_command(args, sys.stdout, show_progress=_show_progress(args))


def _backup(args: argparse.Namespace) -> int:
    return backup_command(args, sys.stdout)


def _restore(args: argparse.Namespace) -> int:
    return restore_command(args, sys.stdout)


def _status(args: argparse.Namespace) -> int:
    return print_status(args.directory, as_json=args.json, out=sys.stdout)


def _verify(args: argparse.Namespace) -> int:
    return print_verification(args.path, as_json=args.json, out=sys.stdout)
