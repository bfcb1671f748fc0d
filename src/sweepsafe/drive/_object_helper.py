"""The helper process that serves an ObjectStore's requests against an fsspec file system.

It answers the same requests as the Drive helper (``_helper_process``), so the store,
its deadlines and its abandoning of a helper that hangs work unchanged. The store names
Drive-side paths under a virtual root; this helper maps ``{root}/{rel}`` to the object
``{url}/{rel}``.

Object stores have no rename, so the temporary-name protocol becomes a local spool: the
bytes of a file being written go to a file in the local spool folder, and the commit
uploads it whole as one object (one PUT, or a multipart upload completed at once). No
temporary object ever exists in the bucket; an abort or a killed helper leaves only a
local spool, removed by the next helper once its writer has exited. With ``file://``
the commit uploads to a temporary name beside the target and renames it, as on Drive.

Like the Drive helper it is started by file path (``python -I _object_helper.py``) and
imports only the standard library at its top level; fsspec is imported when the first
request arrives. Its settings, credentials included, come in the environment variable
``SWEEPSAFE_OBJECT_STORE`` (JSON), never on its command line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import sqlite3
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from sweepsafe.drive._fs_primitives import _clear_way, _make_folder, _sha256_of
    from sweepsafe.drive._helper_process import DriveServer, serve
    from sweepsafe.drive._helper_wire import SMALL_READ_LIMIT
    from sweepsafe.drive._object_fs import (
        LOCAL_PROTOCOLS,
        check_bucket,
        described,
        explain,
        open_filesystem,
        protocol_of,
        remove_dead_spools,
        secret_strings,
    )
    from sweepsafe.drive._reserved_names import STATE_DIR_NAME, is_temp_name, temp_name
    from sweepsafe.drive._sqlite_inspect import inspect_sqlite, is_sqlite_file
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _fs_primitives import _clear_way, _make_folder, _sha256_of
    from _helper_process import DriveServer, serve
    from _helper_wire import SMALL_READ_LIMIT
    from _object_fs import (
        LOCAL_PROTOCOLS,
        check_bucket,
        described,
        explain,
        open_filesystem,
        protocol_of,
        remove_dead_spools,
        secret_strings,
    )
    from _reserved_names import STATE_DIR_NAME, is_temp_name, temp_name
    from _sqlite_inspect import inspect_sqlite, is_sqlite_file

Header = dict[str, Any]

CONFIG_VARIABLE = "SWEEPSAFE_OBJECT_STORE"

# What fsspec's ``rm`` takes for a glob pattern in a name.
_PATTERN_CHARACTERS = re.compile(r"[*?\[]")
# What s3fs splits a key at, taking the rest for the version to read.
_S3_VERSION_MARK = "?versionId="


class ObjectServer(DriveServer):
    """Serves the store's requests against one fsspec file system."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self._url = str(config["url"]).rstrip("/")
        self._root = str(config["root"]).rstrip("/")
        self._spool = str(config["spool"])
        self._options: dict[str, Any] = dict(config.get("options") or {})
        self._secrets = secret_strings(self._options)
        self._fs: Any = None
        self._base = ""
        self._local = False
        self._tokens: dict[str, str] = {}

    # -- the file system, opened on the first request ------------------------------------
    def _filesystem(self) -> Any:
        """The file system, opened (and the bucket checked) on first use."""
        if self._fs is None:
            os.makedirs(self._spool, exist_ok=True)
            remove_dead_spools(self._spool)
            fs, base = open_filesystem(self._url, self._options)
            self._local = protocol_of(fs) in LOCAL_PROTOCOLS
            if not self._local:
                check_bucket(fs, base, self._url)
            self._fs, self._base = fs, base.rstrip("/")
        return self._fs

    def _key(self, path: str) -> str:
        """The object key (in fsspec's form, without protocol) of a virtual path."""
        self._filesystem()
        if path == self._root:
            return self._base
        if not path.startswith(self._root + "/"):
            raise OSError(errno.EINVAL, "outside the object store's root", path)
        if _S3_VERSION_MARK in path and protocol_of(self._fs) in ("s3", "s3a"):
            # s3fs reads what follows as a version, and would write the object under the
            # name before it: another file's.
            raise OSError(
                errno.EINVAL,
                f"S3 through s3fs cannot store a name holding {_S3_VERSION_MARK!r}; "
                "rename the file",
                path,
            )
        return f"{self._base}/{path[len(self._root) + 1 :]}"

    def _where(self, path: object) -> str:
        """The URL of a virtual path or of an object key (what messages show)."""
        text = str(path or "")
        for prefix in (self._root, self._base):
            if prefix and (text == prefix or text.startswith(prefix + "/")):
                return self._url + text[len(prefix) :]
        return text

    def handle(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Run one request; any failure becomes an error reply naming the object."""
        op = str(header.get("op", ""))
        method: Callable[[Header, bytes], tuple[Header, bytes]] | None = getattr(
            self, f"op_{op}", None
        )
        if method is None:
            return {"ok": False, "errno": errno.EINVAL, "error": f"unknown op {op!r}"}, b""
        try:
            if self._fs is not None:
                # Another process may have written since: never answer from a listing cache.
                self._fs.invalidate_cache()
            reply, data = method(header, payload)
        except sqlite3.DatabaseError as exc:
            return {"ok": False, "errno": 0, "sqlite": True, "error": str(exc)}, b""
        # The implementations raise their own exception types (botocore, aiohttp, gcsfs);
        # each must become one error reply naming the store, not end the helper.
        except Exception as exc:  # noqa: BLE001
            code, reason = explain(exc)
            where = getattr(exc, "filename", None) or header.get("path")
            return {
                "ok": False,
                "errno": code,
                "error": self._scrub(reason),
                "path": self._where(where),
            }, b""
        reply["ok"] = True
        return reply, data

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # -- writing: a local spool, uploaded whole on commit --------------------------------
    def op_open(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Create a local spool for the object ``path``."""
        destination = str(header["path"])
        self._key(destination)
        os.makedirs(self._spool, exist_ok=True)
        spool = os.path.join(self._spool, f"{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        handle = str(header["handle"])
        self._open[handle] = (fd, spool, destination)
        self._tokens[handle] = str(header["token"])
        return {"temp": spool}, b""

    def op_commit(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Upload the spool as the object ``path``, then drop the spool."""
        handle = str(header["handle"])
        fd, spool, destination = self._open[handle]
        token = self._tokens.pop(handle, secrets.token_hex(6))
        size = os.fstat(fd).st_size
        try:
            self._forget(handle)
            self._upload(spool, self._key(destination), token)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(spool)
        return {"size": size}, b""

    def op_abort(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Drop an open spool."""
        self._tokens.pop(str(header["handle"]), None)
        return super().op_abort(header, payload)

    def _upload(self, spool: str, key: str, token: str) -> None:
        fs = self._filesystem()
        if not self._local:
            fs.put_file(spool, key)
            return
        # A local folder has rename: a temporary beside the target, as on Drive.
        if os.path.lexists(self._base) and not os.path.isdir(self._base):
            # The store's own root: a file of the user's, never replaced by a folder.
            raise NotADirectoryError(
                errno.ENOTDIR, "a file stands where the store's folder should be", self._base
            )
        _make_folder(os.path.dirname(key), None)
        temp = os.path.join(os.path.dirname(key), temp_name(token))
        try:
            fs.put_file(spool, temp)
            _clear_way(key)
            fs.mv(temp, key)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise

    def op_sync_folders(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Nothing to do: an uploaded object is durable once its upload completed."""
        return {}, b""

    def op_remove(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Remove objects, and every object under them (folders); missing ones are fine.

        Each name is taken as it is: fsspec's ``rm`` reads ``*``, ``?`` and ``[`` in a
        name as a pattern, and would remove every object it matches (``model*`` all the
        models), so a name holding one is removed on its own."""
        fs = self._filesystem()
        paths = [str(path) for path in header["paths"]]
        keys = [self._key(path) for path in paths]
        if self._local:
            return super().op_remove({**header, "paths": keys}, payload)
        doomed: set[str] = set()
        for key in keys:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                doomed.update(fs.find(key))
            doomed.add(key)
        literal = sorted(key for key in doomed if not _PATTERN_CHARACTERS.search(key))
        if literal:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(literal)
        for key in sorted(doomed.difference(literal)):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(key)
        return {"removed": len(paths)}, b""

    def op_clean(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Remove the spools of exited helpers (and, in a local folder, stray temporaries);
        with ``uploads``, abort the unfinished multipart uploads under ``path``."""
        self._filesystem()
        removed = remove_dead_spools(self._spool)
        if header.get("uploads") and protocol_of(self._fs) in ("s3", "s3a"):
            # A key without s3:ListBucketMultipartUploads or s3:AbortMultipartUpload: the
            # parts are left to the bucket's lifecycle rule, and backups go on.
            with contextlib.suppress(PermissionError):
                removed += self._abort_uploads(self._key(str(header["path"])))
        if self._local:
            local_header = {**header, "path": self._key(str(header["path"]))}
            reply, _ = super().op_clean(local_header, payload)
            removed += int(reply["removed"])
        return {"removed": removed}, b""

    def op_read_versioned(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """A small object and its ETag. The ETag is read first: content read after it is
        at least as new, so a write conditional on it can only fail, never go astray."""
        fs = self._filesystem()
        key = self._key(str(header["path"]))
        try:
            version = str(fs.info(key)["ETag"])
        except (FileNotFoundError, NotADirectoryError, KeyError):
            return {"exists": False}, b""
        limit = min(int(header.get("limit", SMALL_READ_LIMIT)), SMALL_READ_LIMIT)
        data = self._read_small(str(header["path"]), limit, False)
        if data is None:
            return {"exists": False}, b""
        return {"exists": True, "version": version}, data

    def op_put_if(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Write ``payload`` as the object ``path`` only if it still has the ETag
        ``version`` (or, for None, does not exist); ``written`` says whether it did."""
        fs = self._filesystem()
        key = self._key(str(header["path"]))
        version = header.get("version")
        try:
            if version is None:
                fs.pipe_file(key, payload, mode="create")
            else:
                fs.pipe_file(key, payload, IfMatch=str(version))
        except OSError:
            # A refused precondition comes as one error or another depending on the
            # implementation's version: tell it by the object itself.
            try:
                now: str | None = str(fs.info(key)["ETag"])
            except FileNotFoundError:
                now = None
            if now == version:
                raise
            return {"written": False}, b""
        return {"written": True}, b""

    def _abort_uploads(self, key: str) -> int:
        """Abort every multipart upload begun under the prefix ``key``; how many."""
        bucket, _, prefix = key.partition("/")
        query: dict[str, str] = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else ""}
        aborted = 0
        while True:
            page: dict[str, Any] = self._fs.call_s3("list_multipart_uploads", **query)
            for upload in page.get("Uploads", []):
                with contextlib.suppress(FileNotFoundError):  # finished or aborted since
                    self._fs.call_s3(
                        "abort_multipart_upload",
                        Bucket=bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
                aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            query["KeyMarker"] = page["NextKeyMarker"]
            query["UploadIdMarker"] = page["NextUploadIdMarker"]

    # -- reading ------------------------------------------------------------------------
    def _read_small(self, path: str, limit: int, head: bool) -> bytes | None:
        """The content of a small object (``op_read``, ``op_read_many``); None if absent."""
        fs = self._filesystem()
        try:
            data = bytes(fs.cat_file(self._key(path), start=0, end=limit + 1))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if len(data) > limit:
            if not head:
                raise OSError(errno.EFBIG, f"larger than the {limit} bytes expected", path)
            data = data[:limit]
        return data

    def op_stat(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Whether ``path`` is an object or a folder (a prefix), its size and mtime."""
        info = self._info(str(header["path"]))
        if info is None:
            return {"exists": False}, b""
        return {"exists": True, **described(info)}, b""

    def _info(self, path: str) -> dict[str, Any] | None:
        fs = self._filesystem()
        try:
            info: dict[str, Any] = fs.info(self._key(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return info

    def op_listdir(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """The entries of one folder (a prefix): ``[name, kind, size, mtime]``."""
        fs = self._filesystem()
        key = self._key(str(header["path"]))
        try:
            found: list[dict[str, Any]] = fs.ls(key, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {"exists": False, "entries": [], "temps": []}, b""
        entries: dict[str, list[object]] = {}
        temps: list[str] = []
        for info in found:
            name = str(info["name"]).rstrip("/")
            if name == key:  # ``ls`` of an object lists the object itself
                return {"exists": False, "entries": [], "temps": []}, b""
            name = name.rsplit("/", 1)[-1]
            if is_temp_name(name):
                temps.append(name)
                continue
            entry = described(info)
            # A name both an object and a prefix: the folder is what a listing shows.
            if name not in entries or entry["kind"] == "dir":
                entries[name] = [name, entry["kind"], entry["size"], entry["mtime"]]
        return {"exists": True, "entries": list(entries.values()), "temps": temps}, b""

    def op_scan(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Every object under a prefix: relative path and size; ``.sweepsafe`` apart."""
        fs = self._filesystem()
        key = self._key(str(header["path"]))
        found: dict[str, dict[str, Any]] = fs.find(key, detail=True)
        files: list[list[object]] = []
        temps: list[str] = []
        exists = False
        for name, info in sorted(found.items()):
            if not name.startswith(key + "/") or info.get("type") == "directory":
                continue
            exists = True
            rel = name[len(key) + 1 :]
            parts = rel.split("/")
            if STATE_DIR_NAME in parts[:-1]:
                continue
            if is_temp_name(parts[-1]):
                temps.append(rel)
            else:
                files.append([rel, int(info.get("size") or 0)])
        # A name both an object and a prefix (a file that became a folder): the folder is
        # what a listing shows, and what a restore brings back.
        folders: set[str] = set()
        for entry in files:
            parts = str(entry[0]).split("/")
            folders.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
        files = [entry for entry in files if str(entry[0]) not in folders]
        return {"exists": exists, "files": files, "temps": temps}, b""

    def op_pull(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Download the object ``path`` into the local file ``target`` (already created)."""
        fs = self._filesystem()
        source = str(header["path"])
        info = self._info(source)
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", self._where(source))
        if info.get("type") != "file":
            raise OSError(errno.EISDIR, "not a regular file", self._where(source))
        target = str(header["target"])
        fs.get_file(self._key(source), target)
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            copied = os.fstat(fd).st_size
        finally:
            os.close(fd)
        return {"copied": copied}, b""

    def op_inspect(self, header: Header, payload: bytes) -> tuple[Header, bytes]:
        """Size, mtime, and for an SQLite object its integrity and Optuna studies.

        The object is downloaded to a local spool to be read, then the spool removed.
        """
        path = str(header["path"])
        info = self._info(path)
        if info is None:
            return {"exists": False}, b""
        reply: Header = {"exists": True, **described(info)}
        if reply["kind"] != "file":
            return reply, b""
        os.makedirs(self._spool, exist_ok=True)
        local = os.path.join(self._spool, f"{os.getpid()}-{secrets.token_hex(8)}")
        try:
            self._filesystem().get_file(self._key(path), local)
            reply["is_sqlite"] = is_sqlite_file(local)
            if header.get("hash"):
                reply["sha256"] = _sha256_of(local)
            if reply["is_sqlite"]:
                try:
                    reply.update(inspect_sqlite(local))
                except sqlite3.DatabaseError as exc:
                    reply["integrity_problem"] = f"it cannot be read as a database ({exc})"
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local)
        return reply, b""


def main() -> int:
    """Serve requests on stdin with the settings of the environment."""
    config: dict[str, Any] = json.loads(os.environ.pop(CONFIG_VARIABLE))
    return serve(ObjectServer(config))


if __name__ == "__main__":
    sys.exit(main())
