"""What the store's operations return: frozen results that are truthy when they succeeded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

__all__ = ["BackupResult", "GenerationInfo", "StudySummary", "VerifyResult"]

Kind = Literal["sqlite", "file", "directory", "skipped"]
_NO_COUNTS: Mapping[str, int] = MappingProxyType({})
_NO_MISSING: Mapping[int, tuple[str, ...]] = MappingProxyType({})


@dataclass(frozen=True)
class BackupResult:
    """The outcome of one backup or restore; truthy when it succeeded.

    For a backup ``source`` is the local path and ``destination`` its Drive copy; for a
    restore ``source`` is the Drive copy and ``destination`` the local path. A copy in
    an object store is named by its URL (a ``str``, ``s3://bucket/prefix/...``).
    """

    ok: bool
    source: Path | str
    destination: Path | str | None
    kind: Kind
    bytes_copied: int = 0
    files_copied: int = 0
    files_unchanged: int = 0
    duration_s: float = 0.0
    error: str | None = None
    """One sentence: what failed, where, and what to do."""
    retryable: bool = False
    """True when trying again may succeed (Drive I/O error, timeout, full, disconnected)."""
    reason: Literal["no-copy", "diverged", "refused"] | None = None
    """Why a restore replaced nothing: Drive holds no copy; the local study and the Drive
    copy diverged; the Drive copy failed its checks or is older than the local one."""
    generation: int | None = None
    """A study database: the generation now on Drive (backup) or brought back (restore)."""
    finished_trials: int | None = None
    """A study database: finished trials in the Drive copy (or in what was restored)."""
    missing_files: Mapping[int, tuple[str, ...]] = field(default_factory=lambda: _NO_MISSING)
    """A study database: finished trials whose files Drive refused, that keep changing,
    or that failed for too long (see ``HOLD_BACK_S``); ``ok`` is about the database."""
    problems: tuple[str, ...] = ()
    """Entries that were not copied, each ``path (reason)``."""
    skipped: tuple[str, ...] = ()
    """Entries left out by rule (a link out of the study folder, a FIFO), each named once."""
    kept_local: tuple[str, ...] = ()
    """A restore: local files changed since their last backup, kept instead of replaced."""
    notes: tuple[str, ...] = ()
    """Anything else worth saying (a damaged generation passed over, a file set aside)."""
    local_s: float = 0.0
    """A study database: seconds the backup worked on this machine (its snapshot, reading
    it, comparing its pages), which a sweep's next backup waits to keep a small share."""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class StudySummary:
    """One Optuna study inside a database."""

    name: str
    directions: tuple[str, ...]
    """``"minimize"`` or ``"maximize"`` per objective."""
    trial_counts: Mapping[str, int]
    """Trial state name (``"COMPLETE"``, ...) -> count."""
    best_value: float | None
    """Best objective value of the COMPLETE trials; None for several objectives or none."""


@dataclass(frozen=True)
class VerifyResult:
    """What a database (its Drive copy, or a file itself) holds; truthy when it is sound
    and complete."""

    path: Path | str
    """The file that was checked: the Drive copy, or the path itself; an object store's
    copy by its URL (a ``str``)."""
    exists: bool
    size: int | None = None
    mtime: float | None = None
    """Seconds since the epoch: for a Drive copy, the time of its last backup."""
    is_sqlite: bool = False
    integrity_ok: bool | None = None
    """``PRAGMA integrity_check`` said ok; None when not SQLite or not checked."""
    studies: tuple[StudySummary, ...] = ()
    generation: int | None = None
    """The generation the plain copy holds (when Drive keeps a history)."""
    newest_generation: int | None = None
    """The newest generation in the history, which may be ahead of the plain copy."""
    missing_files: Mapping[int, tuple[str, ...]] = field(default_factory=lambda: _NO_MISSING)
    """Finished trials whose files are not on Drive, by the newest generation's record."""
    newest_finished_trials: int | None = None
    """Finished trials of the newest generation, by its record (``studies`` counts the
    plain copy's, which may be an older generation during a sweep)."""
    error: str | None = None
    """Why it is not sound or not complete, in one sentence."""

    @property
    def trial_counts(self) -> Mapping[str, int]:
        """Trials per state, over every study."""
        totals: dict[str, int] = {}
        for study in self.studies:
            for state, count in study.trial_counts.items():
                totals[state] = totals.get(state, 0) + count
        return MappingProxyType(totals) if totals else _NO_COUNTS

    @property
    def study_names(self) -> tuple[str, ...]:
        """The names of the Optuna studies in it."""
        return tuple(study.name for study in self.studies)

    @property
    def finished_trials(self) -> int:
        """COMPLETE and PRUNED trials, over every study."""
        counts = self.trial_counts
        return counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)

    @property
    def ok(self) -> bool:
        """It exists, could be checked, is sound, and no finished trial lacks its files."""
        return (
            self.exists
            and self.error is None
            and (not self.is_sqlite or bool(self.integrity_ok))
            and not self.missing_files
        )

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class GenerationInfo:
    """One generation of a database kept on Drive."""

    number: int
    kind: Literal["patch", "base"]
    """``base``: stored whole; ``patch``: the pages changed since the previous one."""
    created: float | None
    """When it was published, seconds since the epoch."""
    finished_trials: int | None
    best_value: float | None
    size: int
    """Bytes on Drive: of the patch, or of the whole database for a base."""
    runtime: str
    """The tag of the runtime that published it."""
    problem: str | None = None
