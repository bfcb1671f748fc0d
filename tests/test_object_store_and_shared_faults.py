"""ObjectStore and shared-study faults: odd object names, a failing endpoint, a prefix
that is an object, against a real S3 endpoint (moto) and real Optuna studies."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from object_store_support import (
    S3Endpoint,
    download,
    moto_server,
    object_names,
    put_object,
    read_object,
    sweep_to_store,
)
from postgres_support import PostgresServer
from sweep_support import finished_trials, wait_for
from sweepsafe import ObjectStore, SweepsafeError, run_sweep, study_dir_for, trial_dir
from sweepsafe.drive._replica import Lease, acquire_lease, this_runtime

optuna.logging.set_verbosity(optuna.logging.WARNING)

BUCKET = "faults"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with moto_server(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


ODD_NAMES = [
    "with space.txt",
    "plus+sign.txt",
    "percent%20.txt",
    "hash#tag.txt",
    "question?.txt",
    "brackets[best].pt",
    "star*.txt",
    "ünïcødé-模型.txt",
    "semi;colon&amp=.txt",
    "x" * 200 + ".txt",
]


def test_trial_files_with_odd_names_come_back_byte_for_byte_from_s3(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    local = tmp_path / "local"
    folder = local / "study-a" / "trials" / "trial-00000"
    folder.mkdir(parents=True)
    for index, name in enumerate(ODD_NAMES):
        (folder / name).write_bytes(f"{index}:{name}".encode())
    with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        result = store.backup(folder, is_directory=True)
        assert result.ok, result.error
        assert not result.problems, result.problems
    shutil.rmtree(local)
    folder.mkdir(parents=True)
    with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        restored = store.restore(folder, is_directory=True)
        assert restored.ok, restored.error
    assert sorted(p.name for p in folder.iterdir()) == sorted(ODD_NAMES)
    for index, name in enumerate(ODD_NAMES):
        assert (folder / name).read_bytes() == f"{index}:{name}".encode()


@pytest.mark.parametrize("kind", ["s3", "file"])
def test_mirror_removes_only_the_deleted_names_holding_pattern_characters(
    tmp_path: Path, s3: S3Endpoint, prefix: str, kind: str
) -> None:
    local = tmp_path / "local"
    folder = local / "study-a" / "trials" / "trial-00000"
    folder.mkdir(parents=True)
    for name in ("model[a].pt", "modela.pt", "model*", "model-keep.pt", "run[1]/a", "run1/a"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(name.encode())
    url = f"s3://{prefix}" if kind == "s3" else f"file://{tmp_path / 'bucket'}"
    options = s3.options() if kind == "s3" else {}
    with ObjectStore(local, url, options, drive_timeout=30, mirror=True) as store:
        assert store.backup(folder, is_directory=True).ok
        (folder / "model[a].pt").unlink()
        (folder / "model*").unlink()
        shutil.rmtree(folder / "run[1]")
        result = store.backup(folder, is_directory=True)
        assert result.ok, result.error
    if kind == "s3":
        start = len(f"{prefix}/study-a/trials/trial-00000/")
        names = sorted(n[start:] for n in object_names(s3, prefix) if "/trials/" in n)
    else:
        remote = tmp_path / "bucket" / "study-a" / "trials" / "trial-00000"
        names = sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())
    assert names == ["model-keep.pt", "modela.pt", "run1/a"]


def test_a_file_s3fs_would_store_under_another_name_is_refused_by_name(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    local = tmp_path / "local"
    folder = local / "study-a" / "trials" / "trial-00000"
    folder.mkdir(parents=True)
    (folder / "question").write_bytes(b"the real question")
    (folder / "question?versionId=1.txt").write_bytes(b"another file")
    with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        result = store.backup(folder, is_directory=True)
    assert not result.ok
    assert any("question?versionId=1.txt" in line for line in result.problems), result
    assert all("\n" not in line for line in result.problems)
    start = len(f"{prefix}/study-a/trials/trial-00000/")
    objects = {n[start:]: size for n, size in object_names(s3, prefix).items() if "/trials/" in n}
    assert objects == {"question": len(b"the real question")}


def test_a_prefix_that_is_also_an_object_backs_up_and_restores(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    put_object(s3, prefix, b"a file where the store's folder should be")
    local = tmp_path / "local"
    study_dir = local / "study-a"
    study_dir.mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{study_dir / 'study.db'}", study_name="a")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        backed = store.backup(study_dir / "study.db")
        assert backed.ok, backed.error
        assert store.verify(study_dir / "study.db").trial_counts == {"COMPLETE": 2}
    shutil.rmtree(local)
    study_dir.mkdir(parents=True)
    with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        restored = store.restore(study_dir / "study.db")
        assert restored.ok, restored


# -- an endpoint that fails some requests -----------------------------------------------------
Rule = Callable[[str, str, dict[str, str]], str]
"""(method, path, headers) -> "forward", "fail" (500, not forwarded), "deny" (403, not
forwarded) or "lose" (forwarded, then a 500 in place of the endpoint's answer, as when
the answer is lost on its way)."""


class FaultyProxy:
    """An HTTP proxy in front of an S3 endpoint that fails the requests ``rule`` picks."""

    def __init__(self, target: str, rule: Rule) -> None:
        self.rule = rule
        self.seen: list[tuple[str, str, str]] = []
        host, port = target.removeprefix("http://").split(":")
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                action = proxy.rule(self.command, self.path, headers)
                proxy.seen.append((self.command, self.path, action))
                if action in ("forward", "lose"):
                    upstream = http.client.HTTPConnection(host, int(port), timeout=30)
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    status, data = answer.status, answer.read()
                    answer_headers = [
                        (k, v)
                        for k, v in answer.getheaders()
                        if k.lower() not in ("transfer-encoding", "connection", "content-length")
                    ]
                    upstream.close()
                if action == "deny":
                    status, data, answer_headers = 403, _ACCESS_DENIED, []
                elif action != "forward":
                    status, data, answer_headers = 500, _INTERNAL_ERROR, []
                self.send_response(status)
                for key, value in answer_headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = S3Endpoint(f"http://127.0.0.1:{self._server.server_address[1]}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


_INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


_ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)


@contextmanager
def faulty_proxy(target: S3Endpoint, rule: Rule) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(target.endpoint, rule)
    try:
        yield proxy
    finally:
        proxy.close()


def lose_first_answer_to(marker: str) -> Rule:
    """A rule that loses the answer to the first PUT whose path holds ``marker``."""
    done = threading.Event()

    def rule(method: str, path: str, headers: dict[str, str]) -> str:
        if method == "PUT" and marker in path and not done.is_set():
            done.set()
            return "lose"
        return "forward"

    return rule


def test_a_lease_write_whose_answer_is_lost_still_takes_the_study(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    """The conditional write landed, its answer was lost, and the retry was refused
    since the lease is no longer the one read: the lease there is this runtime's own."""
    local = tmp_path / "local"
    study_dir = local / "study-a"
    study_dir.mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{study_dir / 'study.db'}", study_name="a")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with faulty_proxy(s3, lose_first_answer_to("lease.json")) as proxy:
        url = f"s3://{prefix}"
        with ObjectStore(local, url, proxy.endpoint.options(), drive_timeout=30) as store:
            result = store.backup(study_dir / "study.db")
            assert result.ok, result.error
            assert store.verify(study_dir / "study.db").trial_counts == {"COMPLETE": 2}
        assert ("PUT", f"/{prefix}/study-a/.sweepsafe/lease.json", "lose") in proxy.seen


# -- a study shared through PostgreSQL, backed up to S3 ---------------------------------------
SHARED_WORKER = """
import json, os, sys, time
import optuna
from sweepsafe import ObjectStore, SweepsafeError, run_sweep, study_dir_for, trial_dir
from sweepsafe.drive._replica import Lease, acquire_lease, this_runtime

optuna.logging.set_verbosity(optuna.logging.WARNING)
local, url, storage, name, n_trials = sys.argv[1:6]
store = ObjectStore(local, url, json.loads(os.environ["STORE_OPTIONS"]), drive_timeout=30)


def objective(trial):
    folder = trial_dir(study_dir_for(local, "shared-s3"), trial)
    (folder / "model.txt").write_text(f"{name} {trial.number}")
    time.sleep(0.3)
    return trial.suggest_float("x", -2.0, 2.0) ** 2


def say(study, trial):
    print(json.dumps({"trial": trial.number}), flush=True)


result = run_sweep(objective, output_dir=local, study_key="shared-s3", n_trials=int(n_trials),
                   backup_to_drive=store, storage=storage, export_interval=1.0,
                   flush_timeout=60, callbacks=[say])
print(json.dumps({"done": True, "ok": result.backup_ok, "report": str(result.backup_report)}),
      flush=True)
"""


def start_shared_worker(
    tmp_path: Path, s3: S3Endpoint, url: str, storage: str, name: str, n_trials: int
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "STORE_OPTIONS": json.dumps(s3.options()),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            SHARED_WORKER,
            str(tmp_path / name),
            url,
            storage,
            name,
            str(n_trials),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def finished_on_server(storage: str) -> list[int]:
    rdb = optuna.storages.RDBStorage(storage)
    try:
        (summary,) = optuna.get_all_study_summaries(rdb)
        study = optuna.load_study(study_name=summary.study_name, storage=rdb)
        return sorted(t.number for t in study.get_trials(states=(TrialState.COMPLETE,)))
    finally:
        rdb.engine.dispose()


def exported_on_s3(s3: S3Endpoint, key: str, scratch: Path) -> list[int]:
    target = scratch / "exported.db"
    download(s3, key, str(target))
    return sorted(number for number, _ in finished_trials(target))


@pytest.mark.timeout(300)
def test_two_workers_sharing_a_study_back_it_up_whole_to_s3(
    tmp_path: Path, s3: S3Endpoint, prefix: str, postgres_database: str
) -> None:
    url = f"s3://{prefix}"
    workers = [
        start_shared_worker(tmp_path, s3, url, postgres_database, f"w{i}", 8) for i in range(2)
    ]
    outputs = [worker.communicate(timeout=240) for worker in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        done = json.loads(out.splitlines()[-1])
        assert done["ok"], done["report"]
    finished = finished_on_server(postgres_database)
    assert len(finished) >= 8
    study_name = study_dir_for(tmp_path / "w0", "shared-s3").name
    names = object_names(s3, prefix)
    for number in finished:
        key = f"{prefix}/{study_name}/trials/trial-{number:05d}/model.txt"
        assert key in names, (number, sorted(names))
    assert exported_on_s3(s3, f"{prefix}/{study_name}/study.db", tmp_path) == finished


@pytest.mark.timeout(300)
def test_a_shared_sweep_goes_on_when_the_database_server_restarts_mid_sweep(
    tmp_path: Path,
    s3: S3Endpoint,
    prefix: str,
    postgres_server: PostgresServer,
    postgres_database: str,
) -> None:
    local = tmp_path / "local"
    study_dir = study_dir_for(local, "restarted")
    restarted = threading.Event()

    def heartbeat_recorded(trial_id: int) -> bool:
        storage = optuna.storages.RDBStorage(postgres_database)
        try:
            with storage.engine.connect() as connection:
                row = connection.exec_driver_sql(
                    "SELECT 1 FROM trial_heartbeats WHERE trial_id = %(id)s", {"id": trial_id}
                ).first()
            return row is not None
        finally:
            storage.engine.dispose()

    def objective(trial: optuna.Trial) -> float:
        (trial_dir(study_dir, trial) / "model.txt").write_text(str(trial.number))
        if trial.number == 2 and not restarted.is_set():
            # The restart comes between two of the trial's heartbeats (60 s apart): a query
            # cut in flight by a restart is the server's to answer, not the pool's to mend.
            wait_for(lambda: heartbeat_recorded(trial._trial_id), what="the first heartbeat")
            restarted.set()
            postgres_server.restart()
        return trial.suggest_float("x", -2.0, 2.0) ** 2

    with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        result = run_sweep(
            objective,
            output_dir=local,
            study_key="restarted",
            n_trials=5,
            backup_to_drive=store,
            storage=postgres_database,
            export_interval=1.0,
            flush_timeout=60,
        )
    assert restarted.is_set()
    assert result.backup_ok, result.backup_report
    assert finished_on_server(postgres_database) == [0, 1, 2, 3, 4]
    exported = exported_on_s3(s3, f"{prefix}/{study_dir.name}/study.db", tmp_path)
    assert exported == [0, 1, 2, 3, 4]


# botocore retries each 500 itself, with backoff; the store's own retries are under test.
NO_CLIENT_RETRIES = {"retries": {"max_attempts": 1, "mode": "standard"}}


def fail_always(method_wanted: str, marker: str) -> Rule:
    def rule(method: str, path: str, headers: dict[str, str]) -> str:
        return "fail" if method == method_wanted and marker in path else "forward"

    return rule


@pytest.mark.timeout(300)
def test_a_trial_file_the_endpoint_keeps_failing_is_named_and_reaches_s3_once_it_answers(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    local = tmp_path / "local"
    study_dir = study_dir_for(local, "failing")

    def objective(trial: optuna.Trial) -> float:
        (trial_dir(study_dir, trial) / "weights.bin").write_bytes(bytes([trial.number]) * 4096)
        return trial.suggest_float("x", -2.0, 2.0) ** 2

    url = f"s3://{prefix}"
    with faulty_proxy(s3, fail_always("PUT", "trial-00001/weights.bin")) as proxy:
        with ObjectStore(
            local,
            url,
            {**proxy.endpoint.options(), "config_kwargs": NO_CLIENT_RETRIES},
            drive_timeout=30,
        ) as store:
            result = run_sweep(
                objective,
                output_dir=local,
                study_key="failing",
                n_trials=3,
                backup_to_drive=store,
                flush_timeout=120,
            )
        assert any(action == "fail" for _, _, action in proxy.seen)
    report = str(result.backup_report)
    assert not result.backup_ok, report
    assert "trial-00001/weights.bin" in report, report
    assert "complete" not in report.split("\n", 1)[0].lower().replace("incomplete", ""), report

    with ObjectStore(local, url, s3.options(), drive_timeout=30) as store:
        again = run_sweep(
            objective,
            output_dir=local,
            study_key="failing",
            n_trials=3,
            backup_to_drive=store,
            flush_timeout=120,
        )
    assert again.backup_ok, again.backup_report
    names = object_names(s3, prefix)
    for number in range(3):
        assert f"{prefix}/{study_dir.name}/trials/trial-{number:05d}/weights.bin" in names


@pytest.mark.timeout(300)
def test_a_restore_whose_trial_file_the_endpoint_fails_finishes_at_the_next_start(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    url = f"s3://{prefix}"
    with ObjectStore(tmp_path / "first", url, s3.options(), drive_timeout=30) as store:
        first = sweep_to_store(store, "restore-fails", 3)
    study_name = first.database.parent.name
    local = tmp_path / "second"
    failing = fail_always("GET", f"{study_name}/trials/trial-00001/weights.bin")
    outcome: str
    with faulty_proxy(s3, failing) as proxy:
        with ObjectStore(local, url, proxy.endpoint.options(), drive_timeout=30) as store:
            try:
                cut = run_sweep(
                    lambda t: t.suggest_float("x", 0, 1),
                    output_dir=local,
                    study_key="restore-fails",
                    n_trials=3,
                    backup_to_drive=store,
                    flush_timeout=60,
                )
                outcome = f"ran: {cut.backup_report}"
            except SweepsafeError as exc:
                outcome = f"refused: {exc}"
        assert any(action == "fail" for _, _, action in proxy.seen), proxy.seen
    restored_file = local / study_name / "trials" / "trial-00001" / "weights.bin"
    assert (
        not restored_file.exists() or restored_file.read_bytes() == (1).to_bytes(4, "big") * 1024
    ), outcome
    with ObjectStore(local, url, s3.options(), drive_timeout=30) as store:
        second = sweep_to_store(store, "restore-fails", 4)
    assert second.finished == 4
    assert restored_file.read_bytes() == (1).to_bytes(4, "big") * 1024, outcome


class OwnLeaseWrittenMeanwhile:
    """A helper through which another task of this same process (the backup worker's
    renewal, a restore's take) writes this runtime's lease just before this write."""

    def __init__(self, helper: Any, s3: S3Endpoint, key: str) -> None:
        self._helper = helper
        self._s3 = s3
        self._key = key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._helper, name)

    async def put_bytes_if(
        self, destination: Path, data: bytes, version: str | None, timeout: float
    ) -> bool:
        now = time.time()
        put_object(self._s3, self._key, Lease(this_runtime(), now - 1, now).to_json())
        written: bool = await self._helper.put_bytes_if(destination, data, version, timeout)
        return written


@pytest.mark.asyncio
async def test_a_lease_this_process_wrote_during_a_take_is_not_taken_for_another_runtimes(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    local = tmp_path / "local"
    study_dir = local / "study-a"
    study_dir.mkdir(parents=True)
    key = f"{prefix}/study-a/.sweepsafe/lease.json"
    with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        async with store._pool.session() as helper:
            racing = OwnLeaseWrittenMeanwhile(helper, s3, key)
            lease = await acquire_lease(
                racing,  # type: ignore[arg-type]
                store.drive_path_for(study_dir),
                timeout=30,
                lease_timeout=120,
                takeover=False,
                clock=time.time,
                conditional=True,
            )
    assert lease.owner.is_same_process(this_runtime())
    landed = Lease.from_json(read_object(s3, key))
    assert landed is not None
    assert landed.owner.is_same_process(this_runtime())
    assert not landed.released


def revoked_after(event: threading.Event) -> Rule:
    """A rule that denies every request once ``event`` is set, as a revoked key is."""

    def rule(method: str, path: str, headers: dict[str, str]) -> str:
        return "deny" if event.is_set() else "forward"

    return rule


@pytest.mark.timeout(300)
def test_credentials_revoked_mid_sweep_leave_the_sweep_running_and_its_report_incomplete(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    local = tmp_path / "local"
    study_dir = study_dir_for(local, "revoked")
    revoked = threading.Event()

    def objective(trial: optuna.Trial) -> float:
        (trial_dir(study_dir, trial) / "model.txt").write_text(str(trial.number))
        if trial.number == 4:
            revoked.set()
        return trial.suggest_float("x", -2.0, 2.0) ** 2

    with faulty_proxy(s3, revoked_after(revoked)) as proxy:
        options = proxy.endpoint.options()
        with ObjectStore(local, f"s3://{prefix}", options, drive_timeout=30) as store:
            result = run_sweep(
                objective,
                output_dir=local,
                study_key="revoked",
                n_trials=8,
                backup_to_drive=store,
                flush_timeout=60,
            )
        forwarded = [path for _, path, action in proxy.seen if action == "forward"]
    assert any(path.endswith("/study.db") for path in forwarded)  # backed up before
    assert len(finished_trials(result.study_dir / "study.db")) == 8
    report = str(result.backup_report)
    assert not result.backup_ok, report
    assert report.startswith("Object store copy INCOMPLETE"), report
    assert "access denied" in report, report
    assert "check the credentials" in report, report
