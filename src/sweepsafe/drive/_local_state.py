"""sweepsafe's own local records of each study folder: what reached Drive, and which version.

Under ``LOCAL_ROOT/.sweepsafe/units/<key>/`` (never copied, never restored from Drive):

- ``manifest.jsonl``: an append-only journal of the files that reached Drive, one line
  per file copied (its local size, mtime, ctime and inode then) or forgotten, so that a
  backup appends what changed instead of rewriting the whole record; compacted when
  stale lines outnumber live ones. A torn last line (a kill mid-append) is ignored.
- ``unit.json``: the study folder's Drive id as last seen, and per database the
  generation this runtime last published there.
- ``shipped/``: the last published snapshot of each database, the base of page deltas.

The files are small and written through aiofiles, on threads that still run while the
interpreter exits (asyncio's default executor is shut down before ``atexit`` hooks run,
and the default backup worker flushes from one).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiofiles
import aiofiles.os

from sweepsafe.drive._reserved_names import STATE_DIR_NAME, temp_name
from sweepsafe.paths import safe_relative_path

__all__ = [
    "DatabaseRecord",
    "Manifest",
    "Signature",
    "UnitState",
    "database_signature",
    "file_signature",
    "local_mark",
    "unit_state_dir",
]

logger = logging.getLogger(__name__)

Signature = tuple[int, int, int, int]
"""(size, mtime_ns, ctime_ns, inode): a file whose signature is unchanged was not rewritten."""

T = TypeVar("T")
_FORMAT = 1


def file_signature(info: os.stat_result) -> Signature:
    """The signature of a file from its ``stat``."""
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def database_signature(path: str | os.PathLike[str], info: os.stat_result) -> Signature:
    """The signature of a file that may be an SQLite database in WAL mode.

    Commits to such a database land in its ``-wal`` file and leave the main file as it
    was until a checkpoint, so the main file's ``stat`` alone would call a database
    with new rows unchanged. The times of the ``-wal`` file count too.
    """
    try:
        wal = os.stat(os.fspath(path) + "-wal")
    except OSError:
        return file_signature(info)
    return (
        info.st_size,
        max(info.st_mtime_ns, wal.st_mtime_ns),
        max(info.st_ctime_ns, wal.st_ctime_ns),
        info.st_ino,
    )


class _ExitSafeExecutor(concurrent.futures.Executor):
    """Runs each call on a daemon thread of its own; still works during interpreter exit."""

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                future.set_exception(exc)

        threading.Thread(target=run, name="sweepsafe-local-io", daemon=True).start()
        return future


LOCAL_IO = _ExitSafeExecutor()
"""The executor of every aiofiles call in sweepsafe."""


def unit_state_dir(local_root: Path, drive_folder: Path, unit_rel: str) -> Path:
    """Where the records of one (local study folder, Drive folder) pair live."""
    digest = hashlib.sha256(f"{drive_folder}\0{unit_rel}".encode()).hexdigest()[:24]
    return local_root / STATE_DIR_NAME / "units" / digest


def local_mark(local_root: Path | str, kind: str, path: Path | str) -> Path:
    """Where the local records mark an operation of ``kind`` on ``path`` under way (a
    restore, going back to a generation), so that a runtime killed in the middle of it
    is noticed by the next one."""
    rel = os.path.relpath(path, local_root)
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(local_root) / STATE_DIR_NAME / f"{kind}-{digest}"


# Each local file operation below is one call on LOCAL_IO: a cancelled caller stops
# waiting, but the call finishes, so no file is left open or a temporary left behind.


async def _write_atomically(path: Path, data: bytes, *, durable: bool) -> None:
    await aiofiles.os.wrap(_write_file_atomically)(path, data, durable, executor=LOCAL_IO)


def _write_file_atomically(path: Path, data: bytes, durable: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(temp_name(os.urandom(6).hex()))
    try:
        with open(temp, "wb") as file:
            file.write(data)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise


async def _read_file(path: Path) -> bytes:
    return await aiofiles.os.wrap(Path.read_bytes)(path, executor=LOCAL_IO)


def _append_to_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as file:
        file.write(data)


@dataclass
class DatabaseRecord:
    """The generation of one database this runtime last published, and how to diff from it."""

    generation: int
    tag: str
    sha256: str
    shipped_signature: tuple[int, int] = (0, 0)
    """(size, mtime_ns) of the local copy of that snapshot in ``shipped/``."""
    full_generation: int = 0
    """The newest full generation its chain starts from."""
    patch_bytes: int = 0
    """Bytes of patches published since that full generation."""
    plain_generation: int = 0
    """The generation the plain ``study.db`` on Drive holds."""
    archived_at: float = 0.0
    """When this runtime last archived a whole base in the history."""
    missing_files: dict[str, list[str]] = field(default_factory=dict)
    """Trial number -> files of that finished trial that are not on Drive."""


@dataclass
class UnitState:
    """What this runtime knows of one study folder's Drive copy."""

    path: Path
    unit_id: str | None = None
    databases: dict[str, DatabaseRecord] = field(default_factory=dict)
    strays: list[str] = field(default_factory=list)
    """Temporaries a restore saw on Drive (a dead runtime's), for the next backup to remove."""

    @classmethod
    async def aload(cls, folder: Path) -> UnitState:
        """The saved state, or an empty one (first backup, or an unreadable file)."""
        path = folder / "unit.json"
        try:
            data: dict[str, Any] = json.loads(await _read_file(path))
            databases = {
                str(rel): DatabaseRecord(
                    **{
                        **record,
                        "shipped_signature": tuple(record.get("shipped_signature", (0, 0))),
                    }
                )
                for rel, record in data.get("databases", {}).items()
                if safe_relative_path(str(rel))
            }
            unit_id = data.get("unit_id")
            strays = [str(rel) for rel in data.get("strays", []) if safe_relative_path(str(rel))]
            return cls(path, str(unit_id) if unit_id else None, databases, strays)
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, TypeError, KeyError):
            logger.warning("Ignoring unreadable sweepsafe state %s; it is rebuilt", path)
            return cls(path)

    async def asave(self) -> None:
        """Write the state atomically."""
        data = {
            "format": _FORMAT,
            "unit_id": self.unit_id,
            "databases": {rel: asdict(record) for rel, record in self.databases.items()},
            "strays": self.strays,
        }
        await _write_atomically(self.path, json.dumps(data, indent=1).encode(), durable=False)

    def shipped_path(self, rel: str) -> Path:
        """The local copy of the last snapshot of database ``rel`` that reached Drive."""
        name = hashlib.sha256(rel.encode()).hexdigest()[:24] + ".db"
        return self.path.parent / "shipped" / name


class Manifest:
    """Which local version of each file of a study folder reached Drive; thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unit_id: str | None = None
        self._entries: dict[str, Signature] = {}
        # Folder ("" for the top) -> names recorded directly in it: what lies under a
        # folder is found by walking its records only, never every record.
        self._children: dict[str, set[str]] = {}
        self._pending: list[str] = []
        self._lines = 0
        self._rewrite = False
        self._lock = threading.Lock()

    @classmethod
    async def aload(cls, folder: Path) -> Manifest:
        """The journal under ``folder``, replayed; empty when missing."""
        manifest = cls(folder / "manifest.jsonl")
        try:
            raw = await _read_file(manifest.path)
        except FileNotFoundError:
            manifest._rewrite = True  # a new journal starts with its header line
            return manifest
        except OSError as exc:
            logger.warning("Ignoring unreadable backup manifest %s (%s)", manifest.path, exc)
            manifest._rewrite = True
            return manifest
        manifest._replay(raw)
        return manifest

    def _replay(self, raw: bytes) -> None:
        unsafe = 0
        for line in raw.splitlines():
            try:
                record = json.loads(line)
                if "format" in record:
                    self.unit_id = record.get("unit_id") or None
                    self._entries.clear()
                    self._children.clear()
                elif safe_relative_path(str(record["p"])) is None:
                    unsafe += 1
                elif "x" in record:
                    self._remove(str(record["p"]))
                else:
                    size, mtime, ctime, inode = (int(v) for v in record["s"])
                    self._add(str(record["p"]), (size, mtime, ctime, inode))
            except (ValueError, KeyError, TypeError):
                break  # a torn last line, from a kill during an append
            self._lines += 1
        if unsafe:
            logger.warning(
                "Ignored %d entries of %s that name paths outside their folder", unsafe, self.path
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, rel: str) -> Signature | None:
        """The signature of ``rel`` when it was last copied, or None."""
        with self._lock:
            return self._entries.get(rel)

    def under(self, prefix: str) -> list[str]:
        """Recorded files under the folder ``prefix`` (relative; ``""`` for all), and
        ``prefix`` itself if it is a recorded file; costs the records found, not all."""
        with self._lock:
            if not prefix:
                return list(self._entries)
            found = [prefix] if prefix in self._entries else []
            folders = [prefix]
            while folders:
                folder = folders.pop()
                for name in self._children.get(folder, ()):
                    rel = f"{folder}/{name}"
                    if rel in self._entries:
                        found.append(rel)
                    if rel in self._children:
                        folders.append(rel)
            return found

    def items(self) -> Iterator[tuple[str, Signature]]:
        """A snapshot of every recorded file and signature."""
        with self._lock:
            return iter(list(self._entries.items()))

    def reset(self, unit_id: str | None) -> None:
        """Forget everything: the Drive folder is new, deleted or replaced."""
        with self._lock:
            self.unit_id = unit_id
            self._entries.clear()
            self._children.clear()
            self._pending.clear()
            self._rewrite = True

    def record(self, rel: str, signature: Signature) -> None:
        """``rel`` reached Drive as the local version with ``signature``."""
        with self._lock:
            self._add(rel, signature)
            self._pending.append(json.dumps({"p": rel, "s": list(signature)}))

    def forget(self, rel: str) -> None:
        """``rel`` is no longer known to be on Drive."""
        with self._lock:
            if self._remove(rel):
                self._pending.append(json.dumps({"p": rel, "x": 1}))

    def _add(self, rel: str, signature: Signature) -> None:
        known = rel in self._entries
        self._entries[rel] = signature
        if known:
            return
        path = rel
        while path:
            parent, _, name = path.rpartition("/")
            names = self._children.setdefault(parent, set())
            if name in names:
                return
            names.add(name)
            path = parent

    def _remove(self, rel: str) -> bool:
        if self._entries.pop(rel, None) is None:
            return False
        path = rel
        while path and path not in self._entries and not self._children.get(path):
            self._children.pop(path, None)
            parent, _, name = path.rpartition("/")
            names = self._children.get(parent)
            if names is not None:
                names.discard(name)
            path = parent
        return True

    async def asave(self) -> None:
        """Append what changed; rewrite the journal when it is mostly stale lines."""
        with self._lock:
            rewrite = (
                self._rewrite or self._lines + len(self._pending) > 2 * len(self._entries) + 1000
            )
            if rewrite:
                header = json.dumps({"format": _FORMAT, "unit_id": self.unit_id})
                lines = [
                    header,
                    *(json.dumps({"p": r, "s": list(s)}) for r, s in self._entries.items()),
                ]
                self._rewrite = False
            else:
                lines = self._pending
            self._pending = []
            if not rewrite and not lines:
                return
            self._lines = len(lines) if rewrite else self._lines + len(lines)
        data = ("\n".join(lines) + "\n").encode()
        if rewrite:
            await _write_atomically(self.path, data, durable=True)
            return
        await aiofiles.os.wrap(_append_to_file)(self.path, data, executor=LOCAL_IO)
