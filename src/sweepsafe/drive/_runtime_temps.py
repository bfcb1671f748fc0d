"""The temporaries this process writes on Drive: their tag, and those a killed helper left.

Every temporary name this process writes starts with this process's tag. A stray
clean-up removes the temporaries of other tags (left by a runtime that died) and, of its
own, only those abandoned by a killed helper: never one of a concurrent copy in this
process. A forked child starts a tag of its own.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

from sweepsafe.drive import _reserved_names
from sweepsafe.drive._reserved_names import temp_name

__all__ = [
    "abandoned_in",
    "folders_with_abandoned",
    "forget_abandoned",
    "new_token",
    "process_tag",
]

_process_tag = secrets.token_hex(4)
_abandoned: dict[str, set[str]] = {}  # Drive folder -> temporary names
_abandoned_lock = threading.Lock()


def _start_new_process_tag() -> None:
    global _process_tag, _abandoned_lock
    _process_tag = secrets.token_hex(4)
    # Replaced, not taken: another thread of the parent may have held it at the fork.
    _abandoned_lock = threading.Lock()
    _abandoned.clear()


os.register_at_fork(after_in_child=_start_new_process_tag)


def process_tag() -> str:
    """The tag that starts every temporary name this process writes."""
    return _process_tag


def new_token() -> str:
    """A random token for a temporary name, starting with this process's tag."""
    return _reserved_names.new_token(_process_tag)


def _remember_abandoned(destination: Path, token: str) -> None:
    with _abandoned_lock:
        _abandoned.setdefault(str(destination.parent), set()).add(temp_name(token))


def abandoned_in(folder: Path) -> list[str]:
    """Temporaries in the Drive folder ``folder`` that killed helpers of ours may have left."""
    with _abandoned_lock:
        return sorted(_abandoned.get(str(folder), ()))


def folders_with_abandoned() -> list[Path]:
    """Drive folders where killed helpers of ours may have left temporaries."""
    with _abandoned_lock:
        return [Path(folder) for folder in _abandoned]


def forget_abandoned(folder: Path, names: Sequence[str]) -> None:
    """Forget abandoned temporaries once a clean-up has removed them."""
    with _abandoned_lock:
        left = _abandoned.get(str(folder))
        if left is not None:
            left.difference_update(names)
            if not left:
                del _abandoned[str(folder)]
