"""The public surface: a short list a user can hold in their head, all of it documented."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

import sweepsafe
from sweepsafe.drive import BackupBackend, DriveStore

PUBLIC_MODULES = (
    "sweepsafe",
    "sweepsafe.errors",
    "sweepsafe.drive",
    "sweepsafe.worker",
    "sweepsafe.testing",
    "sweepsafe.backup",
    "sweepsafe.sweep",
    "sweepsafe.paths",
    "sweepsafe.export",
)
README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_top_level_names_are_few_sorted_and_importable() -> None:
    assert list(sweepsafe.__all__) == sorted(sweepsafe.__all__)
    assert len(sweepsafe.__all__) < 20
    for name in sweepsafe.__all__:
        assert getattr(sweepsafe, name) is not None, name
    # The seed's names stay where users found them.
    for name in (
        "backup_hpo_study_to_drive",
        "create_incremental_backup_callback",
        "create_study_db_backup_callback",
        "run_sweep",
        "DriveStore",
    ):
        assert name in sweepsafe.__all__


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_object_is_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert inspect.getdoc(module), module_name
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not (
                    inspect.isfunction(member) or isinstance(member, property)
                ):
                    continue
                assert inspect.getdoc(member), f"{module_name}.{name}.{attr} has no docstring"


def test_errors_share_one_base() -> None:
    from sweepsafe import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.SweepsafeError)
    assert issubclass(errors.DrivePathError, ValueError)


def test_the_drive_store_is_a_backup_backend(tmp_path: Path) -> None:
    with DriveStore(tmp_path / "local", tmp_path / "drive") as store:
        assert isinstance(store, BackupBackend)


def test_the_readme_imports_only_public_modules() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks
    for block in blocks:
        code = "\n".join(line for line in block.splitlines() if not line.startswith("!"))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                assert not any(part.startswith("_") for part in parts), node.module
                if parts[0] == "sweepsafe":
                    assert node.module in PUBLIC_MODULES, node.module
                    for alias in node.names:
                        assert not alias.name.startswith("_"), alias.name
