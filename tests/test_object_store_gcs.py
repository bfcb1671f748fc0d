"""ObjectStore on Google Cloud Storage: a real sweep through gcsfs against an emulated GCS.

The endpoint is ``gcp-storage-emulator`` on 127.0.0.1 (GCS's JSON API), started by the
tests; the store's helpers reach it through gcsfs exactly as they would reach GCS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from cli_support import TINY_OBJECTIVE, run_cli, study_databases
from gcs_support import GcsEndpoint, gcs_emulator
from object_store_support import restore_with_the_command, sweep_to_store
from sweepsafe import ObjectStore, trial_dir

optuna.logging.set_verbosity(optuna.logging.WARNING)

BUCKET = "sweeps"
TEMP_MARK = ".sweepsafe-tmp-"
# gcsfs's experimental layer first asks the bucket's layout over gRPC, which the emulator
# does not serve: every new file system would wait a minute for it. GCS itself answers.
PLAIN_GCSFS = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@pytest.fixture(scope="module")
def gcs() -> Iterator[GcsEndpoint]:
    with gcs_emulator(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def plain_gcsfs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in PLAIN_GCSFS.items():
        monkeypatch.setenv(name, value)


def test_a_sweep_on_gcs_resumes_on_an_empty_disk_with_its_trial_files(
    tmp_path: Path, gcs: GcsEndpoint
) -> None:
    url = f"gs://{BUCKET}/resumes"
    with ObjectStore(tmp_path / "first", url, gcs.options(), drive_timeout=30) as store:
        first = sweep_to_store(store, "gcs", 3)
        assert (first.finished, first.restored) == (3, False)
        study_url = f"{url}/{first.database.parent.name}"
        assert first.report.startswith("Object store copy complete"), first.report
        assert f"{study_url}/study.db: 3 trials" in first.report
        assert store.verify(f"{study_url}/study.db").trial_counts == {"COMPLETE": 3}

    # A new runtime: nothing on its disk but the code.
    with ObjectStore(tmp_path / "second", url, gcs.options(), drive_timeout=30) as store:
        second = sweep_to_store(store, "gcs", 5)
        database = second.database
        assert (second.finished, second.restored) == (5, True)
        weights = trial_dir(database.parent, 2) / "weights.bin"
        assert weights.read_bytes() == (2).to_bytes(4, "big") * 1024
        assert store.verify(database).trial_counts == {"COMPLETE": 5}

    names = gcs.object_names(BUCKET, "resumes/")
    assert not [name for name in names if TEMP_MARK in name]
    assert f"resumes/{database.parent.name}/study.db" in names
    assert f"resumes/{database.parent.name}/trials/trial-00004/weights.bin" in names


def test_the_command_backs_up_restores_and_lists_a_sweep_on_gcs(
    tmp_path: Path, gcs: GcsEndpoint
) -> None:
    # The command takes its credentials and endpoint from the environment, as gcsfs does.
    env = {**PLAIN_GCSFS, "STORAGE_EMULATOR_HOST": gcs.endpoint}
    (tmp_path / "tinyobj.py").write_text(TINY_OBJECTIVE)
    url = f"gs://{BUCKET}/command"
    common = ("--output-dir", "sweeps", "--study-key", "tiny", "--drive-dir", url)
    ran = run_cli("run", "tinyobj:objective", *common, "--trials", "3", cwd=tmp_path, env=env)
    assert ran.returncode == 0, ran.stderr
    (database,) = study_databases(tmp_path / "sweeps")

    restore_with_the_command(tmp_path, database, url, env)

    status = run_cli("status", url, "--json", cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    (listed,) = json.loads(status.stdout)["databases"]
    assert listed["path"] == f"{url}/{database.parent.name}/study.db"
    assert (listed["check"], listed["trial_counts"]) == ("ok", {"COMPLETE": 3})
