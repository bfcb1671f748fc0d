"""Turn a failed copy into one sentence for the user, and whether retrying may help."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from sweepsafe.drive._helper_client import DriveOSError, DriveTimeout, HelperGone
from sweepsafe.drive._helper_process import SOURCE_CHANGED_ERRNO, TEMP_MARKER, is_temp_name
from sweepsafe.drive._sqlite import SnapshotError


def source_problem(source: Path, is_directory: bool) -> str | None:
    if is_directory:
        if source.is_dir():
            return None
        if source.exists():
            return f"{source} is a file, not a folder; back it up with is_directory=False."
    else:
        if source.is_file():
            return None
        if source.is_dir():
            return f"{source} is a folder; back it up with is_directory=True."
    return f"{source} does not exist, so it was not backed up; check the path."


def _target_of(drive_path: str) -> str:
    """The file a Drive-side temporary was going to replace (else the path itself)."""
    folder, name = os.path.split(drive_path)
    if is_temp_name(name):
        return os.path.join(folder, name[1:].split(TEMP_MARKER, 1)[0])
    return drive_path


_RETRY_HINT = "the previous Drive copy is unchanged and trying again may succeed"


def explain_failure(exc: BaseException, local: Path, action: str, remote: Path) -> tuple[str, bool]:
    """One sentence for a failed copy, and whether retrying may help."""
    if isinstance(exc, DriveTimeout):
        return (
            f"Google Drive did not answer within {exc.timeout:g} s while {action} "
            f"{exc.path}; the mount may be stalled, so sweepsafe abandoned that attempt "
            f"({_RETRY_HINT} once Drive responds; remount Drive if it persists).",
            True,
        )
    if isinstance(exc, SnapshotError):
        return (
            f"{local} could not be copied as a consistent SQLite snapshot ({exc}); it may be "
            "corrupt, so nothing was copied to Drive. Check it with PRAGMA integrity_check.",
            False,
        )
    if isinstance(exc, HelperGone):
        return (
            f"the Drive helper process ended unexpectedly while {action} {remote}; {_RETRY_HINT}.",
            True,
        )
    if isinstance(exc, DriveOSError) and exc.errno == SOURCE_CHANGED_ERRNO:
        return (
            f"{exc.filename or local} changed while it was being copied, so the previous "
            f"Drive copy {remote} was kept; it is copied again on the next backup.",
            True,
        )
    if isinstance(exc, DriveOSError) and exc.filename != str(local):
        where: str | Path = _target_of(exc.filename) if exc.filename else remote
        if not str(where).startswith(str(remote)):
            where = f"{where} (for {remote})"
        reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
        if exc.errno == errno.ENOTCONN:
            return (
                f"Google Drive is not connected ({reason}) while {action} {where}; remount it "
                f"(drive.mount('/content/drive', force_remount=True)); {_RETRY_HINT}.",
                True,
            )
        if exc.errno == errno.ENOENT:
            return (
                f"{where} is missing on Google Drive while {action} {remote}; check that "
                f"Drive is mounted; {_RETRY_HINT}.",
                True,
            )
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"Google Drive is full ({reason}) while {action} {where}; free space on "
                f"Drive; {_RETRY_HINT}.",
                True,
            )
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return (
                f"Google Drive refused {action} {where} ({reason}); check that the Drive "
                "folder is writable and mounted read-write.",
                False,
            )
        return (f"Google Drive failed while {action} {where} ({reason}); {_RETRY_HINT}.", True)
    if isinstance(exc, PermissionError):
        return (
            f"could not read {exc.filename or local} ({exc.strerror}); make it readable by "
            "this process, then back up again.",
            False,
        )
    if isinstance(exc, FileNotFoundError):
        return (f"{exc.filename or local} disappeared during the copy; back up again.", True)
    assert isinstance(exc, OSError)
    return (
        f"local error on {exc.filename or local} ({exc.strerror or exc}) while {action} "
        f"{remote}; fix it and try again.",
        True,
    )
