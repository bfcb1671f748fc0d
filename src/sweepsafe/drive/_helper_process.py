"""The helper process that makes every Drive-side system call for a DriveStore.

A stalled Google Drive FUSE mount blocks a thread that touches it in the kernel,
uninterruptibly, and keeps its process from exiting. So the store never touches Drive
from its own process: it talks to this helper over pipes, gives every request a
deadline, and abandons (SIGKILLs, never waits for) a helper that misses one.

This file imports only the standard library and is started by file path
(``python -I _helper_process.py``), so a new helper costs one bare interpreter start and
never imports sweepsafe or Optuna. What both sides share lives in modules beside it,
also standard library only: the wire format (``_helper_wire``), reserved names
(``_reserved_names``), reading a database (``_sqlite_inspect``) and copying bytes
(``_fs_primitives``). Run by path, this file imports them from its own folder.

Protocol: see ``_helper_wire``. A request header names its ``op``; each op is a
``DriveServer.op_*`` method.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sqlite3
import stat as stat_module
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING or __package__:
    # Imported as sweepsafe.drive._helper_process (the client needs this file's path).
    from sweepsafe.drive._fs_primitives import (
        _clear_way,
        _kind,
        _make_folder,
        _remove_entry,
        _remove_quietly,
        _sha256_of,
        fsync_directory,
        transfer,
        walk_files,
        write_all,
    )
    from sweepsafe.drive._helper_wire import (
        FRAME_PREFIX,
        SMALL_READ_LIMIT,
        Header,
        _read_exactly,
        encode_frame,
    )
    from sweepsafe.drive._reserved_names import STATE_DIR_NAME, TEMP_PREFIX, is_temp_name, temp_name
    from sweepsafe.drive._sqlite_inspect import (
        inspect_sqlite,
        inspect_sqlite_rolled_back,
        is_sqlite_file,
    )
else:
    # Run by file path in an isolated interpreter (``-I``), whose sys.path does not hold
    # the script's folder: the siblings are imported from it as top-level modules.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _fs_primitives import (
        _clear_way,
        _kind,
        _make_folder,
        _remove_entry,
        _remove_quietly,
        _sha256_of,
        fsync_directory,
        transfer,
        walk_files,
        write_all,
    )
    from _helper_wire import FRAME_PREFIX, SMALL_READ_LIMIT, Header, _read_exactly, encode_frame
    from _reserved_names import STATE_DIR_NAME, TEMP_PREFIX, is_temp_name, temp_name
    from _sqlite_inspect import inspect_sqlite, inspect_sqlite_rolled_back, is_sqlite_file


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
        self._source_fd: tuple[str, int] | None = None

    def handle(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Run one request; an OSError becomes an error reply."""
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

    # -- writing a file on Drive --------------------------------------------------------
    def op_open(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Create the temporary for ``path``, replacing a folder or file in the way."""
        destination = str(header["path"])
        self._hooks.before("open", destination)
        folder = os.path.dirname(destination)
        _make_folder(folder, header.get("anchor"))
        temp = os.path.join(folder, temp_name(str(header["token"])))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._open[str(header["handle"])] = (fd, temp, destination)
        return {"temp": temp}, b""

    def op_write(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Append the payload to an open temporary."""
        fd, temp, _ = self._open[str(header["handle"])]
        self._hooks.on_write(temp, len(payload))
        write_all(fd, payload)
        return {"written": len(payload)}, b""

    def op_copy(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Append ``length`` bytes at ``offset`` of the local file ``source``."""
        fd, temp, _ = self._open[str(header["handle"])]
        source = str(header["source"])
        self._hooks.on_write(temp, int(header["length"]))
        if self._source_fd is None or self._source_fd[0] != source:
            self._close_source()
            self._source_fd = (source, os.open(source, os.O_RDONLY | os.O_CLOEXEC))
        copied = transfer(self._source_fd[1], fd, int(header["offset"]), int(header["length"]))
        return {"copied": copied}, b""

    def op_commit(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """fsync the temporary and atomically replace the destination with it."""
        handle = str(header["handle"])
        fd, temp, destination = self._open[handle]
        self._hooks.on_commit(destination)
        try:
            os.fsync(fd)
            self._forget(handle)
            _clear_way(destination)
            os.replace(temp, destination)
        except OSError:
            if handle in self._open:
                self._forget(handle)
            with contextlib.suppress(OSError):  # the mount may be failing as a whole
                os.remove(temp)
            raise
        if header.get("sync_folder", True):
            fsync_directory(os.path.dirname(destination))
        return {"size": os.stat(destination).st_size}, b""

    def op_put(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """``open``, ``copy`` (or ``write`` of the payload) and ``commit`` in one request."""
        self.op_open(header, b"")
        try:
            if "source" in header:
                reply, _ = self.op_copy(header, b"")
                copied = int(reply["copied"])
            else:
                self.op_write(header, payload)
                copied = len(payload)
            self.op_commit(header, b"")
        except BaseException:
            self.op_abort(header, b"")
            raise
        return {"copied": copied}, b""

    def op_abort(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Drop an open temporary."""
        handle = str(header["handle"])
        entry = self._open.get(handle)
        if entry is not None:
            self._forget(handle)
            _remove_quietly(entry[1])
        return {}, b""

    def _forget(self, handle: str) -> None:
        fd, _, _ = self._open.pop(handle)
        os.close(fd)
        self._close_source()

    def _close_source(self) -> None:
        if self._source_fd is not None:
            os.close(self._source_fd[1])
            self._source_fd = None

    # -- other Drive-side operations -----------------------------------------------------
    def op_sync_folders(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """fsync folders whose renames were not synced one by one."""
        for folder in header["folders"]:
            self._hooks.before("sync", str(folder))
            fsync_directory(str(folder))
        return {}, b""

    def op_remove(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Remove files or whole folders; missing ones are fine."""
        paths = [str(path) for path in header["paths"]]
        for path in paths:
            self._hooks.before("remove", path)
            _remove_entry(path)
        return {"removed": len(paths)}, b""

    def op_clean(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Remove stray temporaries from the folder ``path``.

        A temporary whose token starts with ``own_tag`` belongs to this runtime and may be
        a concurrent copy in flight: it goes only if listed in ``abandoned``.
        """
        folder = str(header["path"])
        self._hooks.before("clean", folder)
        own_tag = str(header.get("own_tag") or "")
        abandoned = {str(name) for name in header.get("abandoned", ())}
        removed = 0
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return {"removed": 0}, b""
        for name in names:
            if not is_temp_name(name):
                continue
            ours = bool(own_tag) and name[len(TEMP_PREFIX) :].startswith(own_tag)
            if not ours or name in abandoned:
                _remove_quietly(os.path.join(folder, name))
                removed += 1
        return {"removed": removed}, b""

    def op_read(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """The content of a small Drive file, or that it does not exist."""
        path = str(header["path"])
        limit = min(int(header.get("limit", SMALL_READ_LIMIT)), SMALL_READ_LIMIT)
        data = self._read_small(path, limit, bool(header.get("head")))
        return ({"exists": False}, b"") if data is None else ({"exists": True}, data)

    def op_read_many(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Several small Drive files in one round trip: their sizes (-1: missing), bytes."""
        limit = min(int(header.get("limit", SMALL_READ_LIMIT)), SMALL_READ_LIMIT)
        found = [self._read_small(str(path), limit, False) for path in header["paths"]]
        sizes = [-1 if data is None else len(data) for data in found]
        return {"sizes": sizes}, b"".join(data for data in found if data is not None)

    def _read_small(self, path: str, limit: int, head: bool) -> bytes | None:
        self._hooks.before("read", path)
        try:
            with open(path, "rb") as file:
                data = file.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(data) > limit:
            if not head:
                raise OSError(errno.EFBIG, f"larger than the {limit} bytes expected", path)
            data = data[:limit]
        return data

    def op_stat(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Whether ``path`` exists, what it is, its size and modification time."""
        path = str(header["path"])
        self._hooks.before("stat", path)
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return {"exists": False}, b""
        return {
            "exists": True,
            "kind": _kind(info.st_mode),
            "size": info.st_size,
            "mtime": info.st_mtime,
        }, b""

    def op_listdir(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """The entries of one folder: ``[name, kind, size, mtime]``, temporaries apart."""
        folder = str(header["path"])
        self._hooks.before("list", folder)
        entries: list[list[object]] = []
        temps: list[str] = []
        try:
            with os.scandir(folder) as found:
                for entry in found:
                    if is_temp_name(entry.name):
                        temps.append(entry.name)
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        info = entry.stat(follow_symlinks=False)
                        entries.append(
                            [entry.name, _kind(info.st_mode), info.st_size, info.st_mtime]
                        )
        except (FileNotFoundError, NotADirectoryError):
            return {"exists": False, "entries": [], "temps": []}, b""
        return {"exists": True, "entries": entries, "temps": temps}, b""

    def op_scan(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Every file under a folder: relative POSIX path and size; temporaries apart.

        sweepsafe's own ``.sweepsafe`` folders are not entered.
        """
        root = str(header["path"])
        self._hooks.before("scan", root)
        if not os.path.isdir(root):
            return {"exists": False, "files": [], "temps": []}, b""
        files: list[list[object]] = []
        temps: list[str] = []
        for rel, name, info in walk_files(root, skip=STATE_DIR_NAME):
            if is_temp_name(name):
                temps.append(rel)
            elif stat_module.S_ISREG(info.st_mode):
                files.append([rel, info.st_size])
        return {"exists": True, "files": files, "temps": temps}, b""

    def op_pull(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Copy the Drive file ``path`` into the local file ``target`` (already created)."""
        source = str(header["path"])
        self._hooks.before("read", source)
        source_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            info = os.fstat(source_fd)
            if not stat_module.S_ISREG(info.st_mode):
                raise OSError(errno.EISDIR, "not a regular file", source)
            target_fd = os.open(str(header["target"]), os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                copied = transfer(source_fd, target_fd, 0, info.st_size)
                os.fsync(target_fd)
            finally:
                os.close(target_fd)
        finally:
            os.close(source_fd)
        return {"copied": copied}, b""

    def op_inspect(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Size, mtime, and for an SQLite file its integrity and Optuna studies."""
        path = str(header["path"])
        self._hooks.before("inspect", path)
        try:
            info = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return {"exists": False}, b""
        reply: Header = {
            "exists": True,
            "kind": _kind(info.st_mode),
            "size": info.st_size,
            "mtime": info.st_mtime,
        }
        if not stat_module.S_ISREG(info.st_mode):
            return reply, b""
        reply["is_sqlite"] = is_sqlite_file(path)
        if header.get("hash"):
            reply["sha256"] = _sha256_of(path)
        if reply["is_sqlite"]:
            try:
                reply.update(inspect_sqlite(path))
            except sqlite3.DatabaseError as exc:
                try:
                    rolled_back = inspect_sqlite_rolled_back(path)
                except (OSError, sqlite3.DatabaseError):
                    rolled_back = None
                if rolled_back is not None:
                    reply.update(rolled_back)
                else:
                    reply["integrity_problem"] = f"it cannot be read as a database ({exc})"
        return reply, b""


def serve(hooks: FaultHooks | DriveServer | None = None) -> int:
    """Answer requests on stdin until it closes, with a real-file-system server obeying
    ``hooks``, or with the given server."""
    # Ctrl-C in a notebook or terminal must not kill a helper mid-write; the store
    # decides when a helper ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = hooks if isinstance(hooks, DriveServer) else DriveServer(hooks)
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
        write_all(outbound, encode_frame(reply, data))


if __name__ == "__main__":
    sys.exit(serve())
