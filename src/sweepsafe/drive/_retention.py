"""Thinning a database's generations on Drive: which bases to keep, and removing the rest.

Archived bases pile up over a long sweep; thinning keeps a few, spread by age, and
drops the bases, patches and orphaned archives that only the dropped ones served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sweepsafe.drive._drive_errors import DriveOSError
from sweepsafe.drive._generations import BaseRecord, Generation, History, read_record

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper

logger = logging.getLogger("sweepsafe.drive")

__all__ = [
    "thin_history",
]

_AGE_TIERS = (3600.0, 86400.0, 7 * 86400.0)
"""Ages at which a kept base survives thinning: about an hour, a day and a week old."""


def bases_to_keep(bases: list[tuple[int, float]], *, keep: int, now: float) -> set[int]:
    """Which of the ``(number, created)`` bases to keep, at most ``keep`` of them.

    First the newest; then, for each of an hour, a day and a week, the newest base older
    than that and the oldest one younger than it: the latter is kept until it ages past
    the mark and takes the former's place, so there is always one between that age and
    about twice it (once the history is that old). The rest of ``keep`` goes to the
    newest bases.
    """
    if not bases:
        return set()
    newest_first = sorted(bases, key=lambda base: base[0], reverse=True)
    picks = [newest_first[0][0]]
    for age in _AGE_TIERS:
        older = [number for number, created in newest_first if now - created >= age]
        younger = [number for number, created in newest_first if now - created < age]
        if older:
            picks.append(max(older))
        if younger:
            picks.append(min(younger))
    picks.extend(number for number, _ in newest_first)
    chosen: list[int] = []
    for number in picks:
        if number not in chosen:
            chosen.append(number)
    return set(chosen[: max(1, keep)])


async def thin_history(
    helper: DriveHelper,
    folder: Path,
    history: History,
    *,
    keep: int,
    clock: Callable[[], float],
    timeout: float,
) -> int:
    """Drop archived bases beyond ``keep``, thinned by age, and what only they served.

    Kept: the bases :func:`bases_to_keep` picks among the newest base and the archived
    ones, so that an hour-, a day- and a week-old generation survive a long sweep.
    Records of plain bases since replaced, patches older than the oldest kept base and
    orphaned archives go. Returns how many files were removed.
    """
    records: list[tuple[Generation, BaseRecord]] = []
    for bases in history.bases.values():
        for base in bases:
            record = await read_record(helper, folder, base, timeout)
            if record is not None:
                records.append((base, record))
    if not records:
        return 0
    newest = max(base.number for base, _ in records)
    usable = [
        (base.number, record.created)
        for base, record in records
        if base.number == newest or (record.where == "archive" and base.archived)
    ]
    chosen = bases_to_keep(usable, keep=keep, now=clock())
    oldest = min(chosen)
    doomed: list[str] = []
    for base, _record in records:
        if base.number not in chosen:
            doomed.append(base.name)
            if base.archived:
                doomed.append(f"{base.number:08d}-{base.tag}.db")
    doomed.extend(g.name for n, gens in history.patches.items() if n <= oldest for g in gens)
    doomed.extend(history.orphans)
    if not doomed:
        return 0
    try:
        await helper.remove([folder / name for name in doomed], timeout)
    except DriveOSError as exc:
        # Thinning is hygiene: the generation just written stands, and the next full
        # copy tries again. A Drive that does not answer still fails the backup.
        logger.warning(
            "Could not remove %d old generation file(s) from %s: %s; they stay on Google "
            "Drive, and the next full copy tries again.",
            len(doomed),
            folder,
            exc.strerror or exc,
        )
        return 0
    return len(doomed)
