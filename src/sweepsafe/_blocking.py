"""Run an async function to completion from synchronous code, wherever that code runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio.from_thread

T = TypeVar("T")


def run_blocking(func: Callable[[], Awaitable[T]]) -> T:
    """Run ``func()`` on a short-lived event loop in its own thread and return its result.

    ``anyio.run`` would fail inside a Jupyter or Colab cell, whose thread already runs
    the kernel's asyncio loop; a separate thread has no such loop. Blocks the caller.
    """
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        return portal.call(func)
