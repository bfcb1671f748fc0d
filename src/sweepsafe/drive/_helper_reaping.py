"""Helper processes that were ended but not reaped yet: reaped by poll(), never waited on
while the program runs.

A killed helper may be stuck in the kernel on a stalled mount, so nothing waits for one
then; at exit, every ended helper gets one shared, bounded moment to exit.
"""

from __future__ import annotations

import atexit
import collections
import os
import subprocess
import time
from contextlib import suppress

__all__ = ["reap_ended_helpers"]

_EXIT_GRACE_S = 0.5

# Helpers that were ended (closed or killed) but have not been reaped yet. Keeping the
# Popen objects here means none is garbage-collected while running (no ResourceWarning)
# and none is waited on, except for a bounded moment at exit.
#
# No lock guards it: a store's finalizer ends its helpers, and a finalizer runs wherever
# the garbage collector happens to run, which can be inside any code that allocates,
# including code holding such a lock; the lock would then be taken twice by one thread,
# for ever. A deque's append and popleft are atomic, and an entry taken out to be polled
# is put back unless its process exited, so none is lost to a concurrent reaper.
_unreaped: collections.deque[subprocess.Popen[bytes]] = collections.deque()


def _take_all() -> list[subprocess.Popen[bytes]]:
    taken = []
    while True:
        try:
            taken.append(_unreaped.popleft())
        except IndexError:
            return taken


def reap_ended_helpers() -> None:
    """Forget ended helpers that have exited; never blocks."""
    for process in _take_all():
        if process.poll() is None:
            _unreaped.append(process)


@atexit.register
def _reap_at_exit() -> None:
    """Give ended helpers, closed or killed, one shared moment to exit, and reap them.

    A killed helper usually dies at once, but on a busy machine not before the next
    line runs; one stuck in the kernel on a stalled mount never does, and is left to
    init once the moment is over, so exit never waits longer than that.
    """
    deadline = time.monotonic() + _EXIT_GRACE_S
    for process in _take_all():
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        if process.poll() is None:
            _unreaped.append(process)


def _forget_after_fork() -> None:
    # The helpers are the parent's children: a forked child can neither wait for nor reap
    # them, and must not kill them.
    _unreaped.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _abandon(process: subprocess.Popen[bytes], *, kill: bool) -> None:
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()
    if kill and process.poll() is None:
        with suppress(ProcessLookupError):
            process.kill()
    if process.poll() is None:
        _unreaped.append(process)
