"""Turn a failed copy into one sentence for the user, and whether retrying may help.

Drive-side failures (raised in the helper) and local ones (this process's disk) are
told apart by type, so a sentence never blames the wrong side.
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
from pathlib import Path
from typing import TYPE_CHECKING

from sweepsafe.drive._drive_errors import DriveOSError, DriveTimeout, HelperGone
from sweepsafe.drive._files import NotARegularFile
from sweepsafe.drive._reserved_names import TEMP_PREFIX
from sweepsafe.drive._sqlite import SnapshotError
from sweepsafe.drive._unit import TrialFilesHeldBack
from sweepsafe.errors import LeaseHeldError, StudyConflictError

if TYPE_CHECKING:
    from sweepsafe.drive._folder_job import EntryProblem

__all__ = ["explain_failure", "source_problem", "summarize_problems"]

_RETRY_HINT = "the previous Drive copy is unchanged and trying again may succeed"


def source_problem(source: Path, is_directory: bool) -> str | None:
    """Why ``source`` cannot be backed up as asked, or None. Blocking (one ``stat``)."""
    try:
        info = os.stat(source)
    except FileNotFoundError:
        return f"{source} does not exist, so it was not backed up; check the path."
    except PermissionError:
        return f"{source} cannot be read (permission denied); make it readable, then back up."
    except NotADirectoryError:
        return f"{source} does not exist (a part of its path is a file); check the path."
    if stat_module.S_ISDIR(info.st_mode):
        return (
            None if is_directory else (f"{source} is a folder; back it up with is_directory=True.")
        )
    if stat_module.S_ISREG(info.st_mode):
        return (
            f"{source} is a file, not a folder; back it up with is_directory=False."
            if is_directory
            else None
        )
    return f"{source} is not a regular file (a FIFO, socket or device), so it cannot be copied."


def _where(exc: DriveOSError, remote: Path) -> str:
    """The Drive path a failure concerns: the file a temporary was for, else the path."""
    name = exc.filename or ""
    if not name or os.path.basename(str(name)).startswith(TEMP_PREFIX):
        return str(remote)
    return str(name)


def explain_failure(exc: BaseException, local: Path, action: str, remote: Path) -> tuple[str, bool]:
    """One sentence for a failed copy (``action``: writing, reading, checking) and whether
    retrying may help."""
    if isinstance(exc, (LeaseHeldError, StudyConflictError)):
        return f"{str(exc)[0].upper()}{str(exc)[1:]}", False
    if isinstance(exc, TrialFilesHeldBack):
        return (
            f"{local} was not copied to Drive yet: {exc}; the database waits so that Drive "
            "never lists a finished trial without its files, and it is tried again.",
            True,
        )
    place = getattr(exc, "place", None)
    if place is not None and isinstance(exc, (DriveTimeout, DriveOSError, HelperGone)):
        return _explain_object_store_error(exc, place, action, remote)
    if isinstance(exc, DriveTimeout):
        return (
            f"Google Drive did not answer within {exc.timeout:g} s while {action} "
            f"{exc.path}; the mount may be stalled, so sweepsafe abandoned that attempt "
            f"({_RETRY_HINT} once Drive responds; remount Drive if it persists).",
            True,
        )
    if isinstance(exc, NotARegularFile):
        return (
            f"{local} is not a regular file (a FIFO, socket or device), so it cannot be copied.",
            False,
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
    if isinstance(exc, DriveOSError):
        return _explain_drive_error(exc, action, remote)
    if isinstance(exc, OSError):
        return _explain_local_error(exc, local, action)
    raise exc  # a bug, not a Drive or disk problem: let it show


def _explain_drive_error(exc: DriveOSError, action: str, remote: Path) -> tuple[str, bool]:
    where = _where(exc, remote)
    reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
    if exc.errno == errno.ENOTCONN:
        return (
            f"Google Drive is not connected ({reason}) while {action} {where}; remount it "
            f"(drive.mount('/content/drive', force_remount=True)); {_RETRY_HINT}.",
            True,
        )
    if exc.errno == errno.ENOENT:
        return (
            f"{where} is missing on Google Drive while {action} {remote}; check that Drive "
            f"is mounted; {_RETRY_HINT}.",
            True,
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"Google Drive is full ({reason}) while {action} {where}; free space on Drive; "
            f"{_RETRY_HINT}.",
            True,
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"Google Drive refused {action} {where} ({reason}); check that the Drive folder "
            "is writable and mounted read-write.",
            False,
        )
    if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
        return (
            f"Google Drive refused the name {where} ({reason}); rename it. Trying again "
            "will not help.",
            False,
        )
    return (f"Google Drive failed while {action} {where} ({reason}); {_RETRY_HINT}.", True)


def _explain_object_store_error(
    exc: DriveTimeout | OSError, place: str, action: str, remote: Path
) -> tuple[str, bool]:
    """The sentence of a failure of an object store: the helper already worded the cause
    (its errors carry the object's URL as their path)."""
    hint = "the previous copy is unchanged and trying again may succeed"
    if isinstance(exc, DriveTimeout):
        return (
            f"the object store {place} did not answer within {exc.timeout:g} s while "
            f"{action} {remote.name}; sweepsafe abandoned that attempt ({hint}; check the "
            "endpoint and the network if it persists).",
            True,
        )
    if isinstance(exc, HelperGone):
        return (
            f"the object-store helper process for {place} ended unexpectedly while "
            f"{action} {remote.name}; {hint}.",
            True,
        )
    where = exc.filename or place
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOSYS):
        return f"{where}: {reason}. Trying again will not help until that is fixed.", False
    if exc.errno == errno.ENOENT and "bucket" in reason:
        return f"{place}: {reason}. Nothing was copied.", False
    if exc.errno == errno.ECONNREFUSED:
        return f"{place}: {reason}; {hint}.", True
    return f"the object store failed while {action} {where} ({reason}); {hint}.", True


def _explain_local_error(exc: OSError, local: Path, action: str) -> tuple[str, bool]:
    where = exc.filename or local
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"the local disk is full ({where}): sweepsafe needs room there for a snapshot "
            "before it copies to Drive; free space on the local disk. Nothing on Drive "
            "changed, and it is tried again.",
            True,
        )
    if isinstance(exc, PermissionError):
        return (
            f"could not read {where} ({exc.strerror}); make it readable by this process, "
            "then back up again.",
            False,
        )
    if isinstance(exc, FileNotFoundError):
        return (f"{where} disappeared while {action} it; back up again.", True)
    return (
        f"the local disk failed on {where} ({exc.strerror or exc}) while {action}; check "
        "the disk, then back up again.",
        True,
    )


def summarize_problems(
    problems: tuple[EntryProblem, ...], folder: Path, destination: Path, total: int
) -> tuple[str, bool]:
    """One sentence naming the entries of ``folder`` that did not reach ``destination``
    on Drive, and whether a retry may help."""
    shown = "; ".join(str(problem) for problem in problems[:3])
    more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
    retryable = any(problem.retryable for problem in problems)
    tail = (
        "the others were copied, and these are tried again"
        if retryable
        else "the others were copied; trying again will not help these"
    )
    return (
        f"{len(problems)} of {total} entries of {folder} did not reach {destination} on "
        f"Google Drive: {shown}{more}; {tail}.",
        retryable,
    )
