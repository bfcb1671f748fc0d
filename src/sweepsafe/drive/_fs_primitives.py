"""File-system steps of the Drive helper: copying bytes, durable renames, making way.

Copying a byte range uses ``copy_file_range`` or ``sendfile`` where the kernel offers
them. The store uses the same copying and ``fsync_directory`` for its local files.
Standard library only: the Drive helper process, run by file path, imports this module
from its own folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat as stat_module
from collections.abc import Iterator

__all__ = ["fsync_directory", "process_alive", "transfer", "walk_files", "write_all"]

_CHUNK = 8 << 20


def transfer(source_fd: int, destination_fd: int, offset: int, length: int) -> int:
    """Append ``length`` bytes from ``offset`` of one file to the current end of another.

    Uses ``copy_file_range`` or ``sendfile`` where the kernel offers them across these
    two file systems, else reads and writes in chunks. Returns the bytes copied (fewer
    if the source is shorter).
    """
    copied = 0
    while copied < length:
        wanted = min(_CHUNK, length - copied)
        done = _copy_range(source_fd, destination_fd, offset + copied, wanted)
        if done == 0:
            break
        copied += done
    return copied


_fast_copy_works = {"copy_file_range": hasattr(os, "copy_file_range"), "sendfile": True}


def _copy_range(source_fd: int, destination_fd: int, offset: int, count: int) -> int:
    if _fast_copy_works["copy_file_range"]:
        try:
            return os.copy_file_range(source_fd, destination_fd, count, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            _fast_copy_works["copy_file_range"] = False
    if _fast_copy_works["sendfile"]:
        try:
            return os.sendfile(destination_fd, source_fd, offset, count)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            _fast_copy_works["sendfile"] = False
    data = os.pread(source_fd, count, offset)
    write_all(destination_fd, data)
    return len(data)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data``."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_directory(path: str) -> None:
    """Make renames in ``path`` durable, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        # FUSE mounts and some network file systems refuse fsync on a directory.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _kind(mode: int) -> str:
    if stat_module.S_ISREG(mode):
        return "file"
    if stat_module.S_ISDIR(mode):
        return "dir"
    return "other"


def _clear_way(destination: str) -> None:
    """Remove a folder (or other non-file) where a file is about to be committed."""
    try:
        info = os.lstat(destination)
    except FileNotFoundError:
        return
    if not stat_module.S_ISREG(info.st_mode):
        _remove_entry(destination)


def _make_folder(folder: str, anchor: object) -> None:
    """Create ``folder`` and its parents, but never above the existing folder ``anchor``.

    When Drive is not mounted its mount point is an ordinary local folder; creating the
    missing ``MyDrive/...`` there would silently put the "backup" on local disk. A file
    standing where a folder is needed (a local file that became a folder) is replaced.
    """
    if os.path.isdir(folder):
        return
    if isinstance(anchor, str) and not os.path.isdir(anchor):
        raise FileNotFoundError(
            errno.ENOENT, "the Drive folder is missing; is Google Drive mounted?", anchor
        )
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        # Some ancestor is a file: the local side turned that file into a folder.
        probe = folder
        while probe and not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        if probe and not os.path.isdir(probe):
            if isinstance(anchor, str) and not _below(probe, os.path.join(anchor, "")):
                # The store's own root (or above) is not a file the local side wrote.
                raise NotADirectoryError(
                    errno.ENOTDIR, "a file stands where the Drive folder should be", probe
                ) from None
            _remove_entry(probe)
        os.makedirs(folder, exist_ok=True)


def _below(path: str, folder: str) -> bool:
    """``path`` is at least two levels under ``folder`` (below a folder made in it)."""
    rel = os.path.relpath(path, folder)
    return not rel.startswith("..") and rel.count(os.sep) >= 1


def _remove_entry(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat_module.S_ISDIR(info.st_mode):
        _remove_quietly(path)
        return
    for folder, dirs, names in os.walk(path, topdown=False):
        for name in names:
            _remove_quietly(os.path.join(folder, name))
        for name in dirs:
            if os.path.islink(os.path.join(folder, name)):
                _remove_quietly(os.path.join(folder, name))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(folder)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def walk_files(root: str, *, skip: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative POSIX path, name, lstat) of every non-folder under ``root``, depth first.

    Folders named ``skip`` are not entered.
    """
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            with os.scandir(folder) as entries:
                found = list(entries)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in found:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            rel = prefix + entry.name
            if stat_module.S_ISDIR(info.st_mode):
                if entry.name != skip:
                    pending.append((entry.path, rel + "/"))
                continue
            yield rel, entry.name, info


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
