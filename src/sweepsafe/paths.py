"""Tell whether a path lies on a Google Drive mount."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["COLAB_DRIVE_MOUNT", "DRIVE_ROOTS_ENV", "is_drive_path"]

COLAB_DRIVE_MOUNT = "/content/drive"
"""Where Colab mounts Google Drive by default (``drive.mount('/content/drive')``)."""

DRIVE_ROOTS_ENV = "SWEEPSAFE_DRIVE_ROOTS"
"""Environment variable: extra Drive roots, separated by ``os.pathsep``."""

# File-system types of Google Drive FUSE mounts: Colab's DriveFS, and the
# community google-drive-ocamlfuse that preemptible-VM users often run.
_DRIVE_FS_TYPES = frozenset({"fuse.drive", "fuse.drivefs", "fuse.google-drive-ocamlfuse"})

_MOUNTINFO_PATH = Path("/proc/self/mountinfo")


def is_drive_path(
    path: str | os.PathLike[str], *, drive_roots: Iterable[str | os.PathLike[str]] | None = None
) -> bool:
    """Return True when ``path`` lies on a Google Drive mount.

    A path counts as on Drive when, made absolute and with symlinks resolved as far
    as it exists, it is under ``/content/drive``, under a root in
    ``$SWEEPSAFE_DRIVE_ROOTS`` or ``drive_roots``, or under a mount point whose
    file-system type is a Google Drive FUSE mount. A path that does not exist yet is
    judged by its nearest existing parent. Never raises for a ``str`` or ``PathLike``.

    The purely textual check comes first, so a path spelled under a Drive root is
    answered without touching a possibly stalled mount.
    """
    roots = [*_configured_roots(drive_roots), *_fuse_drive_mounts()]
    lexical = os.path.abspath(os.fspath(path))
    if any(_is_within(lexical, os.path.abspath(root)) for root in roots):
        return True
    resolved = _realpath(lexical)
    return any(
        _is_within(resolved, root_path)
        for root in roots
        for root_path in {os.path.abspath(root), _realpath(os.path.abspath(root))}
    )


def _configured_roots(drive_roots: Iterable[str | os.PathLike[str]] | None) -> Iterator[str]:
    yield COLAB_DRIVE_MOUNT
    yield from (entry for entry in os.environ.get(DRIVE_ROOTS_ENV, "").split(os.pathsep) if entry)
    if drive_roots is not None:
        yield from (os.fspath(root) for root in drive_roots)


def _fuse_drive_mounts() -> Iterator[str]:
    """Mount points of Google Drive FUSE file systems, from the kernel's mount table."""
    try:
        text = _MOUNTINFO_PATH.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        # "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ..."
        fields, sep, rest = line.partition(" - ")
        if not sep:
            continue
        parts = fields.split()
        fs_type = rest.split(maxsplit=1)[0] if rest.strip() else ""
        if len(parts) >= 5 and fs_type in _DRIVE_FS_TYPES:
            yield _unescape_mount_point(parts[4])


def _unescape_mount_point(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as octal escapes.
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field


def _realpath(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError, RuntimeError):
        return path


def _is_within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False
