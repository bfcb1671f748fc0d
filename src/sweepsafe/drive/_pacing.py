"""Spacing a sweep's database backups so that their work on this machine stays a small share.

Each backup of a study database takes a snapshot, reads what it holds and compares it
with the last one: work on this machine that grows with the database, in threads that
share the CPU and Python's lock with the sweep. For a small study it takes a few
milliseconds and the Drive write is what spaces the backups. For a large one on a fast
Drive it is a tenth of a second or more at every trial, and the trials themselves slow
down: a 20,000-trial study's trials took half again as long. So the backup a sweep asks
for after a trial waits until the last one's local work is at most ``LOCAL_WORK_SHARE``
of the time since it began; the trials that end meanwhile go in the same backup. A
backup asked for by name (``DriveStore.backup``), the first one and the one at the end of
the sweep never wait for a turn, and a flush (the end of a sweep) ends a wait for one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

__all__ = ["LOCAL_WORK_SHARE", "LONGEST_WAIT_S", "LocalWork", "Pace"]

LOCAL_WORK_SHARE = 0.1
"""The share of the time a sweep's database backups may spend working on this machine."""

LONGEST_WAIT_S = 30.0
"""A backup never waits longer than this for its turn, however slow the last one was."""

T = TypeVar("T")


@dataclass
class LocalWork:
    """How long one backup has worked on this machine so far."""

    seconds: float = 0.0

    async def timed(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` and count its time."""
        began = time.monotonic()
        try:
            return await work()
        finally:
            self.seconds += time.monotonic() - began


@dataclass
class Pace:
    """When a target's last backup began, and how long it worked on this machine."""

    started: float = -math.inf
    work: float = 0.0

    def wait(self, now: float) -> float:
        """Seconds the next backup waits, at ``now``, before it begins."""
        due = self.started + self.work / LOCAL_WORK_SHARE
        return min(LONGEST_WAIT_S, max(0.0, due - now))

    async def take_turn(self, sleep: Callable[[float], Awaitable[None]] = anyio.sleep) -> None:
        """Wait for the next backup's turn (by ``sleep``, which may end early), then count
        it as begun."""
        delay = self.wait(time.monotonic())
        if delay > 0:
            await sleep(delay)
        self.started = time.monotonic()
