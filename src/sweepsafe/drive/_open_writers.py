"""Whether any process holds a file open for writing, from ``/proc``.

A file that stays unchanged for a moment is usually between two versions, but not
always: a writer can stall in the middle of a version (descheduled on a busy machine,
waiting on a GPU copy between two tensors) and leave a torn file unchanged for as long
as it stalls. A writer that still holds the file open for writing tells these apart.

Linux only; elsewhere, or for processes whose ``/proc`` entries this user may not read,
the answer is "not seen", and the caller falls back on the file's quiet time alone.
"""

from __future__ import annotations

import os

__all__ = ["open_for_writing"]

_PROC = "/proc"
_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)


def open_for_writing(info: os.stat_result, name: str) -> bool:
    """Whether some process holds the file ``info`` describes (named ``name``) open for
    writing. Cheap enough to ask once per capture: one ``readlink`` per open descriptor
    of the processes this user can see, and a ``stat`` only for those ending in ``name``.
    """
    try:
        pids = [entry for entry in os.listdir(_PROC) if entry.isdigit()]
    except OSError:
        return False
    for pid in pids:
        folder = f"{_PROC}/{pid}/fd"
        try:
            descriptors = os.listdir(folder)
        except OSError:  # gone, or another user's
            continue
        for fd in descriptors:
            if _writes_to(f"{_PROC}/{pid}", fd, info, name):
                return True
    return False


def _writes_to(process: str, fd: str, info: os.stat_result, name: str) -> bool:
    try:
        target = os.readlink(f"{process}/fd/{fd}")
        if not target.endswith(name):
            return False
        opened = os.stat(f"{process}/fd/{fd}")
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            return False
        with open(f"{process}/fdinfo/{fd}", encoding="ascii") as fdinfo:
            for line in fdinfo:
                if line.startswith("flags:"):
                    return (int(line.split()[1], 8) & os.O_ACCMODE) in _WRITE_MODES
    except (OSError, ValueError, IndexError):
        pass
    return False
