"""The helper process that makes every Drive-side system call for a DriveStore.

A stalled Google Drive FUSE mount blocks a thread that touches it in the kernel,
uninterruptibly, and keeps its process from exiting. So the store never touches Drive
from its own process: it talks to this helper over pipes, gives every request a
deadline, and abandons (SIGKILLs, never waits for) a helper that misses one.

This file imports only the standard library and is started by file path
(``python -I _helper_process.py``), so a new helper costs one bare interpreter start and
never imports sweepsafe or Optuna. It also owns the few primitives both sides share:
the wire format, temporary names, the SQLite header, and reading an Optuna database.

Protocol: each message is a frame ``>II`` (header length, payload length), a JSON header
and raw payload bytes. The store sends one request and reads one reply. A reply header
has ``"ok": true`` and the result fields, or ``"ok": false`` with ``errno``, ``error``
and ``path``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import signal
import sqlite3
import stat as stat_module
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

FRAME_PREFIX = struct.Struct(">II")
SQLITE_HEADER = b"SQLite format 3\x00"
TEMP_PREFIX = ".sweepsafe-tmp-"
"""Every temporary file sweepsafe writes is named ``.sweepsafe-tmp-{token}``: a fixed
length (35 bytes), so a temporary never makes a legal name too long."""
STATE_DIR_NAME = ".sweepsafe"
"""sweepsafe's own folder, locally and in every study folder on Drive; never copied."""
FINISHED_STATES = ("COMPLETE", "PRUNED")
"""Optuna trial states that count as finished."""

_CHUNK = 8 << 20
_SMALL_READ_LIMIT = 4 << 20

Header = dict[str, Any]


def encode_frame(header: Header, payload: bytes = b"") -> bytes:
    """One protocol frame: length prefix, JSON header, payload."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return FRAME_PREFIX.pack(len(raw), len(payload)) + raw + payload


def temp_name(token: str) -> str:
    """The name of a temporary written before it replaces its target in the same folder."""
    return TEMP_PREFIX + token


def is_temp_name(name: str) -> bool:
    """True for a sweepsafe temporary (left behind by a killed or failed copy)."""
    return name.startswith(TEMP_PREFIX)


def new_token(tag: str) -> str:
    """A random temporary-name token that starts with the writing runtime's ``tag``."""
    return tag + secrets.token_hex(6)


# -- reading SQLite and Optuna databases --------------------------------------------------
def is_sqlite_file(path: str) -> bool:
    """True when the file starts with the SQLite header (whatever its name)."""
    try:
        with open(path, "rb") as file:
            return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except (IsADirectoryError, PermissionError):
        return False


def connect_read_only(path: str, timeout: float = 30.0) -> sqlite3.Connection:
    """A read-only connection that never creates or changes the file."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)


def integrity_problem(connection: sqlite3.Connection, *, quick: bool = False) -> str | None:
    """None when ``PRAGMA integrity_check`` (or ``quick_check``) says ok, else what it found."""
    pragma = "quick_check" if quick else "integrity_check"
    rows = [str(row[0]) for row in connection.execute(f"PRAGMA {pragma}").fetchall()]
    if rows == ["ok"]:
        return None
    more = f" (and {len(rows) - 1} more problems)" if len(rows) > 1 else ""
    return f"PRAGMA {pragma} found: {rows[0] if rows else 'no answer'}{more}"


def is_optuna_schema(connection: sqlite3.Connection) -> bool:
    """The database has Optuna's core tables."""
    tables = {
        str(row[0])
        for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    return {"studies", "trials", "study_directions", "trial_values"} <= tables


def read_studies(connection: sqlite3.Connection) -> list[Header]:
    """Every Optuna study: name, directions, trial counts by state, best value."""
    studies: list[Header] = []
    for study_id, name in connection.execute(
        "SELECT study_id, study_name FROM studies ORDER BY study_id"
    ).fetchall():
        directions = [
            str(direction).lower()
            for (direction,) in connection.execute(
                "SELECT direction FROM study_directions WHERE study_id = ? ORDER BY objective",
                (study_id,),
            )
        ]
        counts = {
            str(state): int(count)
            for state, count in connection.execute(
                "SELECT state, COUNT(*) FROM trials WHERE study_id = ? GROUP BY state",
                (study_id,),
            )
        }
        best: float | None = None
        if len(directions) == 1 and directions[0] in ("minimize", "maximize"):
            aggregate = "MIN" if directions[0] == "minimize" else "MAX"
            (value,) = connection.execute(
                f"SELECT {aggregate}(v.value) FROM trial_values AS v "
                "JOIN trials AS t ON v.trial_id = t.trial_id "
                "WHERE t.study_id = ? AND t.state = 'COMPLETE' AND v.objective = 0",
                (study_id,),
            ).fetchone()
            best = None if value is None else float(value)
        studies.append(
            {"name": str(name), "directions": directions, "trial_counts": counts, "best": best}
        )
    return studies


def finished_trials(connection: sqlite3.Connection) -> set[tuple[str, int, str]]:
    """(study name, trial number, start time) of every finished trial."""
    rows = connection.execute(
        "SELECT s.study_name, t.number, COALESCE(t.datetime_start, '') FROM trials AS t "
        "JOIN studies AS s ON s.study_id = t.study_id WHERE t.state IN (?, ?)",
        FINISHED_STATES,
    ).fetchall()
    return {(str(name), int(number), str(start)) for name, number, start in rows}


def inspect_sqlite(path: str, *, quick: bool = False) -> Header:
    """Integrity and, for an Optuna database, its studies; never changes the file."""
    connection = connect_read_only(path)
    try:
        problem = integrity_problem(connection, quick=quick)
        optuna = problem is None and is_optuna_schema(connection)
        studies = read_studies(connection) if optuna else []
    finally:
        connection.close()
    return {"integrity_problem": problem, "is_optuna": optuna, "studies": studies}


# -- copying bytes ------------------------------------------------------------------------
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
        self._hooks.before("read", path)
        limit = min(int(header.get("limit", _SMALL_READ_LIMIT)), _SMALL_READ_LIMIT)
        try:
            with open(path, "rb") as file:
                data = file.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError):
            return {"exists": False}, b""
        if len(data) > limit:
            if not header.get("head"):
                raise OSError(errno.EFBIG, f"larger than the {limit} bytes expected", path)
            data = data[:limit]
        return {"exists": True}, data

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
        for rel, name, info in _walk(root):
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
                reply["integrity_problem"] = f"it cannot be read as a database ({exc})"
        return reply, b""


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(root: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative POSIX path, name, lstat) of every entry under ``root``, depth first."""
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
                if entry.name != STATE_DIR_NAME:
                    pending.append((entry.path, rel + "/"))
                continue
            yield rel, entry.name, info


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
            _remove_entry(probe)
        os.makedirs(folder, exist_ok=True)


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
        write_all(outbound, encode_frame(reply, data))


if __name__ == "__main__":
    sys.exit(serve())
