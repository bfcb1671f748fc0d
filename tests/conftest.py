"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # aiofiles runs only on asyncio, and so does the worker's loop.
    return "asyncio"
