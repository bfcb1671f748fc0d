"""Run an async function to completion from synchronous code, wherever that code runs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.from_thread

__all__ = ["run_blocking"]

T = TypeVar("T")


def run_blocking(func: Callable[[], Awaitable[T]]) -> T:
    """Run ``func()`` to completion and return its result; blocks the caller.

    A plain script or thread gets a short-lived event loop of its own. A Jupyter or
    Colab cell already runs inside the kernel's event loop, where ``anyio.run`` would
    refuse, so there the loop runs in a helper thread instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(func, backend="asyncio")
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        return portal.call(func)
