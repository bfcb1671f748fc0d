"""Fetching the patches of a chain from Drive: many small ones per request, big ones pulled.

A rebuild reads a patch per generation, often hundreds in a row. One request per patch
would pay a helper round trip each; instead the small patches ahead are read in batches
of one request. A batch starts small and grows while Drive answers it in a small part of
the deadline, which each request must meet whole: a slow Drive gets small batches. A
patch larger than what one read returns (a trial that stored megabytes
at once) is pulled into a scratch file, as a base is.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._drive_errors import DriveOSError
from sweepsafe.drive._files import pull_new, remove_quietly, scratch_path
from sweepsafe.drive._helper_wire import SMALL_READ_LIMIT

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper
    from sweepsafe.drive._generations import Generation, History

__all__ = ["Fetched", "PatchFetcher"]

_FIRST_BATCH_FILES = 4
_MOST_BATCH_FILES = 64
_BATCH_BYTES = 32 << 20
_LARGEST_PATCH = 512 << 20

Fetched = bytes | DriveOSError | None
"""A patch's bytes, why it cannot be read, or None when it is gone."""


class PatchFetcher:
    """The patch files of one history folder, fetched ahead of need."""

    def __init__(
        self,
        helper: DriveHelper,
        folder: Path,
        history: History,
        scratch: Path | None,
        timeout: float,
    ) -> None:
        """``scratch`` takes a patch larger than one read while it is pulled; without it
        (a check that reads the small patches only) such a patch is not fetched."""
        self._helper = helper
        self._folder = folder
        self._history = history
        self._scratch = scratch
        self._timeout = timeout
        self._ready: dict[str, Fetched] = {}
        self._batch_files = _FIRST_BATCH_FILES

    async def fetch(self, patch: Generation) -> Fetched:
        """The bytes of ``patch``; DriveOSError or None (missing) when they cannot be had."""
        if patch.name not in self._ready:
            if patch.size > SMALL_READ_LIMIT:
                return await self._pull(patch)
            await self._read_ahead(patch.number)
        return self._ready.pop(patch.name, None)

    async def run_from(self, first: int, last: int) -> list[list[tuple[Generation, Fetched]]]:
        """The patches of generation ``first``, then of each generation after it, up to
        ``last``, whose patches are all read already: one list per generation, in order."""
        run = [[(p, await self.fetch(p)) for p in self._history.patches.get(first, ())]]
        for number in range(first + 1, last + 1):
            later = self._history.patches.get(number, ())
            if not later or any(p.name not in self._ready for p in later):
                break
            run.append([(p, self._ready.pop(p.name)) for p in later])
        return run

    async def _read_ahead(self, number: int) -> None:
        """Read the small patches of ``number`` and of the generations after it, in one go."""
        batch: list[Generation] = []
        total = 0
        for later in range(number, self._history.head + 1):
            small = [p for p in self._history.patches.get(later, ()) if p.size <= SMALL_READ_LIMIT]
            if batch and (len(batch) + len(small) > self._batch_files or total > _BATCH_BYTES):
                break
            batch += small
            total += sum(p.size for p in small)
        paths = [self._folder / p.name for p in batch]
        found: list[Fetched]
        started = time.monotonic()
        try:
            found = list(await self._helper.read_many(paths, self._timeout, limit=SMALL_READ_LIMIT))
            took = time.monotonic() - started
            if took < self._timeout / 8:
                self._batch_files = min(2 * self._batch_files, _MOST_BATCH_FILES)
            elif took > self._timeout / 4:
                self._batch_files = max(1, self._batch_files // 2)
        except DriveOSError:
            # One bad file fails the whole request: read them one by one to say which.
            found = [await self._read_one(path) for path in paths]
        self._ready.update(zip((p.name for p in batch), found, strict=True))

    async def _read_one(self, path: Path) -> Fetched:
        try:
            return await self._helper.read(path, self._timeout, limit=SMALL_READ_LIMIT)
        except DriveOSError as exc:
            return exc

    async def _pull(self, patch: Generation) -> Fetched:
        if self._scratch is None:
            return DriveOSError(errno.EFBIG, "larger than one read, with no scratch to pull it")
        if patch.size > _LARGEST_PATCH:
            too_large = f"larger than the {_LARGEST_PATCH} bytes a patch may have"
            return DriveOSError(errno.EFBIG, too_large)
        work = scratch_path(self._scratch, "patch", ".patch")
        try:
            await pull_new(self._helper, self._folder / patch.name, work, self._timeout)
        except DriveOSError as exc:
            return None if exc.errno == errno.ENOENT else exc  # gone since the listing
        try:
            return await anyio.to_thread.run_sync(work.read_bytes)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_quietly, work)
