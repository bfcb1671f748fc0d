"""One worker of a sweep shared by several runtimes through a database server (PostgreSQL).

The study lives in the server (Optuna's RDB storage); each worker keeps its own trials'
folders on its local disk and backs them up to the shared Drive folder: trial numbers
are unique, so no two workers write the same Drive entry. Stale trials are found with
Optuna's heartbeat and retried, instead of failing every RUNNING trial (the other
workers' trials are live). One worker at a time, the holder of the study's lease on
Drive, exports the study into a portable SQLite file on a period and at its end, and
publishes it as the study's ``study.db`` on Drive, with generations like any snapshot.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import optuna
import sqlalchemy

from sweepsafe._blocking import run_blocking
from sweepsafe._callbacks import (
    STUDY_DB_NAME,
    TRIALS_DIR_NAME,
    BackupProgress,
    backup_job,
    create_trial_backup_callback,
    keep_leases_alive,
)
from sweepsafe._resume import _FINISHED
from sweepsafe._study_report import StudyBackupReport
from sweepsafe.drive import BackupBackend, BackupResult, ObjectStore
from sweepsafe.errors import StorageError
from sweepsafe.export import EXPORTED_AS_OF, export_study, server_now, server_storage

if TYPE_CHECKING:
    from optuna.study import Study

    from sweepsafe.worker import BackupWorker

__all__ = [
    "Exporter",
    "SharedSettings",
    "describe_server_error",
    "final_shared_backup",
    "hide_password",
    "open_shared_study",
    "shared_backup_callbacks",
    "workers_seen",
]

logger = logging.getLogger("sweepsafe.sweep")

_CREATE_ATTEMPTS = 5
# How often a worker whose sweep ended asks whether the lease holder exported after it.
_TURN_POLL_S = 0.5
# How long before a flush's timeout a worker stops waiting for its turn to export.
_REPORT_MARGIN_S = 1.0
_DRIVERS = {
    "postgresql": ("psycopg", "pip install 'sweepsafe[postgres]'"),
    "mysql": ("pymysql", "pip install pymysql"),
}


@dataclass(frozen=True)
class SharedSettings:
    """How workers of a shared study find stale trials and export the study."""

    url: str
    heartbeat_interval: int = 60
    """Seconds between a running trial's heartbeats (Optuna's ``heartbeat_interval``)."""
    grace_period: int | None = None
    """A trial whose heartbeat is older is stale (default: twice the interval)."""
    max_retry: int = 3
    """How many times a trial whose worker died is retried."""
    export_interval: float = 300.0
    """Seconds between exports of the study to Drive by the lease holder."""


def describe_server_error(url: str, exc: BaseException) -> str:
    """One sentence for a storage URL that cannot be used: what, where, what to do."""
    shown = hide_password(url)
    kind = url.split(":", 1)[0].split("+", 1)[0]
    if isinstance(exc, sqlalchemy.exc.ArgumentError) or kind not in (*_DRIVERS, "sqlite"):
        return (
            f"{shown} is not a database URL sweepsafe can share a study through; give a "
            "PostgreSQL (or MySQL) URL such as postgresql://user@host:5432/sweeps"
        )
    driver, install = _DRIVERS.get(kind, ("", ""))
    missing = next(
        (
            e.name
            for e in (exc, exc.__cause__, exc.__context__)
            if isinstance(e, ImportError) and e.name
        ),
        None,
    )
    if missing and missing != driver:
        driver, install = missing, f"pip install {missing}"
    if isinstance(exc, (ImportError, sqlalchemy.exc.NoSuchModuleError)):
        return f"the {kind} driver ({driver}) is not installed: {install}"
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        return (
            f"could not reach the database server of {shown} ({reason}); check that it runs, "
            "that this machine may reach it, and the URL"
        )
    return f"the database at {shown} failed: {type(exc).__name__}: {exc}"


def hide_password(url: str) -> str:
    """The URL with its password (if any) replaced by stars, for messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def open_shared_study(
    settings: SharedSettings,
    *,
    study_name: str,
    direction: Any,
    directions: Sequence[Any] | None,
    sampler: Any,
    pruner: Any,
) -> tuple[Study, optuna.storages.RDBStorage]:
    """Create or load the shared study in the server, with the storage that holds it.

    The caller disposes of the storage's engine when the sweep ends, so that no pooled
    connection to the server outlives it.

    Raises:
        StorageError: the URL is not usable (kind, driver, server), said in one sentence.
    """
    for attempt in range(_CREATE_ATTEMPTS):
        storage: optuna.storages.RDBStorage | None = None
        try:
            storage = server_storage(
                settings.url,
                heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period,
                max_retry=settings.max_retry,
            )
            study = optuna.create_study(
                storage=storage,
                study_name=study_name,
                direction=direction,
                directions=directions,
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
            return study, storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            if storage is not None:
                storage.engine.dispose()
            # Workers starting at once race to create Optuna's tables (or the study);
            # the one that loses finds them made a moment later.
            if attempt + 1 == _CREATE_ATTEMPTS:
                raise StorageError(describe_server_error(settings.url, exc)) from exc
            threading.Event().wait(0.2 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
            if storage is not None:
                storage.engine.dispose()
            raise StorageError(describe_server_error(settings.url, exc)) from exc
    raise AssertionError("unreachable")


class Exporter:
    """Exports the shared study to Drive when this worker holds the study's lease.

    Every export is a job of the backup worker for one target (the local export file),
    so two exports never run at once, and the final one waits for a periodic one in
    flight. A worker that does not hold the lease tries to take it first, which succeeds
    once the exporting worker has died and its lease has expired: then this one exports.

    Each export that reached Drive leaves in the server, as a system attribute of the
    study, the server's time as its read began (:data:`EXPORTED_AS_OF`). A worker whose
    sweep ends while another holds the lease waits for an export that began after its
    own last trial, or for the lease, and exports itself: else a trial that ended while
    the holder's last export was on its way to Drive would be in no export.
    """

    def __init__(
        self,
        store: BackupBackend,
        settings: SharedSettings,
        storage: optuna.storages.RDBStorage,
        study_name: str,
        study_dir: Path,
        worker: BackupWorker,
        progress: BackupProgress | None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._storage = storage
        self._study_name = study_name
        self._known_study_id: int | None = None
        self._study_dir = study_dir
        self._worker = worker
        self._progress = progress
        self._final_guard = threading.Lock()
        self._final_ran = False
        self._release_after_final = False
        self.trials_finished = 0
        """Trials this worker finished (COMPLETE or PRUNED; its callbacks count them)."""

    def note_trial(self, _study: Study, trial: optuna.trial.FrozenTrial) -> None:
        """A callback: count the trials this worker finished."""
        if trial.state in _FINISHED:
            self.trials_finished += 1

    @property
    def export_path(self) -> Path:
        """The local SQLite export, published as the study's ``study.db`` on Drive."""
        return self._study_dir / STUDY_DB_NAME

    @property
    def _tick_key(self) -> tuple[str, int, str]:
        return ("export", id(self._store), str(self._study_dir))

    def start_ticking(self, interval: float) -> None:
        """Export every ``interval`` seconds from now on, on the worker's loop."""
        self._worker.every(self._tick_key, interval, self.tick)

    def stop_ticking(self) -> None:
        """No more periodic exports (the final one follows, then the lease is given back)."""
        self._worker.every(self._tick_key, 1.0, None)

    async def tick(self) -> None:
        """The periodic job: schedule an export (coalesced with one already waiting)."""
        self._worker.submit(self.export_path, self._job(final=False))

    def submit_final(self, timeout: float) -> None:
        """Schedule the end-of-sweep export, which also refreshes the plain Drive copy.

        Without the lease, it waits for an export of the holder's that holds this
        worker's trials, or for the lease to come free, until a moment before the
        flush's ``timeout`` ends, so that the flush reports why it gave up.
        """
        deadline = time.monotonic() + timeout - min(_REPORT_MARGIN_S, timeout / 4)
        export = self._job(final=True, deadline=deadline)

        async def final_export(path: Path, is_directory: bool) -> BackupResult:
            try:
                result: BackupResult = await export(path, is_directory)
                return result
            finally:
                with self._final_guard:
                    self._final_ran = True
                    release = self._release_after_final
                if release:
                    with anyio.CancelScope(shield=True):
                        await self._store.arelease(self._study_dir)

        self._worker.submit(self.export_path, final_export)

    def release_after_final(self) -> bool:
        """The sweep stopped waiting for the final export: it gives the lease back when
        it ends, so that another worker may export. False if it has ended already (the
        caller gives the lease back itself)."""
        with self._final_guard:
            if self._final_ran:
                return False
            self._release_after_final = True
            return True

    def _job(self, *, final: bool, deadline: float = 0.0) -> Callable[[Path, bool], Any]:
        async def export(path: Path, is_directory: bool) -> BackupResult:
            started = time.monotonic()
            # The server's time once this worker's last trial has ended.
            ended = await anyio.to_thread.run_sync(self._server_now) if final else None
            while True:
                if ended is not None and not self.trials_finished:
                    # No finished trial of this worker to wait for: only the holder exports.
                    if not await self._store.aholds(self._study_dir, take=True):
                        return BackupResult(
                            True, path, None, "skipped", notes=("this worker finished no trial",)
                        )
                elif ended is not None:
                    waited = await self._await_turn(path, ended, started, deadline)
                    if waited is not None:
                        return waited
                elif not await self._store.aholds(self._study_dir, take=True):
                    return _another_exports(path)
                result = await self._export_once(final)
                if result.ok or await self._store.aholds(self._study_dir):
                    return result
                # Drive has no conditional write: two workers that took a free lease in
                # the same moment may both believe they hold it, and the one whose lease
                # did not land learns it here. The other exports after this worker's
                # last trial, so this one waits for that export (or for the lease).
                logger.info(
                    "Another worker took the lease on %s as this one exported; it exports.",
                    self._study_name,
                )
                if not final:
                    return _another_exports(path)

        return export

    async def _export_once(self, final: bool) -> BackupResult:
        logger.info("Exporting the shared study %s to Drive.", self._study_name)
        exported = await anyio.to_thread.run_sync(
            export_study, self._settings.url, self._study_name, self.export_path
        )
        result = await self._store.abackup(self.export_path, final=final)
        if result.ok:
            await anyio.to_thread.run_sync(self._mark_exported, exported.as_of)
            if self._progress is not None and result.finished_trials is not None:
                self._progress._copy_succeeded(result.finished_trials)
        return result

    async def _await_turn(
        self, path: Path, ended: datetime, started: float, deadline: float
    ) -> BackupResult | None:
        """None once this worker holds the lease (it exports); else why it need not:
        an export that began after ``ended`` reached Drive, or ``deadline`` came first.

        The holder's exports are seen in the server, its lease on Drive: both only by
        asking again, on a short period (no other runtime can wake this one).
        """
        with anyio.move_on_after(deadline - time.monotonic()):
            while not await self._store.aholds(self._study_dir, take=True):
                as_of = await anyio.to_thread.run_sync(self._exported_as_of)
                if as_of is not None and as_of > ended:
                    return BackupResult(
                        True,
                        path,
                        None,
                        "skipped",
                        notes=("the export on Drive of the worker holding the lease holds them",),
                    )
                await anyio.sleep(_TURN_POLL_S)
            return None
        return BackupResult(
            False,
            path,
            None,
            "skipped",
            error=(
                f"the study's export on Drive does not hold this worker's last trials yet: "
                "another worker held the study's lease for "
                f"{time.monotonic() - started:.0f} s without "
                "exporting after them; it exports them at its next export (every "
                f"{self._settings.export_interval:.0f} s), or run this worker again to "
                "export them"
            ),
        )

    def _server_now(self) -> datetime:
        with self._storage.engine.connect() as connection:
            return server_now(connection)

    def _study_id(self) -> int:
        # Looked up once, on the worker's loop: it never changes, and the wait for a
        # turn to export asks for the export time every half second.
        if self._known_study_id is None:
            self._known_study_id = self._storage.get_study_id_from_name(self._study_name)
        return self._known_study_id

    def _exported_as_of(self) -> datetime | None:
        value = self._storage.get_study_system_attrs(self._study_id()).get(EXPORTED_AS_OF)
        return datetime.fromisoformat(value) if isinstance(value, str) else None

    def _mark_exported(self, as_of: datetime) -> None:
        """Record the export's time; without it, other workers only wait longer."""
        try:
            # Only forward: a slower export of an earlier read never hides a later one.
            known = self._exported_as_of()
            if known is None or as_of > known:
                study_id = self._study_id()
                self._storage.set_study_system_attr(study_id, EXPORTED_AS_OF, as_of.isoformat())
        except sqlalchemy.exc.SQLAlchemyError as exc:
            logger.warning(
                "The export of %s is on Drive, but the server did not take its time: %s",
                self._study_name,
                exc,
            )


def _another_exports(path: Path) -> BackupResult:
    return BackupResult(True, path, None, "skipped", notes=("another worker exports the study",))


def shared_backup_callbacks(
    study_dir: Path,
    store: BackupBackend,
    exporter: Exporter,
    worker: BackupWorker,
    interval: float,
) -> list[Callable[[Study, optuna.trial.FrozenTrial], None]]:
    """This worker's per-trial backups, and the periodic export on the worker's loop."""
    (study_dir / TRIALS_DIR_NAME).mkdir(parents=True, exist_ok=True)
    keep_leases_alive(store, worker)
    exporter.start_ticking(interval)
    return [exporter.note_trial, create_trial_backup_callback(study_dir, store, worker=worker)]


def finished_count(study: Study) -> int:
    """Finished trials of the study, over every worker."""
    return len(study.get_trials(deepcopy=False, states=_FINISHED))


def final_shared_backup(
    store: BackupBackend,
    exporter: Exporter,
    study_dir: Path,
    worker: BackupWorker,
    timeout: float,
) -> StudyBackupReport:
    """This worker's end of sweep: its trial folders, and the export if it holds the lease."""
    started = time.monotonic()
    trials = study_dir / TRIALS_DIR_NAME
    exporter.stop_ticking()
    worker.submit(trials, backup_job(store, None), is_directory=True)
    exporter.submit_final(timeout)
    flush = worker.flush(timeout)
    wanted = {trials, exporter.export_path}
    reports = tuple(report for report in flush.targets if report.target in wanted)
    exported = next((r.last_result for r in reports if r.target == exporter.export_path), None)
    notes: tuple[str, ...] = ()
    if isinstance(exported, BackupResult) and exported.kind == "skipped" and exported.ok:
        notes = ("another worker's export on Drive holds this worker's trials",)
    if not flush.timed_out or not exporter.release_after_final():
        run_blocking(lambda: store.arelease(study_dir))
    return StudyBackupReport(
        study_dir=study_dir,
        on_drive=False,
        targets=reports,
        timed_out=flush.timed_out,
        duration_s=time.monotonic() - started,
        notes=notes,
        object_store=isinstance(store, ObjectStore),
    )


def workers_seen(url: str, within_s: float) -> dict[str, int]:
    """Per study in the server: running trials whose heartbeat is younger than
    ``within_s`` seconds, by the server's clock (each is a live worker's trial)."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            now = connection.execute(
                sqlalchemy.select(sqlalchemy.func.current_timestamp())
            ).scalar()
            rows = connection.execute(
                sqlalchemy.text(
                    "SELECT s.study_name, h.heartbeat FROM trial_heartbeats AS h "
                    "JOIN trials AS t ON t.trial_id = h.trial_id "
                    "JOIN studies AS s ON s.study_id = t.study_id WHERE t.state = 'RUNNING'"
                )
            ).all()
    finally:
        engine.dispose()
    seen: dict[str, int] = {}
    for name, heartbeat in rows:
        if now is None or heartbeat is None:
            continue
        age = (_naive(now) - _naive(heartbeat)).total_seconds()
        if age <= within_s:
            seen[str(name)] = seen.get(str(name), 0) + 1
    return seen


def _naive(moment: Any) -> Any:
    if isinstance(moment, str):
        from datetime import datetime

        moment = datetime.fromisoformat(moment)
    return moment.replace(tzinfo=None)
