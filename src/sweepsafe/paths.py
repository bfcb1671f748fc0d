"""Where paths lie: on a Google Drive mount or not, inside a folder or not."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "COLAB_DRIVE_MOUNT",
    "DRIVE_ROOTS_ENV",
    "configured_drive_roots",
    "is_drive_path",
    "is_within",
    "safe_relative_path",
]

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
    roots = [*configured_drive_roots(drive_roots), *_fuse_drive_mounts()]
    lexical = os.path.abspath(os.fspath(path))
    if any(is_within(lexical, root) for root in roots):
        return True
    resolved = _realpath(lexical)
    return any(
        is_within(resolved, root_path) for root in roots for root_path in {root, _realpath(root)}
    )


def configured_drive_roots(
    drive_roots: Iterable[str | os.PathLike[str]] | None = None,
) -> list[str]:
    """The Drive roots known without asking the kernel: Colab's, the environment's, given.

    Absolute, in that order. Reading them touches no file system.
    """
    roots = [COLAB_DRIVE_MOUNT]
    roots.extend(entry for entry in os.environ.get(DRIVE_ROOTS_ENV, "").split(os.pathsep) if entry)
    if drive_roots is not None:
        roots.extend(os.fspath(root) for root in drive_roots)
    return [os.path.abspath(root) for root in roots]


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when ``path`` is ``root`` or lies under it, judged by spelling (absolute paths)."""
    path_text, root_text = os.path.abspath(path), os.path.abspath(root)
    try:
        return os.path.commonpath([path_text, root_text]) == root_text
    except ValueError:
        return False


def safe_relative_path(relative: str) -> str | None:
    """``relative`` if it is a plain relative POSIX path that stays inside its base, else None.

    Names read from Drive (a listing, a record) pass through here before they become
    local paths: an absolute path, ``..``, an empty or ``.`` component, a NUL or a
    backslash is refused, so nothing on Drive can point outside the folder it belongs to.
    """
    if not relative or relative.startswith("/") or "\\" in relative or "\0" in relative:
        return None
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return relative


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
