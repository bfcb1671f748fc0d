"""StudyBackupReport: what the end-of-sweep backup did, and whether the Drive copy is complete."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from sweepsafe.drive import BackupResult, VerifyResult
from sweepsafe.errors import BackupFailed

if TYPE_CHECKING:
    from sweepsafe.worker import TargetReport

__all__ = ["StudyBackupReport"]

_NO_MISSING: Mapping[int, tuple[str, ...]] = MappingProxyType({})


@dataclass(frozen=True)
class StudyBackupReport:
    """What the end-of-sweep backup did and what the Drive copy holds.

    ``ok`` (and the word "complete" in ``str(report)``) only when every target reached
    Drive, the Drive database is sound, and no finished trial lacks its files there.
    """

    study_dir: Path
    """The study folder that was backed up (or verified, when it lives on Drive)."""
    on_drive: bool
    """True when the study lives on Drive itself: it was only verified, nothing copied."""
    targets: tuple[TargetReport, ...] = ()
    """One entry per local target copied (``study.db``, ``trials/``, ...)."""
    verification: VerifyResult | None = None
    """The Drive copy of ``study.db`` (or the Drive ``study.db`` itself), when checked."""
    timed_out: bool = False
    duration_s: float = 0.0
    error: str | None = None
    """Why the backup could not even start (no Drive store, a Drive mount not answering)."""
    skipped: tuple[str, ...] = ()
    """Entries left out by rule (links out of the study folder...), named once."""
    notes: tuple[str, ...] = field(default_factory=tuple)
    object_store: bool = False
    """The copies live in an object store (an :class:`~sweepsafe.ObjectStore`), not on Drive."""

    @property
    def _copy(self) -> str:
        return "Object store copy" if self.object_store else "Drive copy"

    @property
    def missing_files(self) -> Mapping[int, tuple[str, ...]]:
        """Finished trials whose files are not on Drive, with the files."""
        missing: dict[int, tuple[str, ...]] = {}
        for target in self.targets:
            result = target.last_result
            if isinstance(result, BackupResult):
                missing.update(result.missing_files)
        if self.verification is not None:
            missing.update(self.verification.missing_files)
        return MappingProxyType(missing) if missing else _NO_MISSING

    @property
    def ok(self) -> bool:
        """True when every target reached Drive, the Drive database is sound, and every
        finished trial's files are there."""
        if self.error is not None or self.timed_out or self.missing_files:
            return False
        if any(not target.ok for target in self.targets):
            return False
        return self.verification is None or self.verification.ok

    @property
    def trial_counts(self) -> Mapping[str, int]:
        """Trials per state in the Drive copy of the database (empty if not verified)."""
        return self.verification.trial_counts if self.verification is not None else {}

    @property
    def failed(self) -> tuple[TargetReport, ...]:
        """The targets whose latest backup failed or had not finished in time."""
        return tuple(target for target in self.targets if not target.ok)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        lines: list[str] = []
        if self.error is not None:
            lines.append(f"Backup of {self.study_dir} failed: {self.error}")
        if self.on_drive:
            lines.append(f"{self.study_dir} lives on Google Drive; verified only, nothing copied.")
        lines.extend(_describe_target(target) for target in self.targets)
        if self.timed_out:
            pending = sum(1 for target in self.targets if target.pending)
            lines.append(
                f"The backup did not finish within {_seconds(self.duration_s)}: {pending} "
                "target(s) still pending; they go on in the background until the process exits."
            )
        if self.verification is not None:
            lines.append(_describe_verification(self.verification, self._copy))
        missing = self.missing_files
        if missing:
            numbers = ", ".join(str(n) for n in sorted(missing)[:10])
            lines.append(
                f"{len(missing)} finished trial(s) lack files "
                f"{'in the object store' if self.object_store else 'on Drive'} (trials {numbers}"
                f"{', ...' if len(missing) > 10 else ''}); first: "
                f"{missing[min(missing)][0]}"
            )
        if self.skipped:
            lines.append(f"Left out by rule ({len(self.skipped)}): " + "; ".join(self.skipped[:5]))
        lines.extend(self.notes)
        verdict = f"{self._copy} complete" if self.ok else f"{self._copy} INCOMPLETE"
        return f"{verdict} ({self.duration_s:.1f} s)\n" + "\n".join(f"  {line}" for line in lines)

    def raise_for_failures(self) -> None:
        """Raise :class:`~sweepsafe.errors.BackupFailed` naming what is not on Drive, if anything.

        Raises:
            BackupFailed: the Drive copy is not complete.
        """
        if not self.ok:
            raise BackupFailed(str(self))


def _describe_target(target: TargetReport) -> str:
    result = target.last_result
    if target.ok and isinstance(result, BackupResult) and result.kind == "skipped":
        why = "; ".join(result.notes) or "nothing to copy"
        return f"{target.target} not copied by this runtime: {why}"
    if target.ok:
        detail = ""
        if isinstance(result, BackupResult):
            detail = f": {result.bytes_copied / 1e6:.1f} MB"
            if result.generation is not None:
                detail += f", generation {result.generation}"
            if result.finished_trials is not None:
                detail += f", {result.finished_trials} finished trials"
            if target.is_directory:
                detail += f" in {result.files_copied} changed files"
        return f"{target.target} backed up{detail}"
    if target.pending:
        # A job waiting to be tried again says why its last attempt failed: a backup
        # that can never succeed is then named by its error, not only as slow.
        tried = f" (the last attempt failed: {target.last_error})" if target.last_error else ""
        return f"{target.target} NOT backed up: still pending when the wait ended{tried}"
    return f"{target.target} NOT backed up: {target.last_error or 'the backup failed'}"


def _describe_verification(verification: VerifyResult, copy: str) -> str:
    if not verification.exists:
        if verification.error is not None:
            return f"{copy} {verification.path}: {verification.error}"
        return f"{copy} {verification.path} does not exist"
    counts = ", ".join(
        f"{count} {state}" for state, count in sorted(verification.trial_counts.items())
    )
    integrity = "integrity ok" if verification.integrity_ok else "FAILED integrity check"
    trials = (
        f"{sum(verification.trial_counts.values())} trials ({counts})" if counts else "no trials"
    )
    line = f"{copy} {verification.path}: {trials}, {integrity}"
    if verification.generation is not None:
        line += f", generation {verification.generation}"
    if verification.error is not None:
        line += f"; {verification.error}"
    return line


def _seconds(value: float) -> str:
    """``12 s``, or ``0.4 s`` under ten seconds: a short timeout is not "0 s"."""
    return (
        f"{value:.0f} s" if value >= 10 else f"{value:.1g} s" if value < 0.1 else f"{value:.1f} s"
    )
