"""The helper process that makes every Drive-side system call for a DriveStore.

A stalled Google Drive FUSE mount blocks a thread that writes to it in the kernel,
uninterruptibly, and keeps its process from exiting. So the store never touches
Drive from its own process: it talks to this helper over pipes, gives every request
a deadline, and abandons (SIGKILLs, never waits for) a helper that misses one.

This file imports only the standard library and is started by file path
(``python _drive_helper.py``), so a new helper costs one bare interpreter start and
never imports sweepsafe or Optuna.

Protocol: each message is a frame ``>II`` (header length, payload length), a JSON
header and raw payload bytes. The store sends one request and reads one reply.
A reply header has ``"ok": true`` and the result fields, or ``"ok": false`` with
``errno``, ``error`` and ``path``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import stat as stat_module
import struct
import sys
from collections.abc import Callable
from typing import Any

FRAME_PREFIX = struct.Struct(">II")
SQLITE_HEADER = b"SQLite format 3\x00"
TEMP_MARKER = ".sweepsafe-tmp-"
"""Every temporary file sweepsafe writes is named ``.{name}.sweepsafe-tmp-{random}``."""

_CHUNK = 8 << 20

Header = dict[str, Any]


def encode_frame(header: Header, payload: bytes = b"") -> bytes:
    """One protocol frame: length prefix, JSON header, payload."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return FRAME_PREFIX.pack(len(raw), len(payload)) + raw + payload


def temp_name_for(name: str, token: str) -> str:
    """The temporary name under which ``name`` is written before it replaces the target."""
    return f".{name}{TEMP_MARKER}{token}"


def is_temp_name(name: str) -> bool:
    """True for a sweepsafe temporary (left behind by a killed or failed copy)."""
    return name.startswith(".") and TEMP_MARKER in name


def inspect_sqlite(path: str) -> Header:
    """Integrity and, for an Optuna study, trial counts per state and study names."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        rows = connection.execute("PRAGMA integrity_check").fetchall()
        integrity_ok = [tuple(row) for row in rows] == [("ok",)]
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        counts: dict[str, int] = {}
        names: list[str] = []
        if integrity_ok and {"trials", "studies"} <= tables:
            counts = {
                str(state): int(count)
                for state, count in connection.execute(
                    "SELECT state, COUNT(*) FROM trials GROUP BY state"
                )
            }
            names = [
                str(row[0])
                for row in connection.execute("SELECT study_name FROM studies ORDER BY study_id")
            ]
    finally:
        connection.close()
    return {"integrity_ok": integrity_ok, "trial_counts": counts, "study_names": names}


def transfer(source_fd: int, destination_fd: int, offset: int, length: int) -> int:
    """Copy ``length`` bytes from ``offset`` of one file to the current end of another.

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
    _write_all(destination_fd, data)
    return len(data)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_directory(path: str) -> None:
    """Make a rename in ``path`` durable, where the file system allows it."""
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


class FaultHooks:
    """Where a stand-in helper injects faults; the real helper injects none."""

    def before(self, op: str, path: str) -> None:
        """Called before each Drive-side operation."""

    def on_write(self, path: str, nbytes: int) -> None:
        """Called before each chunk written to a Drive-side file."""

    def on_commit(self, path: str) -> None:
        """Called before a Drive-side file replaces its target."""


class DriveServer:
    """Serves the store's requests against the real file system."""

    def __init__(self, hooks: FaultHooks | None = None) -> None:
        self._hooks = hooks or FaultHooks()
        self._open: dict[str, tuple[int, str, str]] = {}  # handle -> (fd, temp, destination)
        self._sources: dict[str, int] = {}

    def handle(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        op = str(header.get("op", ""))
        method: Callable[[Header, bytes], tuple[Header, bytes]] | None = getattr(
            self, f"op_{op}", None
        )
        if method is None:
            return {"ok": False, "errno": errno.EINVAL, "error": f"unknown op {op!r}"}, b""
        try:
            reply, data = method(header, payload)
        except OSError as exc:
            return {
                "ok": False,
                "errno": exc.errno or errno.EIO,
                "error": exc.strerror or str(exc),
                "path": exc.filename or header.get("path"),
            }, b""
        except sqlite3.DatabaseError as exc:
            return {"ok": False, "errno": 0, "sqlite": True, "error": str(exc)}, b""
        reply["ok"] = True
        return reply, data

    # -- writing a file on Drive ------------------------------------------------------
    def op_ping(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        return {"pid": os.getpid()}, b""

    def op_open(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Create the temporary for ``path``; with ``clean``, remove its stray temporaries."""
        destination = str(header["path"])
        self._hooks.before("open", destination)
        folder, name = os.path.split(destination)
        _make_folder(folder, header.get("anchor"))
        removed = 0
        if header.get("clean"):
            removed = _remove_strays(folder, {name}, header)
        temp = os.path.join(folder, temp_name_for(name, str(header["token"])))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._open[str(header["handle"])] = (fd, temp, destination)
        return {"temp": temp, "stray_removed": removed}, b""

    def op_write(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        fd, temp, _ = self._open[str(header["handle"])]
        self._hooks.on_write(temp, len(payload))
        _write_all(fd, payload)
        return {"written": len(payload)}, b""

    def op_copy(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Append ``length`` bytes at ``offset`` of the local file ``source``."""
        fd, temp, _ = self._open[str(header["handle"])]
        source = str(header["source"])
        self._hooks.on_write(temp, int(header["length"]))
        source_fd = self._sources.get(source)
        if source_fd is None:
            source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            self._sources[source] = source_fd
        copied = transfer(source_fd, fd, int(header["offset"]), int(header["length"]))
        return {"copied": copied}, b""

    def op_commit(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """fsync the temporary and atomically replace the destination with it."""
        handle = str(header["handle"])
        fd, temp, destination = self._open[handle]
        self._hooks.on_commit(destination)
        try:
            _check_source_unchanged(header)
            os.fsync(fd)
            self._forget(handle)
            os.replace(temp, destination)
        except OSError:
            if handle in self._open:
                self._forget(handle)
            with contextlib.suppress(OSError):  # the mount may be failing as a whole
                os.remove(temp)
            raise
        fsync_directory(os.path.dirname(destination))
        return {"size": os.stat(destination).st_size}, b""

    def op_put(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """``open``, ``copy`` and ``commit`` in one request (a small file)."""
        self.op_open(header, b"")
        try:
            reply, _ = self.op_copy(header, b"")
            self.op_commit(header, b"")
        except BaseException:
            self.op_abort(header, b"")
            raise
        return {"copied": reply["copied"]}, b""

    def op_abort(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        handle = str(header["handle"])
        entry = self._open.get(handle)
        if entry is not None:
            self._forget(handle)
            _remove_quietly(entry[1])
        return {}, b""

    def _forget(self, handle: str) -> None:
        fd, _, _ = self._open.pop(handle)
        os.close(fd)
        for source_fd in self._sources.values():
            os.close(source_fd)
        self._sources.clear()

    # -- other Drive-side operations -----------------------------------------------------
    def op_remove(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        paths = [str(path) for path in header["paths"]]
        for path in paths:
            self._hooks.before("remove", path)
            _remove_quietly(path)
        return {"removed": len(paths)}, b""

    def op_clean(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Remove the stray temporaries of the files ``names`` in the folder ``path``."""
        folder = str(header["path"])
        self._hooks.before("clean", folder)
        names = {str(name) for name in header["names"]}
        try:
            removed = _remove_strays(folder, names, header)
        except FileNotFoundError:
            removed = 0
        return {"removed": removed}, b""

    def op_read(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """The content of a small Drive file (at most 64 KiB), or that it does not exist."""
        path = str(header["path"])
        self._hooks.before("read", path)
        try:
            with open(path, "rb") as file:
                data = file.read(64 * 1024)
        except (FileNotFoundError, NotADirectoryError):
            return {"exists": False}, b""
        return {"exists": True}, data

    def op_mkdir(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        path = str(header["path"])
        self._hooks.before("mkdir", path)
        _make_folder(path, header.get("anchor"))
        return {}, b""

    def op_stat(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        path = str(header["path"])
        self._hooks.before("stat", path)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return {"exists": False}, b""
        return {
            "exists": True,
            "is_dir": stat_module.S_ISDIR(info.st_mode),
            "size": info.st_size,
            "mtime": info.st_mtime,
        }, b""

    def op_scan(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Every file under a folder, as relative POSIX paths with sizes; temps apart."""
        root = str(header["path"])
        self._hooks.before("scan", root)
        if not os.path.isdir(root):
            return {"exists": False, "files": [], "temps": []}, b""
        files: list[list[object]] = []
        temps: list[str] = []
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if is_temp_name(name):
                    temps.append(rel)
                elif os.path.isfile(full) and not os.path.islink(full):
                    files.append([rel, os.stat(full).st_size])
        return {"exists": True, "files": files, "temps": temps}, b""

    def op_pull(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Copy the Drive file ``path`` into the local file ``target`` (already created)."""
        source = str(header["path"])
        self._hooks.before("read", source)
        source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(source_fd).st_size
            target_fd = os.open(str(header["target"]), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                copied = transfer(source_fd, target_fd, 0, size)
                os.fsync(target_fd)
            finally:
                os.close(target_fd)
        finally:
            os.close(source_fd)
        return {"copied": copied}, b""

    def op_inspect(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Size, mtime, and for an SQLite file its integrity and Optuna contents."""
        path = str(header["path"])
        self._hooks.before("inspect", path)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return {"exists": False}, b""
        if stat_module.S_ISDIR(info.st_mode):
            return {"exists": True, "mtime": info.st_mtime, "is_sqlite": False}, b""
        with open(path, "rb") as file:
            is_sqlite = file.read(len(SQLITE_HEADER)) == SQLITE_HEADER
        reply: Header = {
            "exists": True,
            "size": info.st_size,
            "mtime": info.st_mtime,
            "is_sqlite": is_sqlite,
        }
        if is_sqlite:
            try:
                reply.update(inspect_sqlite(path))
            except sqlite3.DatabaseError as exc:
                reply.update(integrity_ok=False, sqlite_error=str(exc))
        return reply, b""


def _remove_strays(folder: str, names: set[str], header: Header) -> int:
    """Remove temporaries of ``names`` left by dead runtimes or abandoned copies.

    A temporary whose token starts with ``own_tag`` belongs to this runtime and may be
    a concurrent copy in flight: it goes only if listed in ``abandoned``.
    """
    own_tag = str(header.get("own_tag") or "")
    abandoned = {str(path) for path in header.get("abandoned", ())}
    removed = 0
    for entry in os.listdir(folder):
        if not is_temp_name(entry):
            continue
        target, _, token = entry[1:].partition(TEMP_MARKER)
        path = os.path.join(folder, entry)
        ours = bool(own_tag) and token.startswith(own_tag)
        if target in names and (not ours or path in abandoned):
            _remove_quietly(path)
            removed += 1
    return removed


def _make_folder(folder: str, anchor: object) -> None:
    """Create ``folder`` and its parents, but never above the existing folder ``anchor``.

    When Drive is not mounted its mount point is an ordinary local folder; creating
    the missing ``MyDrive/...`` there would silently put the "backup" on local disk.
    """
    if os.path.isdir(folder):
        return
    if isinstance(anchor, str) and not os.path.isdir(anchor):
        raise FileNotFoundError(
            errno.ENOENT, "the Drive folder is missing; is Google Drive mounted?", anchor
        )
    os.makedirs(folder, exist_ok=True)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _read_exactly(fd: int, count: int) -> bytes | None:
    parts: list[bytes] = []
    remaining = count
    while remaining:
        part = os.read(fd, remaining)
        if not part:
            return None
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def serve(hooks: FaultHooks | None = None) -> int:
    """Answer requests on stdin until it closes."""
    # Ctrl-C in a notebook or terminal must not kill a helper mid-write; the store
    # decides when a helper ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = DriveServer(hooks)
    inbound, outbound = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        prefix = _read_exactly(inbound, FRAME_PREFIX.size)
        if prefix is None:
            return 0
        header_length, payload_length = FRAME_PREFIX.unpack(prefix)
        raw = _read_exactly(inbound, header_length)
        payload = _read_exactly(inbound, payload_length) if payload_length else b""
        if raw is None or payload is None:
            return 0
        reply, data = server.handle(json.loads(raw), payload)
        _write_all(outbound, encode_frame(reply, data))


SOURCE_CHANGED_ERRNO = errno.EAGAIN
"""The errno of a commit refused because its local source changed during the copy."""


def _check_source_unchanged(header: Header) -> None:
    """Refuse to commit a copy whose local source changed while it was being copied.

    A file being rewritten during its copy would otherwise reach Drive half old, half
    new, and replace the last good copy there.
    """
    expect = header.get("expect")
    if expect is None:
        return
    source = str(header["source"])
    info = os.stat(source)
    if [info.st_size, info.st_mtime_ns] != list(expect):
        raise OSError(SOURCE_CHANGED_ERRNO, "the file changed while it was being copied", source)


if __name__ == "__main__":
    sys.exit(serve())
