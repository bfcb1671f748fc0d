"""The next version of a large file, captured while the one before it ships to Drive.

A checkpoint rewritten at the end of every trial is being written for much of each
trial. A copy to Drive that begins while the next version is being written waits for
that write to finish before it can capture anything, and Drive sits idle meanwhile. So
while a large file ships, and until its folder copy ends, its newest finished version is
captured on the local disk (a *spare*). A backup that begins a moment later and finds the
file in the middle of a write ships the spare at once: it is the newest finished version,
newer than Drive's. A backup that finds the file finished captures it afresh, and the
final backup of a sweep never ships a spare (its folder job has none).

The spare is used only while it is known to be the newest finished version: taken within
a moment of the end of the watch that captured it, with no later version seen finished,
while a process still holds the file open for writing. Otherwise the backup captures as
it would without one.

A spare costs a local copy of the file, so once the file's ship time and rewrite period
are known, only the last version expected to finish before the ship ends is captured: one
spare per ship, not one per version. And none is taken unless the disk keeps room for the
training code's next version of the file beside it, and a margin.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from sweepsafe.drive._files import (
    Captured,
    NotARegularFile,
    SourceChanging,
    capture_file,
    remove_quietly,
    scratch_path,
    settled_signature,
)
from sweepsafe.drive._local_state import Signature, file_signature
from sweepsafe.drive._open_writers import open_for_writing

__all__ = ["Spares"]

_LOOK_S = 0.1  # how often a watched file is looked at for a new version
_MARGIN_MAX = 1 << 30  # free space kept beyond a spare: 5% of the disk, at most 1 GiB
_FRESH_S = 0.2  # how long after its watch ended a spare is still known to be the newest


@dataclass
class Spares:
    """The spares of one study's large files, and what is known of each file's versions.

    Used from the event loop's thread only (``drop_all`` apart).
    """

    scratch: Path
    captured: dict[str, Captured] = field(default_factory=dict)
    ship_seconds: dict[str, float] = field(default_factory=dict)
    """How long the last ship of each file took: the next is expected to take as long."""
    newest: dict[str, Signature] = field(default_factory=dict)
    """The newest finished version of each file that a watch saw."""
    watched_until: dict[str, float] = field(default_factory=dict)
    writing_at_end: dict[str, int] = field(default_factory=dict)
    """The size of each file whose next version was being written as its watch ended."""
    watching: set[str] = field(default_factory=set)

    def take(self, rel: str) -> Captured | None:
        """The spare of ``rel``, now the caller's to ship (see :meth:`ships`) or remove."""
        if rel in self.watching:
            return None  # another backup's watch is still keeping it
        return self.captured.pop(rel, None)

    def ships(self, rel: str, source: Path, spare: Captured) -> bool:
        """Whether ``spare`` is to be shipped rather than ``source`` captured: it is the
        source as it stands, or it is the newest finished version and the write that was
        in progress as its watch ended still is (a capture would wait for that write, and
        Drive with it). Blocking."""
        info = os.stat(source)
        if file_signature(info) == spare.signature:
            return True
        if self.newest.get(rel) != spare.signature:
            return False  # a newer version was seen finished
        if time.monotonic() - self.watched_until.get(rel, float("-inf")) > _FRESH_S:
            return False  # unwatched for too long: another version may have been finished
        size = self.writing_at_end.get(rel)
        # Still being written (a write starts from nothing, so a new one since would be
        # smaller, unless it went far within a moment) by a process holding it open.
        return size is not None and info.st_size >= size and open_for_writing(info, source.name)

    def put(self, rel: str, captured: Captured) -> None:
        """Keep ``captured`` as the spare of ``rel``, removing the older one."""
        older = self.captured.pop(rel, None)
        if older is not None:
            remove_quietly(older.path)
        self.captured[rel] = captured

    def drop_all(self) -> None:
        """Remove every spare (blocking; local files only)."""
        while self.captured:
            _, spare = self.captured.popitem()
            remove_quietly(spare.path)

    def record_ship(self, rel: str, seconds: float) -> None:
        self.ship_seconds[rel] = seconds

    async def watch(self, rel: str, source: Path, shipping: Signature, started: float) -> None:
        """From the start of a ship of ``shipping`` (a version of ``source``) until
        cancelled, keep the newest finished version of ``source`` as the spare of ``rel``.

        Never raises for the file (it vanished, cannot be read, the disk is full: no
        spare then). One watch per file at a time.
        """
        if rel in self.watching:
            return
        self.watching.add(rel)
        self.newest[rel] = shipping
        try:
            await self._watch(rel, source, shipping, started)
        except (OSError, SourceChanging, NotARegularFile):
            self.newest.pop(rel, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self._end_watch(rel, source)

    async def _watch(self, rel: str, source: Path, seen: Signature, started: float) -> None:
        expected = self.ship_seconds.get(rel)
        last_start: float | None = None
        check = anyio.from_thread.check_cancelled
        while True:
            await anyio.sleep(_LOOK_S)
            info = await anyio.to_thread.run_sync(os.stat, source)
            if file_signature(info) == seen:
                continue
            now = time.monotonic()  # a new version has begun
            period = None if last_start is None else now - last_start
            last_start = now
            ends = None if expected is None else started + expected
            later = ends is not None and period is not None and now + period < ends
            size = max(info.st_size, seen[0])
            if later or not await anyio.to_thread.run_sync(self._room_for, size):
                # Another version is expected to finish before this ship ends, or the
                # disk is short of room: let this one pass without a copy.
                seen = await anyio.to_thread.run_sync(settled_signature, source, check)
                self.newest[rel] = seen
                continue
            spare = await self._capture(source, check)
            if spare is None:  # it became a database
                self.newest.pop(rel, None)
                return
            self.put(rel, spare)
            self.newest[rel] = seen = spare.signature

    def _room_for(self, size: int) -> bool:
        """Whether a spare of ``size`` bytes leaves the local disk room for the training
        code's next version of the file (written beside the old one by a save that
        renames into place) and a margin: a spare must never fill the disk under it."""
        try:
            disk = os.statvfs(self.scratch)
        except OSError:
            return False
        margin = min(_MARGIN_MAX, disk.f_blocks * disk.f_frsize // 20)
        return disk.f_bavail * disk.f_frsize >= 2 * size + margin

    async def _capture(self, source: Path, check: Callable[[], None]) -> Captured | None:
        target = scratch_path(self.scratch, "spare")
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(capture_file, source, target, check_cancelled=check)
            )
        except BaseException:
            # Cancelled as it ended: the copy is no one's.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_quietly, target)
            raise

    async def _end_watch(self, rel: str, source: Path) -> None:
        # The spare stays the newest finished version if the file is still that version,
        # or a process holds it open, writing the next one. A version finished as the
        # watch was cancelled (its capture cut short) is newer than the spare.
        def state_at_end() -> tuple[bool, int | None]:
            try:
                info = os.stat(source)
            except OSError:
                return False, None
            if file_signature(info) == self.newest.get(rel):
                return True, None
            if open_for_writing(info, source.name):
                return True, info.st_size
            return False, None

        still, writing = await anyio.to_thread.run_sync(state_at_end)
        if not still:
            self.newest.pop(rel, None)
        self.writing_at_end.pop(rel, None)
        if writing is not None:
            self.writing_at_end[rel] = writing
        self.watched_until[rel] = time.monotonic()
        self.watching.discard(rel)
