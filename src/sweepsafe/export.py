"""Export one study from a database server into a portable SQLite file, exactly.

Optuna's ``copy_study`` replays a study trial by trial through the storage API: about
90 ms a trial against PostgreSQL (7.5 minutes for 5,000 trials). This copies the study's
rows instead, table by table, from one consistent read of the server into a file whose
schema Optuna itself created: seconds, and the same study. The tables are discovered by
reflecting the server's schema with SQLAlchemy; nothing private of Optuna is used. The
result opens with ``optuna.load_study`` and with optuna-dashboard as is.

``run_sweep(storage=URL)`` exports the shared study to Drive with these; they are public
for a user who wants a portable copy of a study in a server, or to load one into it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

__all__ = [
    "EXPORTED_AS_OF",
    "ExportResult",
    "export_study",
    "load_into_server",
    "server_now",
    "server_storage",
]

EXPORTED_AS_OF = "sweepsafe:exported_as_of"
"""The study system attribute a shared sweep's exports leave in the server: the server's
time as the newest export that reached Drive began its read."""

# Optuna's own bookkeeping tables: the new file gets its own from Optuna.
_SKIPPED_TABLES = frozenset({"alembic_version", "version_info"})
_BATCH = 5000


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: Path
    trials: int
    rows: int
    duration_s: float
    as_of: datetime
    """The server's time as the read began (see :func:`server_now`): every trial that
    ended before it is in the file."""


def server_storage(
    url: str,
    *,
    heartbeat_interval: int,
    grace_period: int | None,
    max_retry: int,
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage for a shared study: heartbeats, stale trials failed and retried.

    Optuna marks the heartbeat arguments experimental; sweepsafe relies on them on
    purpose, so their warnings are silenced here rather than sent to every user.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=callback,
            # A server restarted (maintenance, failover) cut every pooled connection: each
            # is checked as it is taken, and a dead one replaced, instead of failing the
            # trial that took it with Optuna's "invalid data in the commit".
            engine_kwargs={"pool_pre_ping": True},
        )


def export_study(url: str, study_name: str, target: Path) -> ExportResult:
    """Write the study ``study_name`` of the database at ``url`` to the SQLite file ``target``.

    The rows are read in one transaction (``REPEATABLE READ`` where the server has it), so
    the file is one instant of the study, and ``target`` is replaced atomically: a reader
    sees the previous export or the new one.

    Raises:
        KeyError: no study of that name.
        sqlalchemy.exc.SQLAlchemyError: the server failed.
    """
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.export-{os.getpid()}-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    # Optuna creates the schema (and its version stamp) of the new file itself.
    optuna.storages.RDBStorage(f"sqlite:///{temp}").engine.dispose()
    source = sqlalchemy.create_engine(url)
    destination = sqlalchemy.create_engine(f"sqlite:///{temp}")
    try:
        rows, trials, as_of = _copy_rows(source, destination, study_name)
    except BaseException:
        destination.dispose()
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    finally:
        source.dispose()
    destination.dispose()
    os.replace(temp, target)
    return ExportResult(target, trials, rows, time.monotonic() - started, as_of)


def server_now(connection: sqlalchemy.Connection) -> datetime:
    """The database server's clock, as a naive UTC time where the server says its zone.

    Only times read from the same server are compared, so that no two machines' clocks
    meet. PostgreSQL gives the start of the transaction, which is no later than what the
    transaction reads; SQLite and MySQL give whole seconds.
    """
    moment: object = connection.execute(
        sqlalchemy.select(sqlalchemy.func.current_timestamp())
    ).scalar()
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if not isinstance(moment, datetime):
        raise TypeError(f"the server's clock read as {moment!r}, not a time")
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def _copy_rows(
    source: sqlalchemy.Engine, destination: sqlalchemy.Engine, study_name: str
) -> tuple[int, int, datetime]:
    options: dict[str, Any] = {}
    if source.dialect.name in ("postgresql", "mysql"):
        options["isolation_level"] = "REPEATABLE READ"
    copied = 0
    with source.connect().execution_options(**options) as reader, destination.begin() as writer:
        as_of = server_now(reader)  # the first read of the transaction
        found = sqlalchemy.MetaData()
        found.reflect(bind=reader)
        wanted = sqlalchemy.MetaData()
        wanted.reflect(bind=writer)
        studies = found.tables["studies"]
        study_id = reader.execute(
            sqlalchemy.select(studies.c.study_id).where(studies.c.study_name == study_name)
        ).scalar()
        if study_id is None:
            raise KeyError(f"no study named {study_name!r} in the database")
        trials = found.tables["trials"]
        trial_ids = sqlalchemy.select(trials.c.trial_id).where(trials.c.study_id == study_id)
        trial_count = 0
        for table in wanted.sorted_tables:
            if table.name in _SKIPPED_TABLES or table.name not in found.tables:
                continue
            origin = found.tables[table.name]
            query = sqlalchemy.select(origin)
            if "study_id" in origin.c:
                query = query.where(origin.c.study_id == study_id)
            elif "trial_id" in origin.c:
                query = query.where(origin.c.trial_id.in_(trial_ids))
            columns = [column.name for column in table.c if column.name in origin.c]
            result = reader.execute(query).mappings()
            while batch := result.fetchmany(_BATCH):
                writer.execute(
                    sqlalchemy.insert(table), [{c: row[c] for c in columns} for row in batch]
                )
                copied += len(batch)
                if table.name == "trials":
                    trial_count += len(batch)
        return copied, trial_count, as_of


def load_into_server(source: Path, url: str) -> list[str]:
    """Load every study of the SQLite file ``source`` into the empty database at ``url``.

    Rows keep their ids; the server's id sequences are moved past them so that new
    trials get fresh ones. Returns the names of the studies loaded.

    Raises:
        ValueError: the database at ``url`` already holds a study.
        sqlalchemy.exc.SQLAlchemyError: the server failed.
    """
    # Optuna creates its schema in the server, as it would for a new study.
    optuna.storages.RDBStorage(url).engine.dispose()
    reader = sqlalchemy.create_engine(f"sqlite:///{source}")
    writer = sqlalchemy.create_engine(url)
    try:
        with writer.connect() as connection:
            existing = connection.execute(sqlalchemy.text("SELECT COUNT(*) FROM studies")).scalar()
        if existing:
            raise ValueError(
                f"the database already holds {existing} study(ies); load into an empty one"
            )
        with reader.connect() as connection:
            names = [
                str(name)
                for (name,) in connection.execute(sqlalchemy.text("SELECT study_name FROM studies"))
            ]
        for name in names:
            _copy_rows(reader, writer, name)
        with writer.begin() as connection:
            # A time of the server the file was exported from means nothing in this one.
            connection.execute(
                sqlalchemy.text("DELETE FROM study_system_attributes WHERE key = :key"),
                {"key": EXPORTED_AS_OF},
            )
        if writer.dialect.name == "postgresql":
            _advance_sequences(writer)
    finally:
        reader.dispose()
        writer.dispose()
    return names


def _advance_sequences(engine: sqlalchemy.Engine) -> None:
    metadata = sqlalchemy.MetaData()
    metadata.reflect(bind=engine)
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            keys = list(table.primary_key.columns)
            if len(keys) != 1 or not isinstance(keys[0].type, sqlalchemy.Integer):
                continue
            column = keys[0].name
            sequence = connection.execute(
                sqlalchemy.text("SELECT pg_get_serial_sequence(:table, :column)"),
                {"table": table.name, "column": column},
            ).scalar()
            if sequence:
                connection.execute(
                    sqlalchemy.text(
                        f'SELECT setval(:sequence, COALESCE((SELECT MAX("{column}") FROM '
                        f'"{table.name}"), 0) + 1, false)'
                    ),
                    {"sequence": sequence},
                )
