"""A throwaway PostgreSQL server for tests, reached only through a Unix socket.

``running_postgres(base_dir)`` makes a fresh cluster in a new folder under ``base_dir``
(``initdb``), starts it with ``pg_ctl start -w`` and settings meant for tests (no fsync,
no synchronous commit, no full-page writes, small buffers, no TCP listener), and on the
way out stops it with ``pg_ctl stop -m immediate`` and removes the folder, whether or not
the body raised. Each test gets its own database from ``PostgresServer.new_database``.

PostgreSQL's ``initdb`` refuses to run as root. When we are root, every server command
runs as the existing unprivileged user ``nobody`` through ``setpriv`` (util-linux; no PAM,
no new session, it just changes ids and executes), or ``runuser`` where setpriv is
missing. The cluster folder is handed to that user, so every folder above it must let
others through (``o+x``): pytest's own ``tmp_path`` (under a 0700 folder) does not.

Clients connect with SQLAlchemy URLs ``postgresql+psycopg://sweepsafe@/<db>?host=<socket>``:
the driver is named in the URL because a bare ``postgresql://`` means psycopg 3 from
SQLAlchemy 2.1 on but psycopg2 before it.

For a ``conftest.py``: ``from postgres_support import postgres_database, postgres_server``
gives the session-scoped server and a function-scoped fresh database URL; both skip the
test, saying what to install, when PostgreSQL or the driver is not there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from sweepsafe.drive._fs_primitives import process_alive

SERVER_PACKAGE = "postgresql"  # Debian's package with initdb, pg_ctl and postgres
DRIVER_MODULE = "psycopg"
DRIVER_PACKAGE = "psycopg[binary]"
URL_SCHEME = "postgresql+psycopg"
SUPERUSER = "sweepsafe"  # database role created by initdb; trusted on the socket
UNPRIVILEGED_USER = "nobody"  # runs the server when we are root
PORT = 5432  # only names the socket file: the server listens on no TCP address
START_LIMIT_S = 30
STOP_LIMIT_S = 30
# sockaddr_un.sun_path is 108 bytes with its terminating NUL on Linux.
SOCKET_PATH_LIMIT = 107

_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL or its driver is not installed here; the message says what to install."""


@dataclass
class ServerTimings:
    """Seconds spent on each step of the server's life; ``stop_s`` is set once it stopped."""

    initdb_s: float = 0.0
    start_s: float = 0.0
    stop_s: float | None = None


@dataclass(frozen=True)
class PostgresServer:
    """A running test server. ``url`` opens its maintenance database ``postgres``."""

    url: str
    socket_dir: Path
    data_dir: Path
    log_file: Path
    bin_dir: Path
    run_as: str | None  # the system user the server runs as; None: as ourselves
    postmaster_pid: int
    timings: ServerTimings = field(compare=False)

    def url_for(self, database: str) -> str:
        """The SQLAlchemy/Optuna URL of ``database`` on this server."""
        return _url(self.socket_dir, database)

    def new_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its URL."""
        _check_database_name(name)
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any session still connected to it (a killed worker's)."""
        _check_database_name(name)
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def restart(self) -> None:
        """Restart the server (``pg_ctl restart -m fast``): every session is cut, as by a
        managed database's maintenance or failover; it serves again on return."""
        account = pwd.getpwnam(self.run_as) if self.run_as is not None else None
        run_dir = self.data_dir.parent
        _run(
            [
                *_run_as_prefix(account),
                str(self.bin_dir / "pg_ctl"),
                "restart",
                "--pgdata",
                str(self.data_dir),
                "--mode",
                "fast",
                "--wait",
                "--timeout",
                str(START_LIMIT_S),
                "--silent",
                "--log",
                str(self.log_file),
            ],
            env=_server_env(run_dir),
            cwd=run_dir,
            timeout=START_LIMIT_S + STOP_LIMIT_S + 15,
            log_file=self.log_file,
        )

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log, for failure messages."""
        return _tail(self.log_file, lines)

    def _admin(self, statement: str) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(
            self.url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
        )
        try:
            with engine.connect() as connection:
                connection.execute(sa.text(statement))
        finally:
            engine.dispose()


def find_server_binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None.

    Looks at ``pg_config --bindir``, then Debian's ``/usr/lib/postgresql/<version>/bin``
    (newest first), then ``initdb`` on PATH (symlinks followed, so the three are siblings).
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            result = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            )
            if result.returncode == 0 and result.stdout.strip():
                candidates.append(Path(result.stdout.strip()))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates.extend(p / "bin" for p in sorted(versions, key=lambda p: -int(p.name)))
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def unavailable_reason() -> str | None:
    """Why ``running_postgres`` cannot work here, naming what to install; None if it can."""
    if find_server_binaries() is None:
        return (
            "PostgreSQL server programs (initdb, pg_ctl, postgres) not found; "
            f"install Debian's package '{SERVER_PACKAGE}' "
            f"(apt-get install {SERVER_PACKAGE})"
        )
    if importlib.util.find_spec(DRIVER_MODULE) is None:
        return f"PostgreSQL driver missing; install it with: pip install '{DRIVER_PACKAGE}'"
    try:
        _server_account()
    except PostgresUnavailable as error:
        return str(error)
    return None


@contextlib.contextmanager
def running_postgres(base_dir: Path, *, max_connections: int = 64) -> Iterator[PostgresServer]:
    """Run a fresh PostgreSQL server in a new folder under ``base_dir`` for the ``with`` body.

    Raises ``PostgresUnavailable`` when the server or driver is missing, and ``ValueError``
    when the server's user could not reach a folder under ``base_dir``.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise PostgresUnavailable(reason)
    bin_dir = find_server_binaries()
    assert bin_dir is not None
    account = _server_account()
    prefix = _run_as_prefix(account)
    timings = ServerTimings()

    run_dir = Path(tempfile.mkdtemp(prefix="pg-", dir=base_dir))
    env = _server_env(run_dir)
    extra_dirs: list[Path] = []
    postmaster_pid: int | None = None
    start_attempted = False
    try:
        run_dir.chmod(0o755)
        socket_dir = run_dir / "socket"
        if len(str(socket_dir / f".s.PGSQL.{PORT}")) > SOCKET_PATH_LIMIT:
            socket_dir = Path(tempfile.mkdtemp(prefix="pgs-", dir="/tmp"))
            extra_dirs.append(socket_dir)
        else:
            socket_dir.mkdir()
        socket_dir.chmod(0o755)
        data_dir = run_dir / "data"
        log_file = run_dir / "server.log"
        if account is not None:
            for folder in (run_dir, socket_dir):
                os.chown(folder, account.pw_uid, account.pw_gid)
            _check_reachable(run_dir, account)
            _check_reachable(socket_dir, account)

        started = time.perf_counter()
        _run(
            [
                *prefix,
                str(bin_dir / "initdb"),
                "--pgdata",
                str(data_dir),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--no-locale",
                "--encoding",
                "UTF8",
                "--no-sync",
            ],
            env=env,
            cwd=run_dir,
            timeout=120,
        )
        timings.initdb_s = time.perf_counter() - started
        with (data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(_test_settings(socket_dir, max_connections))

        started = time.perf_counter()
        start_attempted = True
        _run(
            [
                *prefix,
                str(bin_dir / "pg_ctl"),
                "start",
                "--pgdata",
                str(data_dir),
                "--log",
                str(log_file),
                "--wait",
                "--timeout",
                str(START_LIMIT_S),
                "--silent",
            ],
            env=env,
            cwd=run_dir,
            timeout=START_LIMIT_S + 15,
            log_file=log_file,
        )
        timings.start_s = time.perf_counter() - started
        postmaster_pid = _postmaster_pid(data_dir)
        if postmaster_pid is None:
            raise RuntimeError(f"PostgreSQL started but left no postmaster.pid in {data_dir}")
        server = PostgresServer(
            url=_url(socket_dir, "postgres"),
            socket_dir=socket_dir,
            data_dir=data_dir,
            log_file=log_file,
            bin_dir=bin_dir,
            run_as=account.pw_name if account is not None else None,
            postmaster_pid=postmaster_pid,
            timings=timings,
        )
        yield server
    finally:
        try:
            if start_attempted:
                started = time.perf_counter()
                _stop(prefix, bin_dir, run_dir, postmaster_pid, env)
                timings.stop_s = time.perf_counter() - started
        finally:
            for folder in (run_dir, *extra_dirs):
                shutil.rmtree(folder, ignore_errors=True)


def _url(socket_dir: Path, database: str) -> str:
    return f"{URL_SCHEME}://{SUPERUSER}@/{database}?host={quote(str(socket_dir))}"


def _test_settings(socket_dir: Path, max_connections: int) -> str:
    socket = str(socket_dir).replace("'", "''")
    return f"""
# Added by sweepsafe's tests: a disposable server, fast and reachable only by its socket.
listen_addresses = ''
unix_socket_directories = '{socket}'
unix_socket_permissions = 0777
port = {PORT}
max_connections = {max_connections}
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
timezone = 'UTC'
log_timezone = 'UTC'
log_min_messages = warning
"""


def _server_account() -> pwd.struct_passwd | None:
    """The account to run the server as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no user '{UNPRIVILEGED_USER}' to run PostgreSQL as"
        ) from None
    if shutil.which("setpriv") is None and shutil.which("runuser") is None:
        raise PostgresUnavailable(
            "running as root and neither setpriv nor runuser is here to run PostgreSQL "
            "as an unprivileged user; install Debian's package 'util-linux'"
        )
    return account


def _run_as_prefix(account: pwd.struct_passwd | None) -> list[str]:
    if account is None:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [
            setpriv,
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--clear-groups",
            "--",
        ]
    runuser = shutil.which("runuser")
    assert runuser is not None
    return [runuser, "-u", account.pw_name, "--"]


def _server_env(run_dir: Path) -> dict[str, str]:
    # A clean environment: no PG* variable of the caller's steers the server or pg_ctl.
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(run_dir),
        "LC_ALL": "C",
        "TZ": "UTC",
    }


def _check_reachable(folder: Path, account: pwd.struct_passwd) -> None:
    """Every folder above ``folder`` must let ``account`` through."""
    for parent in folder.resolve().parents:
        info = parent.stat()
        if info.st_uid == account.pw_uid:
            bit = 0o100
        elif info.st_gid == account.pw_gid:
            bit = 0o010
        else:
            bit = 0o001
        if not info.st_mode & bit:
            raise ValueError(
                f"{parent} does not let user '{account.pw_name}' through, so the PostgreSQL "
                "server could not reach its files; use a base folder under a world-traversable "
                f"one such as {tempfile.gettempdir()}"
            )


def _run(
    command: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    timeout: float,
    log_file: Path | None = None,
) -> None:
    result = subprocess.run(
        command,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        log = f"\nserver log:\n{_tail(log_file)}" if log_file is not None else ""
        raise RuntimeError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}{log}"
        )


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        first_line = (data_dir / "postmaster.pid").read_text(encoding="utf-8").split("\n", 1)[0]
    except (OSError, UnicodeDecodeError):
        return None
    return int(first_line) if first_line.strip().isdigit() else None


def _stop(
    prefix: list[str],
    bin_dir: Path,
    run_dir: Path,
    postmaster_pid: int | None,
    env: dict[str, str],
) -> None:
    """Stop the server at once; kill the postmaster if pg_ctl could not. Leaves none running."""
    data_dir = run_dir / "data"
    if postmaster_pid is None:
        postmaster_pid = _postmaster_pid(data_dir)
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [
                *prefix,
                str(bin_dir / "pg_ctl"),
                "stop",
                "--pgdata",
                str(data_dir),
                "--mode",
                "immediate",
                "--wait",
                "--timeout",
                str(STOP_LIMIT_S),
                "--silent",
            ],
            env=env,
            cwd=run_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=STOP_LIMIT_S + 15,
            check=False,
        )
    if postmaster_pid is None or not process_running(postmaster_pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(postmaster_pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_LIMIT_S
    while process_running(postmaster_pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL postmaster {postmaster_pid} survived SIGKILL")
        time.sleep(0.05)


def process_running(pid: int) -> bool:
    """Whether ``pid`` is a live process: an exited one not yet reaped (a zombie) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return False
    except OSError:
        return process_alive(pid)
    # The state follows the parenthesised command name, which may itself hold spaces.
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def _check_database_name(name: str) -> None:
    if not _DATABASE_NAME.fullmatch(name):
        raise ValueError(f"database name {name!r} must match {_DATABASE_NAME.pattern}")


def database_name_for(test_name: str) -> str:
    """A valid, unique database name derived from a test's name."""
    stem = re.sub(r"[^a-z0-9_]+", "_", test_name.lower()).strip("_")[:40] or "test"
    return f"t_{stem}_{os.getpid()}_{next(_database_counter)}"


_database_counter = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole test session, stopped at its end."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    base_dir = Path(tempfile.mkdtemp(prefix="sweepsafe-pg-"))
    try:
        base_dir.chmod(0o755)  # the server's user must get through to its folder
        with running_postgres(base_dir) as server:
            yield server
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def postgres_database(
    postgres_server: PostgresServer, request: pytest.FixtureRequest
) -> Iterator[str]:
    """The URL of a fresh, empty database for one test, dropped after it."""
    name = database_name_for(request.node.name)
    url = postgres_server.new_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)
