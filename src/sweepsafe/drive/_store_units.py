"""The study folders of a store: which one a path belongs to, and their leases.

Each study folder (a :class:`~sweepsafe.drive._unit.StudyUnit`) has its own identity
and lease on Drive. A store keeps one unit per folder it met; the lease functions walk
the ones it asks about, and log what a failing Drive cost instead of raising where the
store's face promises not to raise.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.drive._operations import DATABASE_SUFFIXES
from sweepsafe.drive._unit import StudyUnit
from sweepsafe.errors import LeaseHeldError
from sweepsafe.paths import is_within

if TYPE_CHECKING:
    from sweepsafe.drive._backend import StrPath
    from sweepsafe.drive._helper_client import HelperPool
    from sweepsafe.drive._unit import StoreSettings

__all__ = [
    "StudyFolders",
    "claim_lease",
    "release_leases",
    "renew_leases",
    "take_lease",
    "try_lease",
]

logger = logging.getLogger("sweepsafe.drive")

STUDY_DB_NAME = "study.db"


class StudyFolders:
    """The study folders a store met, one :class:`StudyUnit` each, found by path."""

    local_root: Path
    _settings: StoreSettings
    _units: dict[str, StudyUnit]
    _units_lock: threading.Lock

    def _unit_for(self, path: Path, is_directory: bool, *, study: bool = False) -> StudyUnit:
        """The study folder ``path`` belongs to (``study``: ``path`` is one).

        A study folder is one this store was told of (a lease taken on it, a database
        backed up or restored in it), else the nearest folder holding a ``study.db``, else
        the folder directly under the local root (the root itself for files in it).
        Blocking: it may ``stat`` a few local folders.
        """
        if study:
            return self._unit(path.relative_to(self.local_root).as_posix())
        with self._units_lock:
            known = [rel for rel in self._units if self._units[rel].registered]
        start = path if is_directory else path.parent
        for folder in (start, *start.parents):
            if not is_within(folder, self.local_root):
                break
            rel = folder.relative_to(self.local_root).as_posix()
            rel = "" if rel == "." else rel
            if rel in known or (folder / STUDY_DB_NAME).is_file():
                return self._unit(rel)
            if folder == self.local_root:
                break
        parts = path.relative_to(self.local_root).parts
        return self._unit(parts[0] if len(parts) > 1 or (parts and is_directory) else "")

    def _unit_to_restore(self, target: Path, is_directory: bool, database: bool) -> StudyUnit:
        """The study folder a restore of ``target`` works in (``database``: it is one).

        A database's folder is its study folder, as when it was backed up; on a fresh
        disk there is no local ``study.db`` yet to find it by. Blocking, as ``_unit_for``.
        """
        if not is_directory and (database or target.suffix in DATABASE_SUFFIXES):
            rel = target.parent.relative_to(self.local_root).as_posix()
            return self._unit(rel, register=True)
        return self._unit_for(target, is_directory)

    def _study_unit(self, study_dir: StrPath) -> StudyUnit:
        """The unit of the study folder ``study_dir``, registered as a study; no I/O.

        Raises:
            ValueError: ``study_dir`` is not under the local root.
        """
        return self._unit(self._rel(study_dir), register=True)

    def _known_unit(self, study_dir: StrPath) -> StudyUnit | None:
        """The unit of ``study_dir`` if the store has one already; no I/O, no new unit.

        Raises:
            ValueError: ``study_dir`` is not under the local root.
        """
        with self._units_lock:
            return self._units.get(self._rel(study_dir))

    def _rel(self, study_dir: StrPath) -> str:
        rel = Path(os.path.abspath(study_dir)).relative_to(self.local_root).as_posix()
        return "" if rel == "." else rel

    def _unit(self, rel: str, *, register: bool = False) -> StudyUnit:
        rel = "" if rel == "." else rel
        with self._units_lock:
            unit = self._units.get(rel)
            if unit is None:
                unit = self._units[rel] = StudyUnit(self._settings, rel)
            unit.registered = unit.registered or register
            return unit


async def take_lease(unit: StudyUnit, pool: HelperPool, *, takeover: bool, shared: bool) -> None:
    """Take ``unit``'s lease; another runtime's live lease is no error in a shared study.

    Raises:
        LeaseHeldError: another runtime holds a live lease (not ``shared``, not
            ``takeover``).
        OSError, DriveTimeout: Drive failed or did not answer.
    """
    unit.shared = unit.shared or shared
    await unit.load()
    async with pool.session() as helper:
        try:
            await unit.ensure_lease(helper, takeover=takeover)
        except LeaseHeldError:
            if not shared:
                raise


async def claim_lease(unit: StudyUnit, pool: HelperPool) -> None:
    """Check ``unit``'s lease is free, writing nothing; the first backup takes it.

    Raises:
        LeaseHeldError: another runtime holds a live lease.
        OSError, DriveTimeout: Drive failed or did not answer.
    """
    await unit.load()
    async with pool.session() as helper:
        await unit.claim(helper)


async def try_lease(unit: StudyUnit, pool: HelperPool) -> bool:
    """Try to take ``unit``'s lease; False if another runtime holds it or Drive failed."""
    await unit.load()
    try:
        async with pool.session() as helper:
            await unit.ensure_lease(helper)
    except LeaseHeldError:
        return False
    except (OSError, DriveTimeout) as exc:
        logger.warning("Could not take the lease on %s: %s", unit.drive, exc)
        return False
    return True


async def renew_leases(units: Iterable[StudyUnit], pool: HelperPool) -> None:
    """Renew the leases held among ``units``; never raises."""
    for unit in units:
        if not unit.holds_lease:
            continue
        try:
            async with pool.session() as helper:
                await unit.renew(helper)
        except LeaseHeldError as exc:
            # Expected in a shared study (another worker exports now); said once
            # where a single runtime was taken over.
            (logger.info if unit.shared else logger.warning)(
                "Could not renew the lease on %s: %s", unit.drive, exc
            )
        except (OSError, DriveTimeout) as exc:
            logger.warning("Could not renew the lease on %s: %s", unit.drive, exc)


async def release_leases(units: Iterable[StudyUnit], pool: HelperPool) -> None:
    """Give back the leases of ``units``; never raises."""
    for unit in units:
        try:
            async with pool.session() as helper:
                await unit.release(helper)
        except (OSError, DriveTimeout) as exc:
            logger.warning("Could not release the lease on %s: %s", unit.drive, exc)
