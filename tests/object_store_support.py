"""A real S3 endpoint on 127.0.0.1 for the object-store tests: moto in server mode.

The server runs in a child process of its own (its threads and warnings stay out of
the test's process), creates its buckets, prints its port and serves until its stdin
closes. With ``enforce_auth`` every request after the buckets' creation is checked
against moto's IAM, where no key exists: any credentials are wrong.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli_support import finished_numbers, run_cli

_SERVER = """
import sys

import boto3
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
port = server.get_host_and_port()[1]
client = boto3.client(
    "s3",
    endpoint_url=f"http://127.0.0.1:{port}",
    aws_access_key_id="testing",
    aws_secret_access_key="testing",
    region_name="us-east-1",
)
for bucket in sys.argv[1:]:
    client.create_bucket(Bucket=bucket)
print(port, flush=True)
sys.stdin.read()
server.stop()
"""

KEY = "testing"
SECRET = "testing-secret-value"


@dataclass(frozen=True)
class S3Endpoint:
    """A moto S3 server: its URL and the storage options that reach it."""

    endpoint: str

    def options(self, key: str = KEY, secret: str = SECRET) -> dict[str, Any]:
        """fsspec storage options for this endpoint (JSON, as ObjectStore wants)."""
        return {
            "key": key,
            "secret": secret,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }


@contextmanager
def moto_server(*buckets: str, enforce_auth: bool = False) -> Iterator[S3Endpoint]:
    """Start a moto S3 server with ``buckets``; stop it on exit."""
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    if enforce_auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(len(buckets))
    with server_in_child(_SERVER, *buckets, env=env) as port:
        yield S3Endpoint(f"http://127.0.0.1:{port}")


@contextmanager
def server_in_child(script: str, *args: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """Run ``script`` in a child Python that prints its port, then serves until its stdin
    closes; the port. The child is stopped on exit."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        yield int(process.stdout.readline())
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@dataclass(frozen=True)
class SweptToStore:
    """What a sweep backed up to an object store left."""

    database: Path
    finished: int
    restored: bool
    report: str


def sweep_to_store(store: Any, study_key: str, n_trials: int) -> SweptToStore:
    """Run a real sweep to ``n_trials`` whose trials each write a file, backed up to
    ``store``; it must end with a complete backup."""
    import optuna

    from sweep_support import finished_trials
    from sweepsafe import run_sweep, study_dir_for, trial_dir

    def write_files(trial: optuna.Trial) -> float:
        folder = trial_dir(study_dir_for(store.local_root, study_key), trial)
        (folder / "weights.bin").write_bytes(trial.number.to_bytes(4, "big") * 1024)
        return float(trial.suggest_float("x", -2.0, 2.0) ** 2)

    result = run_sweep(
        write_files,
        output_dir=store.local_root,
        study_key=study_key,
        n_trials=n_trials,
        backup_to_drive=store,
        flush_timeout=60,
    )
    assert result.backup_report is not None
    assert result.backup_report.ok, result.backup_report
    database = result.study_dir / "study.db"
    return SweptToStore(
        database,
        len(finished_trials(database)),
        result.restored_from_drive,
        str(result.backup_report),
    )


def restore_with_the_command(
    tmp_path: Path, database: Path, url: str, env: dict[str, str] | None = None
) -> None:
    """Delete the local sweep folder of a 3-trial tiny sweep backed up to ``url``; check
    that ``sweepsafe restore`` brings back its study and its last trial's files."""
    shutil.rmtree(tmp_path / "sweeps")
    restored = run_cli(
        "restore",
        database.parent,
        "--local-root",
        "sweeps",
        "--drive-root",
        url,
        cwd=tmp_path,
        env=env,
    )
    assert restored.returncode == 0, restored.stderr
    assert finished_numbers(database) == [0, 1, 2]
    assert (database.parent / "trials" / "trial-00002" / "result.txt").exists()


@contextmanager
def silent_endpoint() -> Iterator[str]:
    """An endpoint URL whose server accepts connections and never answers a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=10)
        for connection in accepted:
            connection.close()


def object_names(endpoint: S3Endpoint, prefix: str) -> dict[str, int]:
    """Every object under ``bucket/prefix``: key -> size, read with s3fs."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **endpoint.options())
    return {name: int(info["size"]) for name, info in fs.find(prefix, detail=True).items()}


def download(endpoint: S3Endpoint, key: str, target: str) -> None:
    """Copy one object to a local file with s3fs."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **endpoint.options())
    fs.get_file(key, target)


def start_upload(endpoint: S3Endpoint, key: str) -> None:
    """Begin a multipart upload of ``bucket/key`` with one part and leave it unfinished,
    as a helper killed in the middle of a large upload leaves it."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **endpoint.options())
    bucket, _, name = key.partition("/")
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=name)
    fs.call_s3(
        "upload_part",
        Bucket=bucket,
        Key=name,
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"\0" * (5 * 2**20),
    )


def open_uploads(endpoint: S3Endpoint, prefix: str) -> list[str]:
    """The keys of the multipart uploads begun and not finished under ``bucket/prefix``."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **endpoint.options())
    bucket, _, name = prefix.partition("/")
    listed = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=name)
    return sorted(f"{bucket}/{upload['Key']}" for upload in listed.get("Uploads", []))


def put_object(endpoint: S3Endpoint, key: str, data: bytes) -> None:
    """Write one object with s3fs, as another runtime would."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **endpoint.options())
    fs.pipe_file(key, data)


def read_object(endpoint: S3Endpoint, key: str) -> bytes:
    """The content of one object, read with s3fs."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **endpoint.options())
    return bytes(fs.cat_file(key))
