"""ObjectStore and shared-study faults: odd object names, a failing endpoint, a prefix
that is an object, against a real S3 endpoint (moto) and real Optuna studies."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from object_store_support import S3Endpoint, moto_server, object_names, put_object
from sweepsafe import ObjectStore

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
