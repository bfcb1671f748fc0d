"""Fixtures shared by every test module.

``drive``: a DriveStore over a simulated Drive (faults changed with ``drive.set_faults``);
``private_worker``: a backup worker of the test's own; and, for every test, the
process-wide default worker closed and forgotten afterwards, so none leaks into the next;
``postgres_server`` and ``postgres_database``: a PostgreSQL server the tests start themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from drive_support import DriveSetup, simulated_drive
from postgres_support import postgres_database, postgres_server
from sweep_support import own_worker
from sweepsafe.testing import reset_default_worker
from sweepsafe.worker import BackupWorker

__all__ = ["postgres_database", "postgres_server"]


@pytest.fixture
def drive(tmp_path: Path) -> Iterator[DriveSetup]:
    """A store over ``tmp_path/local`` -> ``tmp_path/drive`` on a simulated Drive, no faults."""
    with simulated_drive(tmp_path) as setup:
        yield setup


@pytest.fixture
def private_worker() -> Iterator[BackupWorker]:
    """A worker of the test's own (not the process-wide one), one attempt per job."""
    with own_worker() as worker:
        yield worker


@pytest.fixture(autouse=True)
def _fresh_default_worker() -> Iterator[None]:
    yield
    reset_default_worker()
