"""is_drive_path: which paths sweepsafe treats as already on Google Drive."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sweepsafe import paths
from sweepsafe.paths import is_drive_path


@pytest.fixture(autouse=True)
def _no_ambient_drive_roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(paths.DRIVE_ROOTS_ENV, raising=False)
    empty = tmp_path / "mountinfo-empty"
    empty.write_text("")
    monkeypatch.setattr(paths, "_MOUNTINFO_PATH", empty)


@pytest.mark.parametrize(
    "path",
    [
        "/content/drive/MyDrive/x",
        "/content/drive/Shareddrives/team/x",
        "/content/drive/MyDrive/sweeps/study-1/study.db",
        "/content/drive",
        "/content/drive/MyDrive/",
        "/content/drive/MyDrive/with space/é ü 日本/study.db",
        "/content/sample_data/../drive/MyDrive/x",
    ],
)
def test_colab_mount_paths_are_drive_paths(path: str) -> None:
    assert is_drive_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/content/sample_data/x",
        "/content/drive-local/x",
        "/content/drive/MyDrive/../../local/x",
        "/tmp",
        "/",
    ],
)
def test_local_paths_are_not_drive_paths(path: str) -> None:
    assert not is_drive_path(path)


def test_roots_from_argument_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_root = tmp_path / "env drive"
    arg_root = tmp_path / "arg-drive"
    env_root.mkdir()
    arg_root.mkdir()
    other = tmp_path / "other"
    monkeypatch.setenv(
        paths.DRIVE_ROOTS_ENV, os.pathsep.join(["", str(tmp_path / "x"), str(env_root)])
    )
    assert is_drive_path(env_root / "study.db")
    assert not is_drive_path(arg_root / "study.db")
    assert is_drive_path(arg_root / "study.db", drive_roots=[arg_root])
    assert is_drive_path(str(arg_root) + "/", drive_roots=[str(arg_root)])
    assert not is_drive_path(other, drive_roots=[arg_root])


def test_relative_paths_resolve_against_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drive = tmp_path / "drive"
    (drive / "sub").mkdir(parents=True)
    monkeypatch.chdir(drive / "sub")
    assert is_drive_path("study.db", drive_roots=[drive])
    assert is_drive_path("./a/../b/", drive_roots=[drive])
    assert not is_drive_path("../../local/study.db", drive_roots=[drive])
    monkeypatch.chdir(tmp_path)
    assert is_drive_path("drive/sub/../x", drive_roots=[drive])
    assert not is_drive_path("drive/../x", drive_roots=[drive])


def test_symlink_into_drive_is_a_drive_path(tmp_path: Path) -> None:
    drive = tmp_path / "drive"
    (drive / "MyDrive" / "sweeps").mkdir(parents=True)
    local = tmp_path / "local"
    local.mkdir()
    (local / "link").symlink_to(drive / "MyDrive" / "sweeps")
    assert is_drive_path(local / "link", drive_roots=[drive])
    assert is_drive_path(local / "link" / "not-yet" / "study.db", drive_roots=[drive])
    assert not is_drive_path(local / "plain", drive_roots=[drive])


def test_symlink_out_of_drive_leaves_drive(tmp_path: Path) -> None:
    drive = tmp_path / "drive"
    drive.mkdir()
    local = tmp_path / "local"
    local.mkdir()
    (drive / "escape").symlink_to(local)
    assert not is_drive_path(drive / "escape" / "study.db", drive_roots=[drive.resolve() / "x"])
    # Spelled under the Drive root, a path is judged by its spelling first.
    assert is_drive_path(drive / "escape" / "study.db", drive_roots=[drive])


def test_drive_root_that_is_itself_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "mnt" / "gdrive"
    real.mkdir(parents=True)
    link_root = tmp_path / "drive-link"
    link_root.symlink_to(real)
    assert is_drive_path(real / "MyDrive" / "x", drive_roots=[link_root])


def test_paths_that_do_not_exist_yet_are_judged_by_nearest_parent(tmp_path: Path) -> None:
    drive = tmp_path / "drive"
    drive.mkdir()
    assert is_drive_path(drive / "a" / "b" / "c" / "study.db", drive_roots=[drive])
    assert not is_drive_path(tmp_path / "nowhere" / "a" / "study.db", drive_roots=[drive])


def test_fuse_drive_mount_from_mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "97 29 0:52 / /mnt/my\\040drive rw,nosuid,nodev shared:1 - fuse.drive drive rw\n"
        "98 29 0:53 / /mnt/other rw - fuse.sshfs host:/ rw\n"
        "malformed line without separator\n"
    )
    monkeypatch.setattr(paths, "_MOUNTINFO_PATH", mountinfo)
    assert is_drive_path("/mnt/my drive/MyDrive/study.db")
    assert is_drive_path("/mnt/my drive")
    assert not is_drive_path("/mnt/other/study.db")
    assert not is_drive_path("/mnt/my drive2/study.db")


def test_unreadable_mountinfo_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paths, "_MOUNTINFO_PATH", tmp_path / "missing")
    assert not is_drive_path(tmp_path)
    assert is_drive_path("/content/drive/MyDrive")


@pytest.mark.parametrize("path", ["", ".", "\x00bad", "/content/drive/\x00x", b"/x".decode()])
def test_never_raises_for_odd_strings(path: str) -> None:
    assert isinstance(is_drive_path(path), bool)
