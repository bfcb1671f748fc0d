"""ObjectStore against a real S3 endpoint (moto's server on 127.0.0.1), side by side.

  (a) a sweep of short trials (about 20 ms each) with no backup, and the same sweep backed
      up by run_sweep to an ObjectStore (alternating, the medians compared);
  (b) one upload of a large file (512 MiB; 64 MiB with --quick) by ObjectStore.backup,
      and the same file put by s3fs's own ``put_file``, to the same endpoint.

moto keeps objects in memory and answers on this machine, so (b) measures the local
work around an upload (sweepsafe's spool, its helper process) rather than a network.

    python tools/bench_object_store.py            # 200 trials, 512 MiB
    python tools/bench_object_store.py --quick    # 40 trials, 64 MiB
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna

from sweepsafe import ObjectStore, run_sweep

TRIAL_SECONDS = 0.02
BUCKET = "bench"

_SERVER = """
import sys
import boto3
from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
port = server.get_host_and_port()[1]
boto3.client(
    "s3",
    endpoint_url=f"http://127.0.0.1:{port}",
    aws_access_key_id="bench",
    aws_secret_access_key="bench",
    region_name="us-east-1",
).create_bucket(Bucket=sys.argv[1])
print(port, flush=True)
sys.stdin.read()
server.stop()
"""


@contextmanager
def moto_endpoint() -> Iterator[dict[str, Any]]:
    """A moto S3 server with the bucket BUCKET; yields its storage options."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER, BUCKET],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        port = int(process.stdout.readline())
        yield {
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {
                "endpoint_url": f"http://127.0.0.1:{port}",
                "region_name": "us-east-1",
            },
        }
    finally:
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


def objective(trial: optuna.trial.Trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    time.sleep(TRIAL_SECONDS)  # the trial's work
    return (x - 2) ** 2


def _sweep(root: Path, options: dict[str, Any] | None, n_trials: int) -> dict[str, Any]:
    local = Path(tempfile.mkdtemp(dir=root))
    store = (
        None
        if options is None
        else ObjectStore(local, f"s3://{BUCKET}/{local.name}", options, drive_timeout=600)
    )
    ended: list[float] = []
    started = time.perf_counter()
    result = run_sweep(
        objective,
        output_dir=local,
        study_key="bench",
        n_trials=n_trials,
        direction="minimize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        callbacks=[lambda study, trial: ended.append(time.perf_counter())],
        backup_to_drive=store,
    )
    finished = time.perf_counter()
    if store is not None:
        store.close()
    return {
        "sweep_s": ended[-1] - started,
        "flush_s": finished - ended[-1],
        "ok": result.backup_ok,
    }


def _uploads(root: Path, options: dict[str, Any], size: int) -> tuple[float, float]:
    """Seconds of ObjectStore.backup and of s3fs's put_file for one file of ``size``."""
    import s3fs

    local = root / "upload"
    local.mkdir()
    big = local / "checkpoint.bin"
    with open(big, "wb") as file:
        for _ in range(size // (8 << 20)):
            file.write(os.urandom(8 << 20))
    with ObjectStore(local, f"s3://{BUCKET}/upload-sweepsafe", options, drive_timeout=600) as store:
        started = time.perf_counter()
        result = store.backup(big)
        ours = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(result.error)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    started = time.perf_counter()
    fs.put_file(str(big), f"{BUCKET}/upload-s3fs/checkpoint.bin")
    reference = time.perf_counter() - started
    return ours, reference


def measure(quick: bool = False) -> list[dict[str, object]]:
    n_trials, size, repeats = (40, 64 << 20, 1) if quick else (200, 512 << 20, 2)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("sweepsafe").setLevel(logging.ERROR)
    with (
        tempfile.TemporaryDirectory(prefix="sweepsafe-bench-objects-") as tmp,
        moto_endpoint() as options,
    ):
        root = Path(tmp)
        plains, safes = [], []
        for _ in range(repeats):
            plains.append(_sweep(root, None, n_trials))
            safes.append(_sweep(root, options, n_trials))
        ours, reference = _uploads(root, options, size)
    plain = statistics.median(run["sweep_s"] for run in plains)
    safe = statistics.median(run["sweep_s"] for run in safes)
    flush = statistics.median(run["flush_s"] for run in safes)
    mib = size >> 20
    label = f"{n_trials} trials of {TRIAL_SECONDS * 1000:.0f} ms, moto S3 on 127.0.0.1"
    return [
        {
            "name": f"sweep with ObjectStore vs no backup ({label})",
            "value": round(safe, 3),
            "unit": "s",
            "reference": round(plain, 3),
            "ratio": round(safe / plain, 3),
            "goal": "<= 1.02",
            "met": safe / plain <= 1.02,
        },
        {
            "name": "final flush after the last trial (ObjectStore)",
            "value": round(flush, 3),
            "unit": "s",
            "reference": None,
            "ratio": None,
            "goal": "for information",
            "met": None,
        },
        {
            "name": "final object-store copy complete",
            "value": all(run["ok"] for run in safes),
            "unit": "",
            "reference": None,
            "ratio": None,
            "goal": "True",
            "met": all(run["ok"] for run in safes),
        },
        {
            "name": f"upload of a {mib} MiB file: ObjectStore.backup vs s3fs put_file",
            "value": round(mib / ours, 1),
            "unit": "MiB/s",
            "reference": round(mib / reference, 1),
            "ratio": round(reference / ours, 3),
            "goal": ">= 0.5",
            "met": reference / ours >= 0.5,
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast version")
    args = parser.parse_args()
    for row in measure(quick=args.quick):
        ratio = "" if row["ratio"] is None else f"ratio {row['ratio']}"
        print(
            f"{row['name']}  {row['value']} {row['unit']}  (ref {row['reference']})  "
            f"{ratio}  goal {row['goal']}"
        )


if __name__ == "__main__":
    main()
