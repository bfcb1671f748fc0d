"""How the backup worker judges one attempt, and how long it waits before the next."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["AttemptOutcome", "RetryPolicy", "outcome_of_exception", "outcome_of_result"]

# Retrying cannot mend these: the path or the call is wrong, not the Drive slow.
NOT_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
)

_FALSE_RESULT_ERROR = "the backup callable returned a false result"


@dataclass(frozen=True)
class RetryPolicy:
    """When the worker tries a failed backup again: exponential backoff with jitter.

    The n-th retry waits ``initial_delay * multiplier ** (n - 1)`` seconds, capped at
    ``max_delay``, each delay moved at random by up to ``jitter`` of itself either way.
    A job is tried at most ``max_attempts`` times in all. ``RetryPolicy(initial_delay=0)``
    retries at once, without waiting: what tests want.

    Example:
        >>> RetryPolicy(initial_delay=1.0, jitter=0.0).delay(3)
        4.0
    """

    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 30.0
    max_attempts: int = 5
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("retry delays cannot be negative")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, not {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter is a fraction between 0 and 1, not {self.jitter}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt of a job (1, 2, ...)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** max(0, failures - 1))
        if base <= 0 or self.jitter == 0:
            return base
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + spread))


@dataclass(frozen=True)
class AttemptOutcome:
    """What one call of a backup callable came to, read defensively from what it returned."""

    ok: bool
    error: str | None = None
    retryable: bool = True
    bytes_copied: int = 0
    result: object = None


def outcome_of_result(result: object) -> AttemptOutcome:
    """Read a returned value: ``None`` or a truthy object is a success.

    Objects shaped like ``sweepsafe.drive.BackupResult`` tell more through their ``ok``,
    ``error``, ``retryable`` and ``bytes_copied`` attributes; each is optional.
    """
    if result is None:
        return AttemptOutcome(ok=True)
    declared_ok = getattr(result, "ok", None)
    ok = declared_ok if isinstance(declared_ok, bool) else bool(result)
    copied = getattr(result, "bytes_copied", 0)
    bytes_copied = copied if isinstance(copied, int) and not isinstance(copied, bool) else 0
    if ok:
        return AttemptOutcome(ok=True, bytes_copied=bytes_copied, result=result)
    error = getattr(result, "error", None)
    retryable = getattr(result, "retryable", True)
    return AttemptOutcome(
        ok=False,
        error=str(error) if error else _FALSE_RESULT_ERROR,
        retryable=retryable is not False,
        bytes_copied=bytes_copied,
        result=result,
    )


def outcome_of_exception(exc: Exception) -> AttemptOutcome:
    """Judge an exception the callable raised.

    An exception with a ``retryable`` attribute says itself; otherwise wrong paths and
    wrong arguments are not worth retrying, and anything else is.
    """
    message = str(exc)
    error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    declared = getattr(exc, "retryable", None)
    retryable = (
        declared if isinstance(declared, bool) else not isinstance(exc, NOT_RETRYABLE_ERRORS)
    )
    return AttemptOutcome(ok=False, error=error, retryable=retryable)
