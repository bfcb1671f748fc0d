"""Talk to Drive helper processes from any thread or event loop, with a deadline per step.

A :class:`HelperPool` keeps idle helpers. A call takes one exclusively
(:meth:`HelperPool.session`), drives its non-blocking pipes with ``anyio.wait_readable``
and ``anyio.wait_writable`` (so any event loop in any thread can use it), and gives it
back. A helper that misses a deadline, or whose request was cancelled half-way, is
SIGKILLed and abandoned without waiting: it may be stuck in the kernel on a stalled
mount. Abandoned processes are kept and reaped with ``poll()`` later, never waited on
(``_helper_reaping``). One helper and its typed requests: ``_drive_helper``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from sweepsafe.drive import _helper_process
from sweepsafe.drive._drive_helper import DriveHelper
from sweepsafe.drive._helper_reaping import reap_ended_helpers

__all__ = ["HELPER_SCRIPT", "HelperPool", "default_helper_argv"]

logger = logging.getLogger(__name__)

HELPER_SCRIPT = Path(_helper_process.__file__).resolve()

_live_pools: weakref.WeakSet[HelperPool] = weakref.WeakSet()


def _forget_idle_helpers_after_fork() -> None:
    """In a forked child: every idle helper stays the parent's; the child starts its own."""
    for pool in list(_live_pools):
        pool._forget_idle_after_fork()


os.register_at_fork(after_in_child=_forget_idle_helpers_after_fork)


def default_helper_argv() -> list[str]:
    """The command that starts a real helper."""
    return [sys.executable, "-I", str(HELPER_SCRIPT)]


class HelperPool:
    """Idle helper processes for one store, shared by every thread and event loop."""

    def __init__(
        self,
        argv: Sequence[str] | None = None,
        anchor: str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        place: str | None = None,
        place_root: str | None = None,
    ) -> None:
        """``anchor``: an existing Drive folder above which no folder is ever created;
        ``env``, ``place`` and ``place_root``: see :class:`DriveHelper`."""
        self.anchor = anchor
        self.env = env
        self.place = place
        self.place_root = place_root
        self.commit_s_per_mib = 0.0
        """See :class:`DriveHelper`; an ObjectStore sets it."""
        self.conditional_writes = False
        """The store writes an object only if it is still the version read (S3's
        ``If-Match`` and ``If-None-Match``): the lease is taken with such writes."""
        self.unfinished_uploads = False
        """A killed helper can leave an upload unfinished (S3's multipart uploads), which
        the study's owner aborts; an ObjectStore sets it."""
        self.argv = list(argv) if argv is not None else default_helper_argv()
        self._idle: list[DriveHelper] = []
        self._lock = threading.Lock()
        self._closed = False
        _live_pools.add(self)

    def _forget_idle_after_fork(self) -> None:
        # The idle helpers' pipes are shared with the parent, which goes on using them:
        # a request from the child would interleave with the parent's on one helper.
        self._lock = threading.Lock()
        self._idle = []

    def _take(self) -> DriveHelper:
        reap_ended_helpers()
        while True:
            with self._lock:
                if not self._idle:
                    break
                helper = self._idle.pop()
            if helper.process.poll() is None:
                return helper
            helper.end(kill=False)  # it died while idle (OOM killer, kill by hand)
        return DriveHelper(
            self.argv,
            self.anchor,
            env=self.env,
            place=self.place,
            place_root=self.place_root,
            commit_s_per_mib=self.commit_s_per_mib,
        )

    def _give_back(self, helper: DriveHelper) -> None:
        if helper.broken:
            # Only a detail: whoever was waiting for it reports the failure in its own words.
            logger.info(
                "Abandoned a Drive helper process (pid %d) that missed its deadline or was "
                "interrupted mid-request; it exits once the Drive mount answers",
                helper.process.pid,
            )
            helper.end(kill=True)
            return
        with self._lock:
            if not self._closed:
                self._idle.append(helper)
                return
        helper.end(kill=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[DriveHelper]:
        """Hold one helper exclusively for a sequence of requests."""
        helper = await anyio.to_thread.run_sync(self._take) if not self._idle else self._take()
        try:
            yield helper
        finally:
            self._give_back(helper)

    def close(self) -> None:
        """End idle helpers without waiting for them; helpers in use end when released."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for helper in idle:
            helper.end(kill=False)
        reap_ended_helpers()
