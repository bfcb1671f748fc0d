"""The blocking faces of a store: each runs its async twin to the end.

Each blocks the calling thread until the async method is done, whether it is called
from a plain script, from a thread, or from a notebook cell (where an event loop
already runs).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from sweepsafe._blocking import run_blocking

if TYPE_CHECKING:
    from sweepsafe.drive._backend import BackupBackend, StrPath
    from sweepsafe.drive._results import BackupResult, GenerationInfo, VerifyResult

__all__ = ["BlockingFaces"]

T = TypeVar("T")


class BlockingFaces:
    """The blocking methods of :class:`~sweepsafe.drive.DriveStore`, one per async one."""

    def acquire(self: BackupBackend, study_dir: StrPath, *, takeover: bool = False) -> None:
        """Blocking :meth:`aacquire`."""
        _run(functools.partial(self.aacquire, study_dir, takeover=takeover))

    def release(self: BackupBackend, study_dir: StrPath | None = None) -> None:
        """Blocking :meth:`arelease`."""
        _run(functools.partial(self.arelease, study_dir))

    def backup(
        self: BackupBackend,
        path: StrPath,
        is_directory: bool = False,
        *,
        exclude: Sequence[str] = (),
        final: bool = False,
    ) -> BackupResult:
        """Blocking :meth:`abackup`; also works in a notebook cell (a running event loop)."""
        return _run(
            functools.partial(self.abackup, path, is_directory, exclude=exclude, final=final)
        )

    def restore(
        self: BackupBackend,
        path: StrPath,
        is_directory: bool = False,
        *,
        generation: int | None = None,
        before: float | None = None,
    ) -> BackupResult:
        """Blocking :meth:`arestore`; also works in a notebook cell (a running event loop)."""
        return _run(
            functools.partial(
                self.arestore, path, is_directory, generation=generation, before=before
            )
        )

    def verify(self: BackupBackend, path: StrPath) -> VerifyResult:
        """Blocking :meth:`averify`; also works in a notebook cell (a running event loop)."""
        return _run(functools.partial(self.averify, path))

    def history(self: BackupBackend, path: StrPath) -> list[GenerationInfo]:
        """Blocking :meth:`ahistory`."""
        return _run(functools.partial(self.ahistory, path))


def _run(func: Callable[[], Awaitable[T]]) -> T:
    return run_blocking(func)
