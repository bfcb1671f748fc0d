"""What several commands share: option types, the progress flag, and checking a Drive folder.

Every look at a Drive path goes through a helper process with a deadline, as the
store's own copies do, so a stalled mount makes a command fail in time, saying so,
instead of hanging it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TextIO, TypeVar

from sweepsafe._blocking import run_blocking
from sweepsafe.cli._errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNSOUND, CommandError
from sweepsafe.drive import BackupResult, DriveStore, ObjectStore, path_kind
from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.drive._operations import DATABASE_SUFFIXES, STUDY_DB_NAME
from sweepsafe.errors import DriveNotMountedError
from sweepsafe.paths import COLAB_DRIVE_MOUNT, configured_drive_roots, is_within

__all__ = [
    "DRIVE_CHECK_TIMEOUT_S",
    "DRIVE_READ_TIMEOUT_S",
    "STUDY_DB_NAME",
    "add_drive_timeout_option",
    "add_progress_options",
    "ask_drive",
    "check_drive_dir",
    "check_timeout",
    "copy_store",
    "kind_of",
    "local_folder",
    "non_negative_float",
    "non_negative_int",
    "object_database",
    "object_store_for",
    "positive_float",
    "positive_int",
    "read_timeout",
    "report_copy",
    "show_progress",
    "stalled",
    "whole_number",
]

T = TypeVar("T")

DRIVE_CHECK_TIMEOUT_S = 30.0
"""How long a command waits for Drive to say whether a folder is there (``--drive-timeout``)."""
DRIVE_READ_TIMEOUT_S = 120.0
"""How long a command waits for Drive to read or copy one file (``--drive-timeout``)."""


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    return whole_number(text, 0)


def whole_number(text: str, least: int, most: int | None = None) -> int:
    """``text`` as a whole number from ``least`` to ``most``, for an argparse type.

    Raises:
        argparse.ArgumentTypeError: it is not a whole number, or out of range.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} is not at least {least}")
    if most is not None and value > most:
        raise argparse.ArgumentTypeError(f"{text} is more than {most}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("it must be more than 0")
    return value


def add_progress_options(command: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress``."""
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


def add_drive_timeout_option(command: argparse.ArgumentParser) -> None:
    """``--drive-timeout S``: the deadline of every request the command makes of Drive."""
    command.add_argument(
        "--drive-timeout",
        type=positive_float,
        metavar="S",
        help="give up on Google Drive when one request takes more than S seconds "
        f"(default: {DRIVE_CHECK_TIMEOUT_S:g} to look at a folder, "
        f"{DRIVE_READ_TIMEOUT_S:g} to read or copy a file)",
    )


def check_timeout(args: argparse.Namespace) -> float:
    """The deadline of a quick look at Drive: is this folder there?"""
    given: float | None = getattr(args, "drive_timeout", None)
    return DRIVE_CHECK_TIMEOUT_S if given is None else given


def read_timeout(args: argparse.Namespace) -> float:
    """The deadline of reading or copying one file on Drive."""
    given: float | None = getattr(args, "drive_timeout", None)
    return DRIVE_READ_TIMEOUT_S if given is None else given


def stalled(path: Path, action: str, timeout: float) -> str:
    """The sentence for a Drive that did not answer: what, where, and to remount."""
    return (
        f"Google Drive did not answer within {timeout:g} s while {action} {path}; the mount "
        "may be stalled. Remount it (on Colab: drive.mount('/content/drive', "
        "force_remount=True)) and run again."
    )


def ask_drive(path: Path, action: str, timeout: float, call: Callable[[], Awaitable[T]]) -> T:
    """Run one look at ``path`` through a helper with its deadline; blocking.

    Raises:
        DriveNotMountedError: the mount did not answer in time, or failed.
    """
    try:
        return run_blocking(call)
    except DriveTimeout:
        raise DriveNotMountedError(stalled(path, action, timeout)) from None
    except OSError as exc:
        raise DriveNotMountedError(
            f"{path} cannot be read ({exc.strerror or exc}); if it is on Google Drive, check "
            "that Drive is mounted (remount it if it stopped answering)."
        ) from None


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw the progress bar."""
    return bool(args.progress) if args.progress is not None else sys.stderr.isatty()


def kind_of(path: Path, timeout: float = DRIVE_CHECK_TIMEOUT_S) -> str:
    """``dir``, ``file``, ``other`` or ``missing``, asked of a helper with a deadline.

    Raises:
        DriveNotMountedError: the mount did not answer in time, or failed.
    """
    return ask_drive(path, "looking at", timeout, lambda: path_kind(path, timeout=timeout))


def check_drive_dir(
    drive_dir: Path, local_dir: Path, *, local_option: str, timeout: float = DRIVE_CHECK_TIMEOUT_S
) -> None:
    """Refuse a Drive folder that cannot work before anything is written.

    Raises:
        DriveNotMountedError: the Drive mount holding ``drive_dir`` is missing or stalled.
        CommandError: its parent folder is missing, or it overlaps ``local_dir``.
    """
    if is_within(drive_dir, local_dir) or is_within(local_dir, drive_dir):
        raise CommandError(
            f"conflicting options: the Drive folder {drive_dir} and {local_option} {local_dir} "
            "overlap; the Drive copy must be outside the folder it backs up, and the other "
            "way round"
        )
    for root in configured_drive_roots():
        if is_within(drive_dir, root):
            mounted = Path(root) / "MyDrive" if root == COLAB_DRIVE_MOUNT else Path(root)
            if kind_of(mounted, timeout) != "dir":
                how = (
                    "in Colab run `from google.colab import drive; drive.mount('/content/drive')`"
                    if root == COLAB_DRIVE_MOUNT
                    else "mount it first"
                )
                raise DriveNotMountedError(
                    f"Google Drive is not mounted: {mounted} is not a folder; {how}"
                )
            break
    if kind_of(drive_dir.parent, timeout) != "dir":
        raise CommandError(
            f"{drive_dir.parent} (the parent of the Drive folder) does not exist; create it, "
            "or check that Drive is mounted",
            EXIT_BAD_INPUT,
        )
    if kind_of(drive_dir, timeout) not in ("dir", "missing"):
        raise CommandError(
            f"the Drive folder {drive_dir} is a file, not a folder; give a folder (nothing "
            "was written)",
            EXIT_BAD_INPUT,
        )


def local_folder(path: str, option: str) -> Path:
    """An absolute local folder path that is not a file.

    Raises:
        CommandError: it exists and is not a folder.
    """
    folder = Path(os.path.abspath(path))
    if os.path.lexists(folder) and not folder.is_dir():
        raise CommandError(f"{option} {folder} is a file, not a folder; give a folder")
    return folder


def object_store_for(local_root: Path, target: str, **options: object) -> DriveStore | None:
    """An ObjectStore when ``target`` is a URL (``s3://bucket/prefix``), else None.

    Credentials come from the environment, the way the fsspec implementation finds them.

    Raises:
        CommandError: the URL cannot be used, or its package is not installed.
    """
    if "://" not in target:
        return None
    try:
        return ObjectStore(local_root, target, **options)  # type: ignore[arg-type]
    except (ValueError, ModuleNotFoundError) as exc:
        raise CommandError(str(exc)) from None


@contextlib.contextmanager
def object_root(url: str, timeout: float) -> Iterator[ObjectStore]:
    """An ObjectStore over ``url``, for the commands that only read copies.

    Raises:
        CommandError: the URL cannot be used, or its package is not installed.
    """
    with tempfile.TemporaryDirectory(prefix="sweepsafe-read-") as scratch:
        store = object_store_for(Path(scratch), url, drive_timeout=timeout)
        if not isinstance(store, ObjectStore):
            raise CommandError(
                f"{url!r} is not an object store URL; give one such as "
                "'s3://bucket/prefix', 'gs://bucket/prefix' or 'file:///absolute/folder'"
            )
        try:
            yield store
        finally:
            store.close()


@contextlib.contextmanager
def object_database(url: str, timeout: float) -> Iterator[tuple[ObjectStore, str]]:
    """An ObjectStore over the study folder of ``url`` (a study folder's URL, or its
    database's), and the database's URL; for the commands that only read a copy.

    Raises:
        CommandError: the URL cannot be used, or its package is not installed.
    """
    url = url.rstrip("/")
    folder, name = url.rsplit("/", 1) if url.endswith(DATABASE_SUFFIXES) else (url, STUDY_DB_NAME)
    with object_root(folder, timeout) as store:
        # The store's own spelling of the URL (s3:///b/p is s3://b/p), which it knows.
        yield store, f"{store.url}/{name}"


def copy_store(args: argparse.Namespace) -> tuple[DriveStore, Path]:
    """The store and the path of ``backup`` and ``restore`` (``--local-root``, ``--drive-root``).

    Raises:
        CommandError: the path is not under ``--local-root``, or the roots overlap.
        DriveNotMountedError: the Drive mount is missing or stalled.
    """
    local_root = local_folder(args.local_root, "--local-root")
    path = Path(os.path.abspath(args.path))
    store = object_store_for(local_root, args.drive_root, drive_timeout=read_timeout(args))
    if store is None:
        drive_root = Path(os.path.abspath(args.drive_root))
        check_drive_dir(
            drive_root, local_root, local_option="--local-root", timeout=check_timeout(args)
        )
        store = DriveStore(local_root, drive_root, drive_timeout=read_timeout(args))
    if not is_within(path, local_root):
        raise CommandError(
            f"conflicting options: {path} is not inside --local-root {local_root}; give a "
            "path under it"
        )
    return store, path


def report_copy(verb: str, result: BackupResult, out: TextIO) -> int:
    """Print what one backup or restore did; a failure is one error line (exit 1)."""
    if not result.ok:
        raise CommandError(
            result.error or f"{verb.lower()} of {result.source} failed", EXIT_UNSOUND
        )
    if result.kind == "directory":
        detail = (
            f"{result.bytes_copied / 1e6:.2f} MB in {result.files_copied} files "
            f"({result.files_unchanged} unchanged)"
        )
    else:
        detail = f"{result.bytes_copied / 1e6:.2f} MB"
    if result.generation is not None:
        detail += f", generation {result.generation}"
    if result.finished_trials is not None:
        detail += f", {result.finished_trials} finished trials"
    out.write(
        f"{verb} {result.source} -> {result.destination}: {detail}, {result.duration_s:.1f} s\n"
    )
    for line in (*result.notes, *result.skipped):
        out.write(f"  note: {line}\n")
    for kept in result.kept_local:
        out.write(f"  kept the local {kept}: it changed since its last backup\n")
    return EXIT_OK


def quiet_optuna() -> None:
    """Stop Optuna's own log handler, which would print every trial a second time.

    Called by the commands that run a sweep, once they import Optuna: the others never
    import it, so that they start at once.
    """
    level = logging.getLogger("sweepsafe").getEffectiveLevel()
    import optuna

    optuna.logging.disable_default_handler()
    # Optuna sets its logger to INFO when it is first imported; the command's level stands.
    logging.getLogger("optuna").setLevel(level)
