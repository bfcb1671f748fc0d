"""What the object-store helper needs of an fsspec file system, standard library only.

Opening the file system (fsspec is imported here, on first use), checking the bucket,
describing entries whatever the implementation, wording its failures, and the local
spools of exited helpers. Run by file path, the helper imports this module from its own
folder.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from sweepsafe.drive._fs_primitives import process_alive
else:
    # Imported by the object helper, run by file path with its folder on sys.path.
    from _fs_primitives import process_alive

__all__ = [
    "LOCAL_PROTOCOLS",
    "check_bucket",
    "described",
    "explain",
    "open_filesystem",
    "protocol_of",
    "remove_dead_spools",
    "secret_strings",
]

LOCAL_PROTOCOLS = ("file", "local")
_CONNECTION_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError")


def open_filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    try:
        import fsspec.core
    except ImportError:
        raise OSError(errno.ENOSYS, _install_line(url), url) from None
    try:
        fs, base = fsspec.core.url_to_fs(url, **options)
    except ImportError:
        raise OSError(errno.ENOSYS, _install_line(url), url) from None
    return fs, str(base)


def _install_line(url: str) -> str:
    extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(url.split("://")[0], "")
    target = f"sweepsafe[{extra}]" if extra else "fsspec and the package for this URL"
    return f"the object store's package is not installed; pip install '{target}'"


def protocol_of(fs: Any) -> str:
    protocol = fs.protocol
    return str(protocol if isinstance(protocol, str) else protocol[0])


def check_bucket(fs: Any, base: str, url: str) -> None:
    """Fails at once, in one sentence, when the bucket is missing."""
    bucket = base.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT,
            f"the bucket {bucket!r} does not exist; create it, or fix the URL",
            url,
        ) from None


def explain(exc: BaseException) -> tuple[int, str]:
    """The errno and the sentence of a failure of the fsspec implementation."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, PermissionError) or "NoCredentialsError" in names:
        return errno.EACCES, (
            f"access denied ({detail}); check the credentials (storage_options, or the "
            "environment variables of the store's provider) and their rights on the bucket"
        )
    if names.intersection(_CONNECTION_ERRORS) or isinstance(exc, ConnectionError):
        return errno.ECONNREFUSED, (
            f"the endpoint cannot be reached ({detail}); check the endpoint URL and the network"
        )
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno, exc.strerror or detail
    return errno.EIO, f"{type(exc).__name__}: {detail}"


def described(info: dict[str, Any]) -> dict[str, Any]:
    kind = {"file": "file", "directory": "dir"}.get(str(info.get("type")), "other")
    return {"kind": kind, "size": int(info.get("size") or 0), "mtime": _mtime(info)}


def _mtime(info: dict[str, Any]) -> float:
    """Seconds since the epoch of an entry's modification, whatever the implementation."""
    for field in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(field)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0


_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session", "auth")


def secret_strings(options: dict[str, Any]) -> list[str]:
    """Every string in the storage options under a name that says it is secret (``key``,
    ``secret``, ``token``...), to be blanked out of messages. Endpoints stay readable."""
    found: list[str] = []
    pending: list[tuple[str, object]] = [("", options)]
    while pending:
        name, value = pending.pop()
        if isinstance(value, dict):
            pending.extend((str(key), item) for key, item in value.items())
        elif isinstance(value, (list, tuple)):
            pending.extend((name, item) for item in value)
        elif (
            isinstance(value, str)
            and len(value) >= 4
            and any(word in name.lower() for word in _SECRET_WORDS)
        ):
            found.append(value)
    return found


def remove_dead_spools(folder: str) -> int:
    """Remove the spools whose helper process has exited; how many."""
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        pid_text = name.split("-", 1)[0]
        if not pid_text.isdigit() or process_alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
            removed += 1
    return removed
