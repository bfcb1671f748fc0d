"""ObjectStore: a DriveStore whose copies live in an object store reached through fsspec.

The store's engine is unchanged: every path on the far side is a path under a virtual
root (``/s3:/bucket/prefix`` for ``s3://bucket/prefix``), and every request goes to a
helper process with a deadline. Only the helper differs: ``_object_helper`` maps the
virtual paths to objects and writes each object whole from a local spool. fsspec and its
implementation are imported in that helper, never in this process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sweepsafe.drive import _object_helper
from sweepsafe.drive._object_fs import LOCAL_PROTOCOLS
from sweepsafe.drive._object_helper import CONFIG_VARIABLE
from sweepsafe.drive._reserved_names import STATE_DIR_NAME
from sweepsafe.drive._results import BackupResult, GenerationInfo, VerifyResult
from sweepsafe.drive._store import DriveStore
from sweepsafe.errors import DrivePathError, LeaseHeldError
from sweepsafe.paths import is_within

__all__ = ["ObjectStore"]

StrPath = str | os.PathLike[str]
_Result = TypeVar("_Result", BackupResult, VerifyResult)

OBJECT_HELPER_SCRIPT = Path(_object_helper.__file__).resolve()

UPLOAD_S_PER_MIB = 0.5
"""Added to an upload's deadline per MiB: an upload slower than 2 MiB/s counts as hung."""

# S3: large uploads come in parts, kept (and billed) until completed or aborted; a write
# can be made conditional on the version read (If-Match, If-None-Match).
_S3_PROTOCOLS = frozenset({"s3", "s3a"})

# The package that brings each protocol, and the extra of sweepsafe that installs it.
_EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
}


class ObjectStore(DriveStore):
    """Copies the studies under ``local_root`` to an object store (S3, GCS...), and back.

    Everything :class:`DriveStore` does, with the same guarantees, where the copies are
    objects under ``url``: ``s3://bucket/prefix``, ``gs://bucket/prefix``, or any URL
    fsspec knows (``file:///path`` for tests). Each object is written whole: its bytes
    are first spooled to a local file under ``local_root/.sweepsafe``, then uploaded in
    one request (a single PUT, or a multipart upload completed at once), so no
    temporary object ever appears in the bucket. A hung endpoint is abandoned like a
    stalled Drive mount, after ``drive_timeout`` seconds per request; an upload, one
    request for the whole object, is allowed half a second more per MiB (a 2 GiB
    checkpoint: ``drive_timeout`` plus 1,024 s), so only a store slower than 2 MiB/s
    counts as hung while it uploads.

    Args:
        local_root: local folder whose contents are backed up.
        url: where the copies go; the bucket must exist.
        storage_options: passed to the fsspec file system (credentials, ``endpoint_url``
            in ``client_kwargs``...); JSON values only. They reach the helper process
            through its environment, never its command line, and are never logged.
            Without them the implementation finds credentials its usual way
            (environment variables, instance metadata).
        **options: the keyword options of :class:`DriveStore` (``drive_timeout``,
            ``mirror``, ``file_concurrency``, ``lease_timeout``, ``keep_generations``,
            ``compact_fraction``, ``trial_folder``, ``clock``).

    Raises:
        ModuleNotFoundError: fsspec or the package for ``url`` is not installed; the
            message names the extra (``pip install 'sweepsafe[s3]'``).
        ValueError: ``url`` is not a URL sweepsafe can use, or ``storage_options`` is
            not JSON.

    Example:
        >>> store = ObjectStore("/kaggle/working/out", "s3://bucket/s")  # doctest: +SKIP
        >>> run_sweep(f, output_dir=store.local_root, study_key="s", backup_to_drive=store)
    """

    def __init__(
        self,
        local_root: StrPath,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        drive_timeout: float = 120.0,
        mirror: bool = False,
        file_concurrency: int = 16,
        lease_timeout: float = 120.0,
        keep_generations: int = 10,
        compact_fraction: float = 1.0,
        trial_folder: str = "trials/trial-{number:05d}",
        clock: Callable[[], float] = time.time,
    ) -> None:
        protocol, rest = _split_url(url)
        _check_installed(protocol)
        try:
            options_json = json.dumps(dict(storage_options or {}))
        except (TypeError, ValueError):
            raise ValueError(
                "storage_options must hold JSON values only (strings, numbers, lists, "
                "dicts), since they are handed to a helper process."
            ) from None
        self.url = (
            f"{protocol}:///{rest}" if protocol in LOCAL_PROTOCOLS else f"{protocol}://{rest}"
        )
        local = Path(os.path.abspath(local_root))
        if protocol in LOCAL_PROTOCOLS:
            target = Path("/" + rest)
            if is_within(target, local) or is_within(local, target):
                raise DrivePathError(
                    f"the object store {self.url} and the local folder {local} overlap; the "
                    "copy must be outside the folder it backs up, and the other way round."
                )
        super().__init__(
            local,
            Path("/") / f"{protocol}:" / rest,
            drive_timeout=drive_timeout,
            mirror=mirror,
            file_concurrency=file_concurrency,
            lease_timeout=lease_timeout,
            keep_generations=keep_generations,
            compact_fraction=compact_fraction,
            trial_folder=trial_folder,
            helper_command=[sys.executable, "-I", str(OBJECT_HELPER_SCRIPT)],
            clock=clock,
        )
        config = {
            "url": self.url,
            "root": str(self.drive_root),
            "spool": str(self.local_root / STATE_DIR_NAME / "object-spool"),
        }
        # The options are spliced in as JSON text so that no copy of them is kept here.
        encoded = json.dumps(config)[:-1] + ', "options": ' + options_json + "}"
        self._pool.env = {CONFIG_VARIABLE: encoded}
        self._pool.place = self.url
        self._pool.place_root = str(self.drive_root)
        # An object is uploaded whole when it is committed: its deadline grows with it.
        self._pool.commit_s_per_mib = UPLOAD_S_PER_MIB
        self._pool.anchor = None  # an object store has no folders to create
        self._pool.unfinished_uploads = protocol in _S3_PROTOCOLS
        self._pool.conditional_writes = protocol in _S3_PROTOCOLS

    def __repr__(self) -> str:
        return f"ObjectStore({str(self.local_root)!r}, {self.url!r})"

    def url_for(self, path: StrPath) -> str:
        """The URL of the object that holds the copy of the local ``path``."""
        return self._shown_path(self.drive_path_for(path))

    async def akind(self, path: StrPath) -> str:
        """What the copy of the local ``path`` is: ``"file"``, ``"dir"`` (a prefix holding
        objects), ``"other"`` or ``"missing"``.

        Raises:
            OSError, DriveTimeout: the store failed or did not answer in ``drive_timeout``.
        """
        remote = self.drive_path_for(path)
        async with self._pool.session() as helper:
            info = await helper.stat(remote, self.drive_timeout)
        return str(info["kind"]) if info["exists"] else "missing"

    async def aentries(self, url: str) -> list[tuple[str, str]] | None:
        """``(name, kind)`` of each entry directly under ``url`` (this store's URL or one
        under it), ``kind`` being ``"file"`` or ``"dir"`` (a prefix holding objects);
        None when nothing is stored under it.

        Raises:
            ValueError: ``url`` is not under this store's URL.
            OSError, DriveTimeout: the store failed or did not answer in ``drive_timeout``.
        """
        remote = self._virtual(url)
        if not isinstance(remote, Path):
            raise ValueError(f"{url} is not under {self.url}")
        async with self._pool.session() as helper:
            listing = await helper.listdir(remote, self.drive_timeout)
        if not listing.exists:
            return None
        return sorted((entry.name, entry.kind) for entry in listing.entries)

    def _shown_path(self, virtual: Path) -> str:
        rel = virtual.relative_to(self.drive_root).as_posix()
        return self.url if rel == "." else f"{self.url}/{rel}"

    def _virtual(self, path: StrPath) -> StrPath:
        text = os.fspath(path)
        if text == self.url or text.startswith(self.url + "/"):
            return self.drive_root / text[len(self.url) :].lstrip("/")
        return path

    def _text(self, value: str) -> str:
        """A sentence of the engine's with the store's URL where it wrote its virtual root."""
        value = value.replace(str(self.drive_root), self.url)
        if value.startswith("Google Drive"):
            value = "The object store" + value[len("Google Drive") :]
        return value.replace("Google Drive", "the object store")

    def _shown(self, result: _Result) -> _Result:
        """The result with the store's URL where the engine wrote its virtual root."""
        text = self._text

        def where(value: Path | str | None) -> Path | str | None:
            if isinstance(value, Path) and is_within(value, self.drive_root):
                return self._shown_path(value)
            return value

        changes: dict[str, Any] = {}
        if result.error:
            changes["error"] = text(result.error)
        if isinstance(result, BackupResult):
            changes["source"] = where(result.source)
            changes["destination"] = where(result.destination)
            for name in ("notes", "problems"):
                if getattr(result, name):
                    changes[name] = tuple(text(line) for line in getattr(result, name))
        else:
            changes["path"] = where(result.path)
        return dataclasses.replace(result, **changes)

    async def abackup(
        self,
        path: StrPath,
        is_directory: bool = False,
        *,
        exclude: Sequence[str] = (),
        final: bool = False,
    ) -> BackupResult:
        """Copy ``path`` to the object store; see :meth:`DriveStore.abackup`."""
        result = await super().abackup(path, is_directory, exclude=exclude, final=final)
        return self._shown(result)

    async def arestore(
        self,
        path: StrPath,
        is_directory: bool = False,
        *,
        generation: int | None = None,
        before: float | None = None,
    ) -> BackupResult:
        """Bring the copy of ``path`` back; see :meth:`DriveStore.arestore`."""
        result = await super().arestore(path, is_directory, generation=generation, before=before)
        return self._shown(result)

    async def aacquire(
        self, study_dir: StrPath, *, takeover: bool = False, shared: bool = False
    ) -> None:
        """Take the study's lease; see :meth:`DriveStore.aacquire`."""
        try:
            await super().aacquire(study_dir, takeover=takeover, shared=shared)
        except LeaseHeldError as exc:
            raise LeaseHeldError(self._text(str(exc))) from None

    async def aclaim(self, study_dir: StrPath) -> None:
        """Check no other runtime holds the study's lease; see :meth:`DriveStore.aclaim`."""
        try:
            await super().aclaim(study_dir)
        except LeaseHeldError as exc:
            raise LeaseHeldError(self._text(str(exc))) from None

    def lease_refused(self, study_dir: StrPath) -> str | None:
        """Why the study's first backup could not take the lease; see
        :meth:`DriveStore.lease_refused`."""
        refused = super().lease_refused(study_dir)
        return None if refused is None else self._text(refused)

    async def averify(self, path: StrPath) -> VerifyResult:
        """Check the copy of ``path`` (a local path, or the object's URL)."""
        return self._shown(await super().averify(self._virtual(path)))

    async def ahistory(self, path: StrPath) -> list[GenerationInfo]:
        """The generations kept of a database (a local path, or the object's URL)."""
        return await super().ahistory(self._virtual(path))


def _split_url(url: str) -> tuple[str, str]:
    protocol, separator, rest = str(url).partition("://")
    rest = rest.strip("/")
    if not separator or not protocol or not rest:
        raise ValueError(
            f"{url!r} is not an object store URL; give one such as 's3://bucket/prefix', "
            "'gs://bucket/prefix' or 'file:///absolute/folder'."
        )
    if protocol == "memory":
        raise ValueError(
            "memory:// cannot hold the copies: each helper process would see its own empty "
            "memory file system; use file:///some/folder for tests."
        )
    return protocol, rest


def _check_installed(protocol: str) -> None:
    """Raises ModuleNotFoundError naming the extra to install, without importing it."""
    package, extra = _EXTRAS.get(protocol, ("fsspec", ""))
    install = f"pip install 'sweepsafe[{extra}]'" if extra else "pip install fsspec"
    for needed in ("fsspec", package) if extra else ("fsspec",):
        if importlib.util.find_spec(needed) is None:
            raise ModuleNotFoundError(
                f"{protocol}:// needs {needed}, which is not installed: {install}"
            )
