"""ObjectStore: the store's guarantees on a real S3 endpoint (moto) and on file:// URLs.

Every study here is a real Optuna study in a real SQLite file; the S3 endpoint is a moto
server on 127.0.0.1 started by the tests, reached over HTTP by the store's helpers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest

from cli_support import TINY_OBJECTIVE, finished_numbers, run_cli, study_databases
from object_store_support import (
    SECRET,
    S3Endpoint,
    moto_server,
    object_names,
    open_uploads,
    put_object,
    read_object,
    restore_with_the_command,
    silent_endpoint,
    start_upload,
    sweep_to_store,
)
from sweep_support import finished_trials, integrity
from sweepsafe import ObjectStore, SweepsafeError, run_sweep, study_dir_for, trial_dir
from sweepsafe.drive._object_helper import ObjectServer
from sweepsafe.drive._replica import Lease, Runtime, acquire_lease
from sweepsafe.errors import LeaseHeldError

optuna.logging.set_verbosity(optuna.logging.WARNING)

BUCKET = "sweeps"
TEMP_MARK = ".sweepsafe-tmp-"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with moto_server(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A prefix of the test's own in the shared bucket."""
    return f"{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


def test_a_sweep_on_s3_resumes_on_an_empty_disk_with_its_trial_files(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    url = f"s3://{prefix}"
    with ObjectStore(tmp_path / "first", url, s3.options(), drive_timeout=30) as store:
        first = sweep_to_store(store, "object-store", 4)
        database = first.database
        assert (first.finished, first.restored) == (4, False)
        # What the user reads names the store and the object's URL, never a local path.
        backed_up = store.backup(database)
        assert backed_up.destination == f"{url}/{database.parent.name}/study.db"
        assert "Drive" not in first.report
        assert first.report.startswith("Object store copy complete"), first.report
        assert f"{url}/{database.parent.name}/study.db: 4 trials" in first.report
        verified = store.verify(database)
        assert verified.ok, verified.error
        assert verified.integrity_ok
        assert verified.trial_counts == {"COMPLETE": 4}
        assert store.url_for(database) == f"{url}/{database.parent.name}/study.db"
        assert store.verify(store.url_for(database)).trial_counts == {"COMPLETE": 4}

    # A new runtime: nothing on its disk but the code.
    with ObjectStore(tmp_path / "second", url, s3.options(), drive_timeout=30) as store:
        second = sweep_to_store(store, "object-store", 6)
        assert (second.finished, second.restored) == (6, True)
        restored_file = trial_dir(second.database.parent, 3) / "weights.bin"
        assert restored_file.read_bytes() == (3).to_bytes(4, "big") * 1024
        assert store.verify(second.database).trial_counts == {"COMPLETE": 6}

    names = object_names(s3, prefix)
    assert not [name for name in names if TEMP_MARK in name]
    assert f"{prefix}/{database.parent.name}/study.db" in names


def test_a_file_url_backs_up_restores_and_verifies_without_leaving_temporaries(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "bucket" / "sweeps"
    local = tmp_path / "local"
    study_dir = local / "study-a"
    study_dir.mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{study_dir / 'study.db'}", study_name="a")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    (study_dir / "notes").mkdir()
    (study_dir / "notes" / "run.txt").write_text("three trials", encoding="utf-8")

    with ObjectStore(local, f"file://{remote}") as store:
        assert store.backup(study_dir / "study.db").ok
        assert store.backup(study_dir / "notes", is_directory=True).ok
        assert store.verify(study_dir / "study.db").trial_counts == {"COMPLETE": 3}

    shutil.rmtree(local)
    study_dir.mkdir(parents=True)
    with ObjectStore(local, f"file://{remote}") as store:
        brought_back = store.restore(study_dir / "study.db")
        assert brought_back.ok
        assert brought_back.source == f"file://{remote}/study-a/study.db"
        assert brought_back.destination == study_dir / "study.db"
        assert store.restore(study_dir / "notes", is_directory=True).ok
    assert [number for number, _ in finished_trials(study_dir / "study.db")] == [0, 1, 2]
    assert (study_dir / "notes" / "run.txt").read_text(encoding="utf-8") == "three trials"
    assert not [path for path in remote.rglob("*") if path.name.startswith(TEMP_MARK)]
    assert list((local / ".sweepsafe" / "object-spool").iterdir()) == []


def test_the_command_runs_and_restores_a_sweep_with_an_object_store_url(tmp_path: Path) -> None:
    (tmp_path / "tinyobj.py").write_text(TINY_OBJECTIVE)
    url = f"file://{tmp_path / 'bucket' / 'sweeps'}"
    common = ("--output-dir", "sweeps", "--study-key", "tiny", "--drive-dir", url)
    ran = run_cli("run", "tinyobj:objective", *common, "--trials", "3", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    (database,) = study_databases(tmp_path / "sweeps")
    assert finished_numbers(next((tmp_path / "bucket" / "sweeps").glob("*/study.db"))) == [0, 1, 2]

    restore_with_the_command(tmp_path, database, url)

    # The commands that read a copy take its URL too, and name it.
    study_url = f"{url}/{database.parent.name}"
    verified = run_cli("verify", study_url, cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"{study_url}/study.db: sound")
    assert "3 trials (3 COMPLETE)" in verified.stdout
    history = run_cli("history", study_url, "--json", cwd=tmp_path)
    assert history.returncode == 0, history.stderr
    generations = json.loads(history.stdout)["generations"]
    assert generations[0]["finished_trials"] == 3
    missing = run_cli("verify", f"{url}/no-such-study", cwd=tmp_path)
    assert missing.returncode == 2
    assert f"{url}/no-such-study/study.db does not exist" in missing.stderr
    status = run_cli("status", url, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    (listed,) = json.loads(status.stdout)["databases"]
    assert listed["path"] == f"{study_url}/study.db"
    assert (listed["check"], listed["trial_counts"]) == ("ok", {"COMPLETE": 3})
    table = run_cli("status", url, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1].startswith(database.parent.name)
    empty = run_cli("status", f"{url}/no-such-study", cwd=tmp_path)
    assert empty.returncode == 2
    assert f"{url}/no-such-study does not exist" in empty.stderr


def test_a_spool_left_by_a_killed_helper_is_removed_by_the_next_one(tmp_path: Path) -> None:
    local = tmp_path / "local"
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    spools = local / ".sweepsafe" / "object-spool"
    spools.mkdir(parents=True)
    left = spools / f"{finished.pid}-0123456789abcdef"
    left.write_bytes(b"half an upload")
    with ObjectStore(local, f"file://{tmp_path / 'bucket'}") as store:
        assert store.backup(make_file(local)).ok
    assert not left.exists()
    assert list(spools.iterdir()) == []


def test_uploads_left_unfinished_in_a_study_are_aborted_by_its_owner(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    """S3 keeps (and bills) the parts of a multipart upload whose helper was killed; the
    runtime that owns the study aborts them, and never another study's."""
    local = tmp_path / "local"
    study_dir = local / "study-a"
    study_dir.mkdir(parents=True)
    study = optuna.create_study(storage=f"sqlite:///{study_dir / 'study.db'}", study_name="a")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    start_upload(s3, f"{prefix}/study-a/trials/trial-00001/last.pt")
    start_upload(s3, f"{prefix}/study-b/trials/trial-00000/last.pt")

    with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        assert store.backup(study_dir / "study.db").ok
        assert open_uploads(s3, prefix) == [f"{prefix}/study-b/trials/trial-00000/last.pt"]
        # One of this runtime's own uploads abandoned at its deadline: gone at release.
        start_upload(s3, f"{prefix}/study-a/trials/trial-00002/last.pt")
        store.release(study_dir)
    assert open_uploads(s3, prefix) == [f"{prefix}/study-b/trials/trial-00000/last.pt"]


class LeaseWrittenMeanwhile:
    """A helper through which another runtime's lease lands on S3 just before this
    runtime's conditional write: the race two runtimes starting at once can meet."""

    def __init__(self, helper: Any, s3: S3Endpoint, key: str, lease: Lease) -> None:
        self._helper = helper
        self._s3 = s3
        self._key = key
        self._lease = lease

    def __getattr__(self, name: str) -> Any:
        return getattr(self._helper, name)

    async def put_bytes_if(
        self, destination: Path, data: bytes, version: str | None, timeout: float
    ) -> bool:
        put_object(self._s3, self._key, self._lease.to_json())
        written: bool = await self._helper.put_bytes_if(destination, data, version, timeout)
        return written


@pytest.mark.parametrize("lease_before", ["none", "released"])
@pytest.mark.asyncio
async def test_a_lease_another_runtime_writes_during_a_take_is_never_overwritten(
    tmp_path: Path, s3: S3Endpoint, prefix: str, lease_before: str
) -> None:
    local = tmp_path / "local"
    study_dir = local / "study-a"
    study_dir.mkdir(parents=True)
    other = Runtime("other", "other-host", 4242, "boot", time.time() - 60)
    theirs = Lease(other, time.time(), time.time())
    key = f"{prefix}/study-a/.sweepsafe/lease.json"
    with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        if lease_before == "released":
            study = optuna.create_study(storage=f"sqlite:///{study_dir / 'study.db'}")
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
            assert store.backup(study_dir / "study.db").ok
            store.release(study_dir)
            released = Lease.from_json(read_object(s3, key))
            assert released is not None
            assert released.released
        async with store._pool.session() as helper:
            racing = LeaseWrittenMeanwhile(helper, s3, key, theirs)
            with pytest.raises(LeaseHeldError, match=r"another runtime.*other-host, process 4242"):
                await acquire_lease(
                    racing,  # type: ignore[arg-type]
                    store.drive_path_for(study_dir),
                    timeout=30,
                    lease_timeout=120,
                    takeover=False,
                    clock=time.time,
                    conditional=True,
                )
    assert Lease.from_json(read_object(s3, key)) == theirs


def test_memory_urls_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"memory:// cannot hold the copies.*file:///"):
        ObjectStore(tmp_path / "local", "memory://sweeps")


def test_a_url_overlapping_the_local_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="overlap"):
        ObjectStore(tmp_path / "local", f"file://{tmp_path / 'local' / 'copies'}")


def test_a_missing_package_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def without_s3fs(name: str, package: str | None = None) -> object:
        return None if name == "s3fs" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_s3fs)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'sweepsafe\[s3\]'"):
        ObjectStore(tmp_path / "local", "s3://bucket/prefix")


def make_file(local: Path) -> Path:
    local.mkdir(parents=True, exist_ok=True)
    (local / "config.json").write_text('{"lr": 0.1}', encoding="utf-8")
    return local / "config.json"


def test_a_missing_bucket_is_one_clear_line(tmp_path: Path, s3: S3Endpoint) -> None:
    local = tmp_path / "local"
    with ObjectStore(local, "s3://no-such-bucket/sweeps", s3.options(), drive_timeout=30) as store:
        result = store.backup(make_file(local))
    assert not result.ok
    assert result.error is not None
    assert "\n" not in result.error
    assert result.error.startswith("s3://no-such-bucket/sweeps: the bucket 'no-such-bucket'")
    assert "create it" in result.error
    assert not result.retryable


def test_wrong_credentials_are_one_clear_line_that_never_shows_the_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = tmp_path / "local"
    with (
        moto_server(BUCKET, enforce_auth=True) as guarded,
        caplog.at_level(logging.DEBUG, logger="sweepsafe"),
        ObjectStore(local, f"s3://{BUCKET}/x", guarded.options(), drive_timeout=30) as store,
    ):
        result = store.backup(make_file(local))
        argv = " ".join(store._pool.argv)
    assert not result.ok
    assert result.error is not None
    assert "\n" not in result.error
    assert result.error.startswith(f"s3://{BUCKET}/x")
    assert "access denied" in result.error
    assert "credentials" in result.error
    assert SECRET not in result.error
    assert SECRET not in caplog.text
    assert SECRET not in argv
    assert SECRET not in repr(store)


def test_an_endpoint_that_cannot_be_reached_is_one_clear_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    # Nothing listens there now: every connection is refused.
    local = tmp_path / "local"
    options = S3Endpoint(endpoint).options()
    with ObjectStore(local, f"s3://{BUCKET}/gone", options, drive_timeout=60) as store:
        result = store.backup(make_file(local))
    assert not result.ok
    assert result.retryable
    assert result.error is not None
    assert "\n" not in result.error
    assert result.error.startswith(f"s3://{BUCKET}/gone: the endpoint cannot be reached")
    assert endpoint in result.error
    assert SECRET not in result.error


def test_a_hung_endpoint_is_abandoned_at_its_deadline_naming_the_store(tmp_path: Path) -> None:
    local = tmp_path / "local"
    with silent_endpoint() as endpoint:
        options = S3Endpoint(endpoint).options()
        with ObjectStore(local, f"s3://{BUCKET}/hung", options, drive_timeout=2) as store:
            started = time.monotonic()
            result = store.backup(make_file(local))
            elapsed = time.monotonic() - started
    assert not result.ok
    assert result.retryable
    assert result.error is not None
    assert result.error.startswith(f"the object store s3://{BUCKET}/hung did not answer within 2 s")
    # Generous: one deadline, plus starting the helper.
    assert elapsed < 30


def test_a_new_runtime_that_cannot_reach_the_store_refuses_to_start_naming_it(
    tmp_path: Path,
) -> None:
    with silent_endpoint() as endpoint:
        url = f"s3://{BUCKET}/hung"
        with (
            ObjectStore(
                tmp_path / "local", url, S3Endpoint(endpoint).options(), drive_timeout=2
            ) as store,
            pytest.raises(SweepsafeError) as raised,
        ):
            run_sweep(
                lambda trial: trial.suggest_float("x", 0, 1),
                output_dir=store.local_root,
                study_key="hung",
                n_trials=1,
                backup_to_drive=store,
            )
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("Could not reach the copy of ")
    assert f"in the object store s3://{BUCKET}/hung: " in message
    assert f"s3://{BUCKET}/hung/" in message  # the object that did not answer
    assert "restore=False (sweepsafe run --no-restore)" in message


HUNG_CHILD = """
import sys
import optuna
from sweepsafe import ObjectStore, run_sweep

optuna.logging.set_verbosity(optuna.logging.WARNING)
local, endpoint = sys.argv[1], sys.argv[2]
options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": endpoint}}
store = ObjectStore(local, "s3://sweeps/hung", options, drive_timeout=2)
result = run_sweep(lambda t: t.suggest_float("x", 0, 1), output_dir=local, study_key="hung",
                   n_trials=3, backup_to_drive=store, flush_timeout=5, restore=False)
print("sweep finished; backed up:", result.backup_ok, flush=True)
"""


def test_a_sweep_against_a_hung_endpoint_finishes_and_its_process_exits_in_time(
    tmp_path: Path,
) -> None:
    with silent_endpoint() as endpoint:
        started = time.monotonic()
        child = subprocess.run(
            [sys.executable, "-c", HUNG_CHILD, str(tmp_path / "local"), endpoint],
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )
        elapsed = time.monotonic() - started
    assert child.returncode == 0, child.stderr
    assert child.stdout == "sweep finished; backed up: False\n"
    assert "the object store s3://sweeps/hung did not answer within 2 s" in child.stderr
    # Generous: the sweep, a 5 s flush and the exit; a hang would reach the timeout.
    assert elapsed < 60


# -- killed mid-backup -----------------------------------------------------------------------
CHILD = """
import json, os, sys, time
import optuna
from sweepsafe import ObjectStore, SweepsafeError, run_sweep, study_dir_for, trial_dir

optuna.logging.set_verbosity(optuna.logging.WARNING)
local, url, options = sys.argv[1], sys.argv[2], json.loads(os.environ["STORE_OPTIONS"])
store = ObjectStore(local, url, options, drive_timeout=30)


def objective(trial):
    folder = trial_dir(os.path.join(local, os.environ["STUDY_NAME"]), trial)
    (folder / "weights.bin").write_bytes(os.urandom(256 << 10))
    time.sleep(0.2)  # the trial's training
    return trial.suggest_float("x", -2.0, 2.0) ** 2


def say(study, trial):
    print("trial", trial.number, flush=True)


run_sweep(objective, output_dir=local, study_key="killed", n_trials=200,
          backup_to_drive=store, callbacks=[say])
"""


def check_copies(s3: S3Endpoint, prefix: str, local_db: Path, scratch: Path) -> int:
    """No temporary object under ``prefix``, and what a new runtime restores from it is a
    sound database whose finished trials are a prefix of the local study's. Returns how
    many finished trials it holds."""
    assert not [name for name in object_names(s3, prefix) if TEMP_MARK in name]
    if scratch.exists():
        shutil.rmtree(scratch)
    target = scratch / local_db.parent.name / "study.db"
    target.parent.mkdir(parents=True)
    with ObjectStore(scratch, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
        result = store.restore(target)
    if result.reason == "no-copy":
        return 0
    assert result.ok, result.error
    assert integrity(target) == "ok"
    remote_trials = finished_trials(target)
    assert remote_trials == finished_trials(local_db)[: len(remote_trials)]
    return len(remote_trials)


def test_sigkill_mid_backup_leaves_no_corrupt_and_no_temporary_objects(
    tmp_path: Path, s3: S3Endpoint, prefix: str
) -> None:
    local = tmp_path / "local"
    url = f"s3://{prefix}"
    study_dir = study_dir_for(local, "killed")
    env = {
        **os.environ,
        "STORE_OPTIONS": json.dumps(s3.options()),
        "STUDY_NAME": study_dir.name,
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    scratch = tmp_path / "scratch"
    on_store_each_round = []
    chooser = random.Random(14)
    on_store = 0
    for _ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(local), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        for _ in range(chooser.randint(2, 5)):
            assert child.stdout.readline().startswith("trial")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        now = check_copies(s3, prefix, study_dir / "study.db", scratch)
        assert now >= on_store
        on_store = now
        on_store_each_round.append(now)
    # The copies moved forward while the sweep was being killed.
    assert on_store > 0, on_store_each_round

    # The next runtime takes the study over and brings its copy up to date.
    with ObjectStore(local, url, s3.options(), drive_timeout=30) as store:
        assert store.backup(study_dir / "study.db", final=True).ok
        verified = store.verify(study_dir / "study.db")
    assert verified.ok, verified.error
    assert check_copies(s3, prefix, study_dir / "study.db", scratch) == len(
        finished_trials(study_dir / "study.db")
    )


class UploadsForbidden:
    """An S3 file system whose key may not list or abort multipart uploads."""

    protocol = ("s3", "s3a")

    def invalidate_cache(self, path: str | None = None) -> None:
        return None

    def call_s3(self, method: str, **kwargs: Any) -> dict[str, Any]:
        raise PermissionError(f"Access Denied ({method})")


def test_a_key_that_may_not_abort_uploads_leaves_them_and_backups_go_on(tmp_path: Path) -> None:
    """Aborting leftover parts is hygiene: a restricted key must not stop every backup."""
    spool = tmp_path / "spool"
    server = ObjectServer(
        {"url": "s3://sweeps/prefix", "root": "/s3:/sweeps/prefix", "spool": str(spool)}
    )
    spool.mkdir()
    server._fs, server._base = UploadsForbidden(), "sweeps/prefix"
    reply, _ = server.handle(
        {"op": "clean", "path": "/s3:/sweeps/prefix/study-a", "uploads": True}, b""
    )
    assert reply == {"removed": 0, "ok": True}
