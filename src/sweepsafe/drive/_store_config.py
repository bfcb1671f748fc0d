"""What a store is built from, checked: its two roots, its options, Colab's Drive mount."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sweepsafe._blocking import run_blocking
from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.drive._reading import path_kind
from sweepsafe.errors import DriveNotMountedError, DrivePathError
from sweepsafe.paths import is_drive_path, is_within

if TYPE_CHECKING:
    from sweepsafe.drive._backend import StrPath

__all__ = ["check_drive_mounted", "check_options"]


def check_options(file_concurrency: int, keep_generations: int) -> None:
    """Raises ValueError for a count of the constructor below one."""
    if file_concurrency < 1:
        raise ValueError(f"file_concurrency must be at least 1, not {file_concurrency}")
    if keep_generations < 1:
        raise ValueError(f"keep_generations must be at least 1, not {keep_generations}")


def check_drive_mounted(my_drive: Path, mount_point: StrPath, timeout: float) -> None:
    """Raises DriveNotMountedError unless ``my_drive`` (under ``mount_point``) is a folder."""
    try:
        # Asked of a helper: a stalled mount must not hang the notebook cell.
        kind = run_blocking(lambda: path_kind(my_drive, timeout=min(timeout, 30.0)))
    except DriveTimeout as exc:
        raise DriveNotMountedError(
            f"Google Drive does not answer: {my_drive} could not be read within "
            f"{exc.timeout:g} s. Remount it with drive.mount('{mount_point}', "
            "force_remount=True)."
        ) from None
    if kind != "dir":
        raise DriveNotMountedError(
            f"Google Drive is not mounted: {my_drive} is not a folder. In Colab run "
            f"`from google.colab import drive; drive.mount('{mount_point}')` first."
        )


def _check_roots(local_root: Path, drive_root: Path) -> None:
    if is_drive_path(local_root):
        raise DrivePathError(
            f"local_root {local_root} is on Google Drive; SQLite on a Drive mount is slow and "
            "unsafe (no reliable locking), so keep the sweep on local disk (e.g. /content/out) "
            "and give the Drive folder as drive_root."
        )
    if is_within(drive_root, local_root) or is_within(local_root, drive_root):
        raise DrivePathError(
            f"the Drive folder {drive_root} and the local folder {local_root} overlap; the "
            "Drive copy must be outside the folder it backs up, and the other way round."
        )
