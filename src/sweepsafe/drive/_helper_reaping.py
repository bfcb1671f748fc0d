"""Helper processes that were ended but not reaped yet: never waited on, reaped by poll().

A killed helper may be stuck in the kernel on a stalled mount, so nothing ever waits for
one; at exit, helpers that were closed normally get a moment to exit.
"""

from __future__ import annotations

import atexit
import subprocess
import threading
import time
from contextlib import suppress

__all__ = ["reap_ended_helpers"]

_EXIT_GRACE_S = 0.5

# Helpers that were ended (closed or killed) but have not been reaped yet, with whether
# they were killed (possibly stuck). Keeping the Popen objects here means none is
# garbage-collected while running (no ResourceWarning) and none is waited on.
_unreaped: list[tuple[subprocess.Popen[bytes], bool]] = []
_unreaped_lock = threading.Lock()


def reap_ended_helpers() -> None:
    """Forget ended helpers that have exited; never blocks."""
    with _unreaped_lock:
        _unreaped[:] = [entry for entry in _unreaped if entry[0].poll() is None]


@atexit.register
def _reap_at_exit() -> None:
    """Give helpers that were closed normally a moment to exit; never wait on killed ones.

    A killed helper may be stuck in the kernel on a stalled mount; it is left to init.
    """
    deadline = time.monotonic() + _EXIT_GRACE_S
    with _unreaped_lock:
        entries = list(_unreaped)
    for process, killed in entries:
        if killed:
            process.poll()
            continue
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    reap_ended_helpers()


def _abandon(process: subprocess.Popen[bytes], *, kill: bool) -> None:
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()
    if kill and process.poll() is None:
        with suppress(ProcessLookupError):
            process.kill()
    if process.poll() is None:
        with _unreaped_lock:
            _unreaped.append((process, kill))
