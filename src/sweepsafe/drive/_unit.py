"""One study folder and its Drive copy, as one runtime sees them.

A :class:`StudyUnit` is every folder directly under the store's local root (a
``study-<hash>`` folder of ``run_sweep``), plus one for the files directly in the
root. Before each backup it checks, on Drive, that the study folder is still the one it
knows (its identity) and that this runtime still owns it (its lease); it keeps the
manifest and the per-database records, and it serialises copies of the same folder or
database.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from sweepsafe.drive._drive_errors import DriveTimeout
from sweepsafe.drive._files import remove_orphans
from sweepsafe.drive._folder_job import EntryProblem, FolderJob, FolderOutcome, PublishDatabase
from sweepsafe.drive._folders import sync_folder, sync_folders
from sweepsafe.drive._generations import history_root
from sweepsafe.drive._local_state import Manifest, Signature, UnitState, unit_state_dir
from sweepsafe.drive._replica import (
    Lease,
    acquire_lease,
    check_lease,
    read_identity,
    read_lease,
    release_lease,
    this_runtime,
    write_identity,
)
from sweepsafe.drive._reserved_names import STATE_DIR_NAME
from sweepsafe.drive._runtime_temps import folders_with_abandoned
from sweepsafe.drive._spares import Spares
from sweepsafe.errors import LeaseHeldError
from sweepsafe.paths import is_within

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper
    from sweepsafe.drive._helper_client import HelperPool
    from sweepsafe.drive._pacing import LocalWork
    from sweepsafe.drive._sqlite import DatabaseContent

__all__ = ["HOLD_BACK_S", "StoreSettings", "StudyUnit", "TrialFilesHeldBack"]

logger = logging.getLogger("sweepsafe.drive")


@dataclass(frozen=True)
class StoreSettings:
    """What every study folder of one store shares."""

    pool: HelperPool
    local_root: Path
    drive_root: Path
    timeout: float
    file_concurrency: int
    lease_timeout: float
    keep_generations: int
    compact_fraction: float
    trial_folder: str
    clock: Callable[[], float]

    @property
    def scratch(self) -> Path:
        """Local scratch space for snapshots and captures."""
        return self.local_root / STATE_DIR_NAME / "scratch"


HOLD_BACK_S = 60.0
"""How long a trial file failing in a way a retry may mend holds its database back.

Past that, or at the end of a sweep, the database goes to Drive without it, the file
is named as missing (the report is incomplete; restore and verify name its trial), and
every later backup tries it again: one bad file must not keep every later trial off
Drive."""


class TrialFilesHeldBack(Exception):
    """Files of finished trials are still failing to reach Drive, so the database waits."""


class _LoopLocks:
    """An ``anyio.Lock`` per key and per event loop (a store serves several loops)."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[tuple[int, Hashable], anyio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._guard = threading.Lock()

    def get(self, key: Hashable) -> anyio.Lock:
        loop_key = (id(asyncio.get_running_loop()), key)
        with self._guard:
            lock = self._locks.get(loop_key)
            if lock is None:
                lock = anyio.Lock()
                self._locks[loop_key] = lock
            return lock


class StudyUnit:
    """A study folder, locally and on Drive, with its identity, lease and records."""

    def __init__(self, settings: StoreSettings, rel: str) -> None:
        self.settings = settings
        self.rel = rel
        self.local = settings.local_root / rel if rel else settings.local_root
        self.drive = settings.drive_root / rel if rel else settings.drive_root
        self._records = unit_state_dir(settings.local_root, settings.drive_root, rel)
        self._state: UnitState | None = None
        self._manifest: Manifest | None = None
        self._lease: Lease | None = None
        self._releases = 0
        """How many times the lease was given back: a renewal that began before one
        must not keep the lease it wrote (see :meth:`renew`)."""
        self._lease_guard = threading.Lock()
        """Orders giving the lease back (at a sweep's end, from the caller's thread)
        against a renewal keeping what it wrote (on the worker's event loop)."""
        self.lost: str | None = None
        """Why this runtime may no longer write this study's Drive copy."""
        self.claimed = False
        """A sweep checked the lease was free and left taking it to the first backup."""
        self.refused: str | None = None
        """Why that first take failed: another runtime got the study first (see
        :meth:`claim`). The sweep that claimed it then stops."""
        self.parent_content: dict[str, DatabaseContent] = {}
        """Per database: what the generation last published by this runtime holds."""
        self.conflicts: dict[str, tuple[int, frozenset[str], str]] = {}
        """Per database: the Drive head a refused publish met, and the refusal."""
        self.checked: set[str] = set()
        """Databases that passed the check against Drive's copy since this runtime took
        the lease: the files of their trials may go to Drive (a study started anew in the
        same folder, or by another sweep, is checked again first)."""
        self.local_work: dict[str, LocalWork] = {}
        """Per database: how long its last backup worked on this machine."""
        self._cleaned = False
        self.shared = False
        """Several workers share this study (a database server): see :meth:`prepare`."""
        self.registered = False
        """This folder is known to be a study (a lease, or a database of it)."""
        self.failing_since: dict[str, float] = {}
        """Trial files still failing in a way a retry may mend: since when (``clock``)."""
        self.landing: dict[str, Signature] = {}
        """Files copied to Drive whose folder a job has yet to sync (see ``FolderJob``)."""
        self.spares = Spares(settings.scratch)
        self.locks = _LoopLocks()
        self._load_guard = _LoopLocks()

    def __repr__(self) -> str:
        return f"<StudyUnit {self.local} -> {self.drive}>"

    @property
    def state(self) -> UnitState:
        """The records (after :meth:`load`)."""
        assert self._state is not None, "load() first"
        return self._state

    @property
    def manifest(self) -> Manifest:
        """The manifest (after :meth:`load`)."""
        assert self._manifest is not None, "load() first"
        return self._manifest

    def rel_of(self, path: Path) -> str:
        """``path`` relative to the study folder, as a POSIX path."""
        return path.relative_to(self.local).as_posix()

    async def load(self) -> None:
        """Read the local records once."""
        if self._state is not None and self._manifest is not None:
            return
        async with self._load_guard.get("load"):
            if self._state is not None and self._manifest is not None:
                return
            state = await UnitState.aload(self._records)
            manifest = await Manifest.aload(self._records)
            if manifest.unit_id != state.unit_id:
                manifest.reset(state.unit_id)
            await anyio.to_thread.run_sync(remove_orphans, self.settings.scratch)
            self._state, self._manifest = state, manifest

    # -- identity and lease, checked before every backup ------------------------------------
    async def prepare(self, helper: DriveHelper, *, for_database: bool = True) -> None:
        """Check the study folder on Drive is the one recorded and this runtime owns it.

        A folder deleted or replaced on Drive starts the records afresh, so everything is
        copied there again (and databases are compared with what Drive holds). In a study
        shared by several workers, a worker copies its own trials' files without the
        lease; only the database (the export) needs it (``for_database``).

        Raises:
            LeaseHeldError: another runtime owns it, or took it over from this one.
        """
        await self.load()
        needs_lease = for_database or not self.shared
        if self.lost is not None and needs_lease:
            raise LeaseHeldError(self.lost)
        timeout = self.settings.timeout
        state = self.state
        drive_id = await read_identity(helper, self.drive, timeout)
        known = state.unit_id is not None or len(self.manifest) > 0 or bool(state.databases)
        if drive_id != state.unit_id and known:
            what = "deleted" if drive_id is None else "replaced by another copy"
            logger.warning(
                "%s was %s on Google Drive since the last backup; everything is copied "
                "there again.",
                self.drive,
                what,
            )
            self.forget_drive_copy()
        if needs_lease:
            await self.ensure_lease(helper)
        if drive_id is None:
            drive_id = await write_identity(helper, self.drive, timeout, self.settings.clock)
        if state.unit_id != drive_id:
            state.unit_id = drive_id
            self.manifest.reset(drive_id)
            self.landing.clear()
            await state.asave()
        if not self.holds_lease:
            return  # another worker of a shared study may have copies in flight here
        if state.strays:
            # Left by a runtime that died mid-copy; this runtime owns the folder now.
            await helper.remove([self.drive / rel for rel in state.strays], timeout)
            state.strays = []
            await state.asave()
        await self._clean_temporaries(helper)

    async def _clean_temporaries(self, helper: DriveHelper) -> None:
        """Remove temporaries that killed copies left in sweepsafe's own Drive folders.

        Once per runtime for a dead runtime's leftovers (this one owns the study now),
        and whenever one of this runtime's helpers was abandoned mid-write.
        """
        timeout = self.settings.timeout
        if not self._cleaned:
            async with self.locks.get("first clean"):
                if not self._cleaned:
                    await self._clean_once(helper)
                    self._cleaned = True
        folders = {f for f in folders_with_abandoned() if is_within(f, self.drive)}
        for folder in sorted(folders):
            await helper.clean(folder, timeout)

    async def _clean_once(self, helper: DriveHelper) -> None:
        """A dead runtime's leftovers: temporaries, and in an object store the uploads it
        left unfinished under the study. This runtime's other jobs wait for it (the
        caller holds a lock), so none of its own uploads is in flight yet."""
        timeout = self.settings.timeout
        state = self.drive / STATE_DIR_NAME
        listing = await helper.listdir(history_root(self.drive), timeout)
        folders = {self.drive, state}
        folders.update(
            history_root(self.drive) / e.name for e in listing.entries if e.kind == "dir"
        )
        uploads = self.settings.pool.unfinished_uploads
        for folder in sorted(folders):
            await helper.clean(folder, timeout, uploads=uploads and folder == self.drive)

    def forget_drive_copy(self) -> None:
        """Forget what was known to be on Drive: it is gone or not ours."""
        self.manifest.reset(None)
        self.landing.clear()
        self.state.unit_id = None
        self.state.databases.clear()
        self.parent_content.clear()
        self.conflicts.clear()
        self.checked.clear()

    async def ensure_lease(self, helper: DriveHelper, *, takeover: bool = False) -> Lease:
        """Own the study on Drive: take a free lease, renew ours, or refuse.

        Raises:
            LeaseHeldError: another runtime owns it (or took it over from this one).
        """
        lease = await self._ensure_lease(helper, takeover=takeover, renewal=None)
        assert lease is not None
        return lease

    async def renew(self, helper: DriveHelper) -> None:
        """Renew the lease this runtime holds, if it still holds one.

        The backup worker renews on its own event loop while the end of a sweep gives
        the lease back from the caller's thread. A release that comes while a renewal
        is under way wins: a lease the renewal wrote is given back again, so the next
        runtime need not wait it out.

        Raises:
            LeaseHeldError: another runtime took the study over.
        """
        with self._lease_guard:
            if not self.holds_lease:
                return
            releases = self._releases
        await self._ensure_lease(helper, takeover=False, renewal=releases)

    async def _ensure_lease(
        self, helper: DriveHelper, *, takeover: bool, renewal: int | None
    ) -> Lease | None:
        settings = self.settings
        held = self._lease
        if held is not None and not takeover:
            current = await read_lease(helper, self.drive, settings.timeout)
            if current is not None and not current.owner.is_same_process(this_runtime()):
                if self.shared:
                    # Another worker of a shared study exports now; this one may take
                    # the lease again when that one's lease lapses.
                    self._lease = None
                    raise LeaseHeldError(f"another worker holds the lease on {self.drive}")
                self.lost = (
                    f"another runtime ({current.owner.describe(settings.clock)}) took over "
                    f"{self.drive} on Google Drive, so this runtime stopped backing it up "
                    "there rather than overwrite its work; the sweep goes on here, on local "
                    "disk. When that runtime is done, run again with takeover to back this "
                    "study up."
                )
                raise LeaseHeldError(self.lost)
            fresh = settings.clock() - held.heartbeat < settings.lease_timeout / 4
            if current is not None and not current.released and fresh:
                return held
            if renewal is not None and current is not None and current.released:
                # Given back by this process: the end of a sweep through another store
                # (a notebook cell run again makes a new one). A heartbeat never takes a
                # lease back; this store's next backup does, if it makes one.
                with self._lease_guard:
                    if self._lease is held:
                        self._lease = None
                return None
        if renewal is not None and renewal != self._releases:
            return None  # given back meanwhile: nothing to renew
        if self._lease is None:
            self.checked.clear()
        try:
            lease = await acquire_lease(
                helper,
                self.drive,
                timeout=settings.timeout,
                lease_timeout=settings.lease_timeout,
                takeover=takeover,
                clock=settings.clock,
                conditional=settings.pool.conditional_writes,
            )
        except LeaseHeldError as exc:
            if self.claimed and self._lease is None and not takeover and not self.shared:
                # Checked free when the sweep started, taken by another runtime since.
                self.refused = self.lost = str(exc)
            raise
        with self._lease_guard:
            kept = renewal is None or renewal == self._releases
            if kept:
                self._lease = lease
        if not kept:
            # Given back while this renewal wrote it: the release may have landed first.
            await release_lease(
                helper,
                self.drive,
                settings.timeout,
                settings.clock,
                conditional=settings.pool.conditional_writes,
            )
            return None
        if takeover:
            self.lost = None
            self.refused = None
        return lease

    async def claim(self, helper: DriveHelper) -> None:
        """Check, writing nothing, that no other runtime holds a live lease on the study.

        The first backup takes the lease (:meth:`prepare`), so a sweep never waits for
        a Drive write to start. Should another runtime take the study in between, that
        backup records it in :attr:`refused`.

        Raises:
            LeaseHeldError: another runtime holds a live lease.
        """
        settings = self.settings
        self.claimed = True
        if self.holds_lease:
            return
        await check_lease(
            helper,
            self.drive,
            timeout=settings.timeout,
            lease_timeout=settings.lease_timeout,
            clock=settings.clock,
        )
        if self.refused is not None or self.lost is not None:
            # An earlier sweep was refused the study, or lost it to a runtime that has
            # given it back (or gone quiet) since: this sweep may go on, and its first
            # backup takes the lease afresh rather than renew the one that was lost.
            with self._lease_guard:
                self._lease = None
            self.lost = self.refused = None

    @property
    def holds_lease(self) -> bool:
        """This runtime took the lease and has not released or lost it."""
        return self._lease is not None and self.lost is None

    async def release(self, helper: DriveHelper) -> None:
        """Give the lease back, so that the next runtime needs no wait."""
        with self._lease_guard:
            if self._lease is None:
                return
            self._lease = None
            self._releases += 1
        self.checked.clear()
        if self.settings.pool.unfinished_uploads and self.lost is None:
            # Called once this runtime's jobs are done: an upload still open under the
            # study is one of its helpers', abandoned at a deadline. Aborted only while
            # the lease is still this runtime's: after a takeover it is the new owner's.
            try:
                current = await read_lease(helper, self.drive, self.settings.timeout)
                if (
                    current is not None
                    and current.owner.is_same_process(this_runtime())
                    and not current.released
                ):
                    await helper.clean(self.drive, self.settings.timeout, uploads=True)
            except (OSError, DriveTimeout) as exc:
                logger.warning("Could not abort unfinished uploads in %s: %s", self.drive, exc)
        await release_lease(
            helper,
            self.drive,
            self.settings.timeout,
            self.settings.clock,
            conditional=self.settings.pool.conditional_writes,
        )

    # -- folders ------------------------------------------------------------------------------
    def folder_job(
        self, publish: PublishDatabase | None = None, *, final: bool = False
    ) -> FolderJob:
        """The context of a folder copy in this study. A ``final`` one (the end of a sweep)
        ships no kept version of a file being rewritten: it waits for the newest."""
        settings = self.settings
        return FolderJob(
            pool=settings.pool,
            unit_local=self.local,
            unit_drive=self.drive,
            manifest=self.manifest,
            timeout=settings.timeout,
            scratch=settings.scratch,
            concurrency=settings.file_concurrency,
            publish_database=publish,
            file_lock=lambda rel: self.locks.get(("file", rel)),
            landing=self.landing,
            spares=None if final else self.spares,
            check_drive=final,
        )

    async def sync(
        self,
        folder: Path,
        *,
        exclude: Sequence[str] = (),
        mirror: bool = False,
        job: FolderJob | None = None,
    ) -> FolderOutcome:
        """Copy a folder of this study (one at a time per folder)."""
        async with self.locks.get(("folder", folder)):
            return await sync_folder(
                job or self.folder_job(), folder, exclude=exclude, mirror=mirror
            )

    async def sync_trial_folders(
        self, database_folder: Path, numbers: Sequence[int], *, final: bool = False
    ) -> dict[int, list[str]]:
        """Make sure the folders of trials ``numbers`` are on Drive before their database.

        Returns, per trial, the files Drive refused for good, that keep changing, or that
        have failed for :data:`HOLD_BACK_S` (at the end of a sweep, ``final``: that
        failed at all, as no later backup is coming to wait for): they do not hold the
        database back, and are named, and every later backup tries them again. A folder
        already copied costs a local scan; the folders' files are copied together, many
        at once.

        Raises:
            TrialFilesHeldBack: a file failed in a way a retry may mend, and has not
                been failing for long.
        """
        wanted = {
            number: database_folder / self.settings.trial_folder.format(number=number)
            for number in numbers
        }
        folders = await anyio.to_thread.run_sync(
            lambda: {number: folder for number, folder in wanted.items() if folder.is_dir()}
        )
        if not folders:
            return {}
        outcome = await sync_folders(self.folder_job(), list(folders.values()))
        if outcome.stopped is not None:
            raise TrialFilesHeldBack(
                f"the files of trials {_numbers(folders)} could not be copied ({outcome.stopped})"
            )
        problems: dict[int, list[EntryProblem]] = {}
        prefixes = {self.rel_of(folder): number for number, folder in folders.items()}
        for problem in outcome.problems:
            number = _trial_of(problem.rel, prefixes)
            if number is not None:
                problems.setdefault(number, []).append(problem)
        failing = {p.rel for found in problems.values() for p in found}
        for rel in [rel for rel in self.failing_since if rel not in failing]:
            if _trial_of(rel, prefixes) is not None:
                del self.failing_since[rel]  # it reached Drive since
        now = self.settings.clock()
        for number in sorted(problems):
            held: list[EntryProblem] = []
            for problem in problems[number]:
                if not problem.retryable or _changing(problem):
                    continue
                since = self.failing_since.setdefault(problem.rel, now)
                if now - since < HOLD_BACK_S and not final:
                    held.append(problem)
            if held:
                raise TrialFilesHeldBack(
                    f"{len(held)} file(s) of trial {number} did not reach Drive yet, first "
                    f"{held[0]}"
                )
        return {number: [str(p) for p in found] for number, found in problems.items()}


def _trial_of(rel: str, prefixes: dict[str, int]) -> int | None:
    """The trial whose folder holds ``rel``."""
    parts = rel.split("/")
    for depth in range(len(parts), 0, -1):
        number = prefixes.get("/".join(parts[:depth]))
        if number is not None:
            return number
    return None


def _numbers(folders: dict[int, Path]) -> str:
    shown = ", ".join(str(number) for number in sorted(folders)[:5])
    return shown + (", ..." if len(folders) > 5 else "")


def _changing(problem: EntryProblem) -> bool:
    return problem.reason.startswith("changing faster")
