"""The public surface: everything a user needs is importable from ``sweepsafe`` and documented."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import sweepsafe


def test_all_is_sorted_and_importable() -> None:
    assert list(sweepsafe.__all__) == sorted(sweepsafe.__all__)
    for name in sweepsafe.__all__:
        assert getattr(sweepsafe, name) is not None, name


def test_every_public_name_of_every_public_module_is_exported() -> None:
    exported = set(sweepsafe.__all__)
    for module_info in pkgutil.iter_modules(sweepsafe.__path__):
        if module_info.name.startswith("_") or module_info.name in ("cli", "testing"):
            continue
        module = importlib.import_module(f"sweepsafe.{module_info.name}")
        for name in getattr(module, "__all__", ()):
            if name.isupper():  # module constants stay in their module
                continue
            assert name in exported, f"sweepsafe.{module_info.name}.{name} is not re-exported"


def test_every_public_object_is_documented() -> None:
    for name in sweepsafe.__all__:
        obj = getattr(sweepsafe, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not (
                    inspect.isfunction(member) or isinstance(member, property)
                ):
                    continue
                assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_errors_share_one_base() -> None:
    for name in ("BackupFailed", "DriveNotMountedError", "DrivePathError", "StudyNotFoundError"):
        assert issubclass(getattr(sweepsafe, name), sweepsafe.SweepsafeError)
    assert issubclass(sweepsafe.DrivePathError, ValueError)
