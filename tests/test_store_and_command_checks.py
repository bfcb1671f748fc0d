"""Object-store copies read back by the command, and the command's refusals of bad folders.

Real Optuna studies in real SQLite files, real ``sweepsafe`` subprocesses; the object
store is a ``file://`` folder or a closed port on 127.0.0.1.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import optuna
import pytest

from cli_support import TINY_OBJECTIVE, assert_one_error_line, finished_numbers, run_cli
from sweepsafe import DriveStore, ObjectStore

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_study(study_dir: Path, trials: int) -> Path:
    """A real Optuna study with ``trials`` finished trials in ``study_dir/study.db``."""
    study_dir.mkdir(parents=True, exist_ok=True)
    database = study_dir / "study.db"
    study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=trials)
    return database


def back_up_generations(local: Path, url: str, generations: int) -> Path:
    """Back a study up once per trial: generation 1 a base, the next ones patches."""
    study_dir = local / "study-a"
    database = make_study(study_dir, 1)
    with ObjectStore(local, url) as store:
        assert store.backup(database).ok
        for _ in range(generations - 1):
            study = optuna.load_study(study_name="s", storage=f"sqlite:///{database}")
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
            assert store.backup(database).ok
        store.release(study_dir)
    return database


def test_verify_and_history_of_a_url_whose_study_keeps_no_history_stay_inside_the_store(
    tmp_path: Path,
) -> None:
    """A study folder whose .sweepsafe folder is gone (or a database put there by hand):
    looking for its history must not step above the URL the command was given."""
    remote = tmp_path / "bucket" / "sweeps"
    database = make_study(remote / "study-a", 2)
    url = f"file://{remote}/study-a"

    verified = run_cli("verify", url, cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert "2 trials (2 COMPLETE)" in verified.stdout

    status = run_cli("status", f"file://{remote}", cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert " ok" in status.stdout.splitlines()[1]

    history = run_cli("history", url, cwd=tmp_path)
    assert history.returncode == 2
    assert_one_error_line(history, f"no generations of {url}/study.db are kept")
    assert database.exists()


def test_history_of_a_url_whose_endpoint_cannot_be_reached_is_one_clear_line(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    history = run_cli(
        "history", "s3://sweeps/study-a", "--drive-timeout", "20", cwd=tmp_path, env=env
    )
    assert history.returncode == 2, history.stderr
    line = assert_one_error_line(history, "s3://sweeps/study-a", "the endpoint cannot be reached")
    assert "unexpected" not in line


def test_a_damaged_archived_base_is_rebuilt_from_the_plain_copy_that_holds_it(
    tmp_path: Path,
) -> None:
    """The plain study.db holds the same base generation (checked by its hash): a
    restore uses it, as verify already said the copy was sound."""
    remote = tmp_path / "bucket" / "sweeps"
    url = f"file://{remote}"
    database = back_up_generations(tmp_path / "first", url, 3)
    history = remote / "study-a" / ".sweepsafe" / "history" / "study.db"
    (archived,) = history.glob("00000001-*.db")
    archived.write_bytes(b"damaged by hand" * 100)

    verified = run_cli("verify", f"{url}/study-a", cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr

    local = tmp_path / "second"
    target = local / database.parent.name / "study.db"
    target.parent.mkdir(parents=True)
    with ObjectStore(local, url) as store:
        restored = store.restore(target)
    assert restored.ok, restored.error
    assert restored.generation == 3
    assert finished_numbers(target) == [0, 1, 2]


@pytest.mark.parametrize("command", ["run", "backup"])
def test_a_drive_folder_that_is_a_file_is_refused_and_the_file_kept(
    tmp_path: Path, command: str
) -> None:
    (tmp_path / "tinyobj.py").write_text(TINY_OBJECTIVE)
    drive = tmp_path / "notes.txt"
    drive.write_text("the user's own file\n")
    if command == "run":
        ran = run_cli(
            "run",
            "tinyobj:objective",
            "--output-dir",
            "sweeps",
            "--study-key",
            "k",
            "--drive-dir",
            drive,
            "--trials",
            "1",
            cwd=tmp_path,
        )
    else:
        make_study(tmp_path / "sweeps" / "study-a", 1)
        ran = run_cli(
            "backup",
            tmp_path / "sweeps" / "study-a",
            "--local-root",
            "sweeps",
            "--drive-root",
            drive,
            cwd=tmp_path,
        )
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert_one_error_line(ran, str(drive), "is a file")
    assert drive.read_text() == "the user's own file\n"


def test_a_store_whose_drive_root_is_a_file_never_replaces_it(tmp_path: Path) -> None:
    drive = tmp_path / "notes.txt"
    drive.write_text("the user's own file\n")
    local = tmp_path / "local"
    database = make_study(local / "study-a", 1)
    with DriveStore(local, drive) as store:
        result = store.backup(database)
    assert not result.ok
    assert drive.read_text() == "the user's own file\n"


def test_a_file_url_that_names_a_file_never_replaces_it(tmp_path: Path) -> None:
    drive = tmp_path / "notes.txt"
    drive.write_text("the user's own file\n")
    local = tmp_path / "local"
    database = make_study(local / "study-a", 1)
    with ObjectStore(local, f"file://{drive}") as store:
        result = store.backup(database)
    assert not result.ok
    assert result.error is not None
    assert str(drive) in result.error
    assert drive.read_text() == "the user's own file\n"


def test_a_runtime_whose_study_was_taken_over_leaves_the_new_owners_uploads_at_release(
    tmp_path: Path,
) -> None:
    """Releasing aborts this runtime's own abandoned uploads while it holds the lease;
    once another runtime has taken the study over, an open upload is that one's."""
    from object_store_support import (
        moto_server,
        open_uploads,
        put_object,
        read_object,
        start_upload,
    )
    from sweepsafe.drive._replica import Lease, Runtime

    with moto_server("sweeps") as s3:
        local = tmp_path / "local"
        database = make_study(local / "study-a", 1)
        prefix = "sweeps/taken"
        key = f"{prefix}/study-a/.sweepsafe/lease.json"
        with ObjectStore(local, f"s3://{prefix}", s3.options(), drive_timeout=30) as store:
            assert store.backup(database).ok
            other = Runtime("other", "other-host", 4242, "boot", time.time() - 60)
            theirs = Lease(other, time.time(), time.time())
            put_object(s3, key, theirs.to_json())
            upload = f"{prefix}/study-a/trials/trial-00007/last.pt"
            start_upload(s3, upload)  # the new owner's large upload, in flight
            store.release(database.parent)
        assert open_uploads(s3, prefix) == [upload]
        assert Lease.from_json(read_object(s3, key)) == theirs


def test_a_trial_file_that_became_a_folder_is_restored_as_the_folder_from_s3(
    tmp_path: Path,
) -> None:
    """S3 keeps the object of the old file beside the new folder's objects (no rename,
    nothing in the way to remove): a restore brings back the folder, and succeeds."""
    from object_store_support import moto_server

    with moto_server("sweeps") as s3:
        url = "s3://sweeps/became"
        local = tmp_path / "local"
        trial = local / "study-a" / "trials" / "trial-00000"
        trial.mkdir(parents=True)
        (trial / "ckpt").write_text("an early checkpoint")
        with ObjectStore(local, url, s3.options(), drive_timeout=30) as store:
            assert store.backup(local / "study-a", is_directory=True).ok
            (trial / "ckpt").unlink()
            (trial / "ckpt").mkdir()
            (trial / "ckpt" / "model.bin").write_text("the final model")
            assert store.backup(local / "study-a", is_directory=True).ok

        fresh = tmp_path / "fresh"
        (fresh / "study-a").mkdir(parents=True)
        with ObjectStore(fresh, url, s3.options(), drive_timeout=30) as store:
            restored = store.restore(fresh / "study-a", is_directory=True)
    assert restored.ok, restored.error
    model = fresh / "study-a" / "trials" / "trial-00000" / "ckpt" / "model.bin"
    assert model.read_text() == "the final model"


def test_a_url_with_an_extra_slash_reads_the_same_copies_and_names_them_one_way(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "bucket" / "sweeps"
    back_up_generations(tmp_path / "local", f"file://{remote}", 2)
    url = f"file:///{remote}"  # file:////tmp/...: one slash too many, as typed by hand
    status = run_cli("status", url, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[1].startswith("study-a ")
    verified = run_cli("verify", f"{url}/study-a", cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"file://{remote}/study-a/study.db: sound")
    history = run_cli("history", f"{url}/study-a", cwd=tmp_path)
    assert history.returncode == 0, history.stderr


@pytest.mark.parametrize("command", ["status", "verify", "history"])
def test_a_url_without_a_bucket_is_one_clear_line(tmp_path: Path, command: str) -> None:
    ran = run_cli(command, "s3://", cwd=tmp_path)
    assert ran.returncode == 2
    line = assert_one_error_line(ran, "is not an object store URL", "s3://bucket/prefix")
    assert "unexpected" not in line


def test_an_output_folder_that_cannot_be_created_is_named_and_drive_is_not_blamed(
    tmp_path: Path,
) -> None:
    (tmp_path / "tinyobj.py").write_text(TINY_OBJECTIVE)
    (tmp_path / "results").write_text("a file where a folder is wanted\n")
    output = tmp_path / "results" / "sweeps"
    ran = run_cli(
        "run",
        "tinyobj:objective",
        "--output-dir",
        output,
        "--study-key",
        "k",
        "--drive-dir",
        tmp_path / "drive",
        "--trials",
        "1",
        cwd=tmp_path,
    )
    assert ran.returncode == 2, ran.stderr
    line = assert_one_error_line(ran, f"--output-dir {output} cannot be created")
    assert "Drive" not in line


def test_a_study_another_runtime_holds_is_named_by_its_url(tmp_path: Path) -> None:
    from sweepsafe import run_sweep, study_dir_for
    from sweepsafe.drive._replica import Lease, Runtime
    from sweepsafe.errors import LeaseHeldError

    remote = tmp_path / "bucket" / "sweeps"
    url = f"file://{remote}"
    local = tmp_path / "local"
    study_dir = study_dir_for(local, "held")
    lease = remote / study_dir.name / ".sweepsafe" / "lease.json"
    lease.parent.mkdir(parents=True)
    other = Runtime("other", "other-host", 4242, "boot", time.time() - 60)
    lease.write_bytes(Lease(other, time.time(), time.time()).to_json())
    with ObjectStore(local, url) as store, pytest.raises(LeaseHeldError) as raised:
        run_sweep(
            lambda t: t.suggest_float("x", 0, 1),
            output_dir=local,
            study_key="held",
            n_trials=1,
            backup_to_drive=store,
        )
    message = str(raised.value)
    assert message.startswith(f"{url}/{study_dir.name} is being backed up by another runtime")
    assert "/file:/" not in message


def test_a_trial_object_deleted_from_the_store_is_copied_again_by_the_final_backup(
    tmp_path: Path,
) -> None:
    remote = tmp_path / "bucket" / "sweeps"
    local = tmp_path / "local"
    trial = local / "study-a" / "trials" / "trial-00000"
    trial.mkdir(parents=True)
    (trial / "weights.bin").write_bytes(b"w" * 1000)
    with ObjectStore(local, f"file://{remote}") as store:
        assert store.backup(local / "study-a", is_directory=True).ok
        copy = remote / "study-a" / "trials" / "trial-00000" / "weights.bin"
        copy.unlink()  # a lifecycle rule, or a hand, removed it
        result = store.backup(local / "study-a", is_directory=True, final=True)
    assert result.ok, result.error
    assert copy.read_bytes() == b"w" * 1000
