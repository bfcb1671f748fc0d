"""Loading the user's objective for ``sweepsafe run``: ``MODULE:FUNCTION``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from sweepsafe.cli._errors import EXIT_UNSOUND, CommandError

if TYPE_CHECKING:
    from optuna.trial import Trial

__all__ = ["WatchedObjective", "explain_sweep_failure", "load_objective"]


def load_objective(spec: str) -> Callable[[Trial], Any]:
    """Import ``MODULE:FUNCTION``; MODULE is a module name or a path to a ``.py`` file.

    The current directory is put on ``sys.path`` first, so a module beside the user is
    found as it would be by ``python -c "import mymodule"``.

    Raises:
        CommandError: the spec is malformed, the module does not import, or the
            function is missing or not callable.
    """
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise CommandError(
            f"objective {spec!r} is not MODULE:FUNCTION (e.g. mymodule:objective or "
            "train.py:objective)"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = _import_module(module_name)
    try:
        objective = getattr(module, function_name)
    except AttributeError:
        raise CommandError(
            f"module {module_name!r} has no function {function_name!r}; "
            f"check the name after the ':' in {spec!r}"
        ) from None
    if not callable(objective):
        raise CommandError(
            f"{spec} is a {type(objective).__name__}, not a function taking an Optuna trial"
        )
    return cast("Callable[[Trial], Any]", objective)


def _import_module(name: str) -> ModuleType:
    is_file = name.endswith(".py") or os.sep in name or (os.altsep or os.sep) in name
    try:
        if not is_file:
            return importlib.import_module(name)
        path = Path(os.path.abspath(name))
        if not path.is_file():
            raise CommandError(f"cannot import objective module {name!r}: {path} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise CommandError(f"cannot import objective module {name!r}: not a Python file")
        # Siblings of the file import as they would when it runs as a script.
        sys.path.insert(0, str(path.parent))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    except CommandError:
        raise
    except Exception as exc:  # any error in the user's module, reported in a line
        raise CommandError(
            f"cannot import objective module {name!r}: {type(exc).__name__}: {exc}"
        ) from exc


class WatchedObjective:
    """The user's objective, remembering what it raised, to tell its errors from others."""

    def __init__(self, objective: Callable[[Trial], Any]) -> None:
        self._objective = objective
        self.raised: BaseException | None = None

    def __call__(self, trial: Trial) -> Any:
        try:
            return self._objective(trial)
        except BaseException as exc:
            self.raised = exc
            raise


def explain_sweep_failure(exc: Exception, objective: WatchedObjective) -> CommandError:
    """One line for a sweep that stopped: the objective's fault, or another."""
    if exc is objective.raised:
        return CommandError(
            f"the sweep stopped: the objective raised {type(exc).__name__}: {exc} "
            "(the study was backed up as far as it got; fix the objective and run the "
            "same command again to resume)",
            EXIT_UNSOUND,
        )
    return CommandError(
        f"the sweep stopped: {type(exc).__name__}: {exc} (run with --verbose for the details)",
        EXIT_UNSOUND,
    )
