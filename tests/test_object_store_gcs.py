"""ObjectStore on Google Cloud Storage: a real sweep through gcsfs against an emulated GCS.

The endpoint is ``gcp-storage-emulator`` on 127.0.0.1 (GCS's JSON API), started by the
tests; the store's helpers reach it through gcsfs exactly as they would reach GCS.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from cli_support import TINY_OBJECTIVE, finished_numbers, run_cli, study_databases
from gcs_support import GcsEndpoint, gcs_emulator
from sweep_support import finished_trials
from sweepsafe import ObjectStore, run_sweep, study_dir_for, trial_dir

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


def sweep(store: ObjectStore, n_trials: int) -> tuple[Path, int, bool, str]:
    """Run up to ``n_trials``; (database, finished trials, restored, the report)."""

    def write_files(trial: optuna.Trial) -> float:
        folder = trial_dir(study_dir_for(store.local_root, "gcs"), trial)
        (folder / "weights.bin").write_bytes(trial.number.to_bytes(4, "big") * 4096)
        return trial.suggest_float("x", -2.0, 2.0) ** 2

    result = run_sweep(
        write_files,
        output_dir=store.local_root,
        study_key="gcs",
        n_trials=n_trials,
        backup_to_drive=store,
        flush_timeout=60,
    )
    assert result.backup_report is not None
    assert result.backup_report.ok, result.backup_report
    database = result.study_dir / "study.db"
    return (
        database,
        len(finished_trials(database)),
        result.restored_from_drive,
        str(result.backup_report),
    )


def test_a_sweep_on_gcs_resumes_on_an_empty_disk_with_its_trial_files(
    tmp_path: Path, gcs: GcsEndpoint
) -> None:
    url = f"gs://{BUCKET}/resumes"
    with ObjectStore(tmp_path / "first", url, gcs.options(), drive_timeout=30) as store:
        database, finished, restored, report = sweep(store, 3)
        assert (finished, restored) == (3, False)
        study_url = f"{url}/{database.parent.name}"
        assert report.startswith("Object store copy complete"), report
        assert f"{study_url}/study.db: 3 trials" in report
        assert store.verify(f"{study_url}/study.db").trial_counts == {"COMPLETE": 3}

    # A new runtime: nothing on its disk but the code.
    with ObjectStore(tmp_path / "second", url, gcs.options(), drive_timeout=30) as store:
        database, finished, restored, _ = sweep(store, 5)
        assert (finished, restored) == (5, True)
        weights = trial_dir(database.parent, 2) / "weights.bin"
        assert weights.read_bytes() == (2).to_bytes(4, "big") * 4096
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

    status = run_cli("status", url, "--json", cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    (listed,) = json.loads(status.stdout)["databases"]
    assert listed["path"] == f"{url}/{database.parent.name}/study.db"
    assert (listed["check"], listed["trial_counts"]) == ("ok", {"COMPLETE": 3})
