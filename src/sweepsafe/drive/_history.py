"""A database's generations on Drive: page-delta patches, bases, and rebuilding any of them.

Every published snapshot of a database is a *generation*, numbered from 1. In the study
folder's ``.sweepsafe/history/<database>/`` on Drive:

- ``00000042-<tag>.patch``: generation 42 as the pages that changed since generation 41,
  compressed and checksummed (see ``_pages``); ``<tag>`` names the runtime that wrote it.
- ``00000040-<tag>.json``: a *base*: generation 40 is stored whole, in the plain
  ``study.db`` beside the study (``"where": "plain"``, until the next base replaces it)
  or archived as ``00000040-<tag>.db``, a plain SQLite file (``"where": "archive"``).
  It names the SHA-256 of that content; the content is written before its record.

Every generation, bases included, also has its patch, so the chain of patches is
unbroken from the oldest kept base to the newest generation: a generation is rebuilt
from the newest usable base at or below it plus the patches after it, each checked
against its predecessor's hash. A missing or damaged patch ends the chain at the last
good generation, and the rebuild says which.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from sweepsafe.drive._drive_errors import DriveOSError
from sweepsafe.drive._files import remove_quietly, scratch_path
from sweepsafe.drive._pages import (
    Patch,
    PatchError,
    apply_patch,
    apply_patch_in_place,
    decode_patch,
    read_patch_header,
    sha256_file,
)
from sweepsafe.drive._reserved_names import STATE_DIR_NAME

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper, DriveListing

__all__ = [
    "BaseRecord",
    "Generation",
    "GenerationDetails",
    "History",
    "NoUsableBase",
    "Rebuilt",
    "history_dir",
    "list_history",
    "parse_history",
    "read_details",
    "rebuild",
    "thin_history",
    "write_base_record",
]

_NAME = re.compile(r"^(\d{8})-([0-9a-f]{1,32})\.(patch|json|db)$")
_HEADER_READ = 64 << 10
_PATCH_READ = 512 << 20
_FORMAT = 1


def history_dir(unit_drive: Path, database_rel: str) -> Path:
    """Where the generations of the database ``database_rel`` (in the study folder) live."""
    key = database_rel.replace("%", "%25").replace("/", "%2F")
    return unit_drive / STATE_DIR_NAME / "history" / key


@dataclass(frozen=True)
class Generation:
    """One generation file (a patch or a base record) as the folder listing shows it."""

    number: int
    tag: str
    kind: Literal["patch", "base"]
    name: str
    size: int
    archived: bool = False
    """A base whose archived ``.db`` is present beside its record."""


@dataclass(frozen=True)
class History:
    """What a history folder holds."""

    patches: Mapping[int, tuple[Generation, ...]] = field(default_factory=dict)
    bases: Mapping[int, tuple[Generation, ...]] = field(default_factory=dict)
    orphans: tuple[str, ...] = ()
    """Archived ``.db`` files without a record (a kill between the two writes)."""

    @property
    def head(self) -> int:
        """The newest generation number (0 when empty)."""
        return max((*self.patches, *self.bases), default=0)

    def tags_of(self, number: int) -> set[str]:
        """The tags of the runtimes that wrote generation ``number``."""
        return {g.tag for g in (*self.patches.get(number, ()), *self.bases.get(number, ()))}

    @property
    def empty(self) -> bool:
        """No generation at all."""
        return not self.patches and not self.bases


def parse_history(listing: DriveListing) -> History:
    """The generations in a history folder listing; other names are ignored."""
    patches: dict[int, list[Generation]] = {}
    archives: set[str] = set()
    records: list[tuple[int, str, str, int]] = []
    for entry in listing.entries:
        match = _NAME.match(entry.name)
        if match is None or entry.kind != "file":
            continue
        number, tag, suffix = int(match[1]), match[2], match[3]
        if suffix == "patch":
            patches.setdefault(number, []).append(
                Generation(number, tag, "patch", entry.name, entry.size)
            )
        elif suffix == "db":
            archives.add(f"{match[1]}-{tag}")
        else:
            records.append((number, tag, entry.name, entry.size))
    bases: dict[int, list[Generation]] = {}
    for number, tag, name, size in records:
        archived = f"{number:08d}-{tag}" in archives
        bases.setdefault(number, []).append(Generation(number, tag, "base", name, size, archived))
    recorded = {f"{number:08d}-{tag}" for number, tag, _, _ in records}
    orphans = tuple(sorted(f"{stem}.db" for stem in archives - recorded))
    return History(
        {n: tuple(g) for n, g in patches.items()},
        {n: tuple(g) for n, g in bases.items()},
        orphans,
    )


async def list_history(helper: DriveHelper, folder: Path, timeout: float) -> History:
    """List and parse one history folder."""
    return parse_history(await helper.listdir(folder, timeout))


@dataclass(frozen=True)
class BaseRecord:
    """What a base record says."""

    generation: int
    sha256: str
    size: int
    created: float
    where: Literal["plain", "archive"]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        """The record file's content."""
        body = {
            "format": _FORMAT,
            "generation": self.generation,
            "sha256": self.sha256,
            "size": self.size,
            "created": self.created,
            "where": self.where,
            "meta": dict(self.meta),
        }
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BaseRecord | None:
        """A record read from Drive; None when it is unreadable."""
        try:
            data = json.loads(raw)
            where = data["where"]
            if where not in ("plain", "archive"):
                return None
            return cls(
                int(data["generation"]),
                str(data["sha256"]),
                int(data["size"]),
                float(data["created"]),
                where,
                dict(data.get("meta") or {}),
            )
        except (ValueError, KeyError, TypeError):
            return None


async def write_base_record(
    helper: DriveHelper, folder: Path, tag: str, record: BaseRecord, timeout: float
) -> None:
    """Write a base's record, after its content is on Drive."""
    name = f"{record.generation:08d}-{tag}.json"
    await helper.put_bytes(folder / name, record.to_json(), timeout)


async def _read_record(
    helper: DriveHelper, folder: Path, base: Generation, timeout: float
) -> BaseRecord | None:
    raw = await helper.read(folder / base.name, timeout, limit=_HEADER_READ)
    return BaseRecord.from_json(raw) if raw is not None else None


@dataclass(frozen=True)
class GenerationDetails:
    """One generation as ``history`` shows it: when, and what its snapshot held."""

    number: int
    tag: str
    kind: Literal["patch", "base"]
    created: float | None
    meta: Mapping[str, Any]
    size: int
    """Bytes of the generation file (a patch), or of the whole database (a base)."""
    problem: str | None = None


async def read_details(
    helper: DriveHelper, folder: Path, history: History, timeout: float
) -> list[GenerationDetails]:
    """Every generation's time and metadata, newest first, from headers and records only."""
    details: list[GenerationDetails] = []
    for number in sorted({*history.patches, *history.bases}, reverse=True):
        for base in history.bases.get(number, ()):
            record = await _read_record(helper, folder, base, timeout)
            if record is None:
                details.append(
                    GenerationDetails(number, base.tag, "base", None, {}, 0, "unreadable record")
                )
            else:
                details.append(
                    GenerationDetails(
                        number, base.tag, "base", record.created, record.meta, record.size
                    )
                )
        for patch in history.patches.get(number, ()):
            raw = await helper.read(folder / patch.name, timeout, limit=_HEADER_READ, head=True)
            try:
                header = read_patch_header(raw or b"")
            except PatchError as exc:
                details.append(
                    GenerationDetails(number, patch.tag, "patch", None, {}, patch.size, str(exc))
                )
                continue
            details.append(
                GenerationDetails(
                    number, patch.tag, "patch", header.created, header.meta, patch.size
                )
            )
    return details


class NoUsableBase(Exception):
    """No generation can be rebuilt: every base at or below it is missing or damaged."""


@dataclass(frozen=True)
class Rebuilt:
    """A generation rebuilt into a local file."""

    path: Path
    generation: int
    tag: str
    sha256: str
    meta: Mapping[str, Any]
    notes: tuple[str, ...] = ()
    """What was passed over on the way: a damaged base, a missing or damaged patch."""
    patched: bool = False
    """Patches were applied to the base."""


async def rebuild(
    helper: DriveHelper,
    folder: Path,
    plain: Path,
    scratch: Path,
    timeout: float,
    *,
    history: History | None = None,
    target: int | None = None,
) -> Rebuilt:
    """Rebuild generation ``target`` (default: the newest) into a new file under ``scratch``.

    Starts from the newest usable base at or below it; a missing or damaged patch ends
    the chain at the last good generation (named in ``notes``). The patches are applied
    in place and the result hashed once at the end; only if it is not what the chain
    promised is the chain rebuilt again, a patch at a time, to find the last good one.

    Raises:
        NoUsableBase: no base at or below ``target`` is whole (the reasons are named).
    """
    history = history if history is not None else await list_history(helper, folder, timeout)
    rebuilt = await _rebuild(helper, folder, plain, scratch, timeout, history, target, False)
    if not rebuilt.patched:
        return rebuilt  # the base alone, hashed as it was pulled
    actual = await anyio.to_thread.run_sync(sha256_file, rebuilt.path)
    if actual == rebuilt.sha256:
        return rebuilt
    await anyio.to_thread.run_sync(remove_quietly, rebuilt.path)
    return await _rebuild(helper, folder, plain, scratch, timeout, history, target, True)


async def _rebuild(
    helper: DriveHelper,
    folder: Path,
    plain: Path,
    scratch: Path,
    timeout: float,
    history: History,
    target: int | None,
    verify_each: bool,
) -> Rebuilt:
    goal = history.head if target is None else target
    notes: list[str] = []
    pulled_plain: tuple[Path, str] | None = None
    try:
        for number in sorted((n for n in history.bases if n <= goal), reverse=True):
            for base in history.bases[number]:
                record = await _read_record(helper, folder, base, timeout)
                if record is None:
                    notes.append(f"the record of base generation {number} is unreadable")
                    continue
                if record.where == "plain":
                    if pulled_plain is None:
                        pulled_plain = await _pull_plain(helper, plain, scratch, timeout)
                    if pulled_plain[1] != record.sha256:
                        continue  # the plain copy has moved on to a newer base since
                    (work, sha), pulled_plain = pulled_plain, None
                elif base.archived:
                    source = folder / f"{number:08d}-{base.tag}.db"
                    work = scratch_path(scratch, "rebuild", ".db")
                    sha = await _pull_to(helper, source, work, timeout)
                    if sha != record.sha256:
                        await anyio.to_thread.run_sync(remove_quietly, work)
                        notes.append(
                            f"base generation {number} is damaged on Drive ({source.name})"
                        )
                        continue
                else:
                    continue
                start = (number, base.tag, sha, record.meta)
                return await _apply_patches(
                    helper, folder, history, work, start, goal, notes, timeout, verify_each
                )
    finally:
        if pulled_plain is not None:
            await anyio.to_thread.run_sync(remove_quietly, pulled_plain[0])
    if not notes:
        notes.append("it keeps no base at or below that generation")
    raise NoUsableBase(f"{folder}: " + "; ".join(notes))


async def _pull_plain(
    helper: DriveHelper, plain: Path, scratch: Path, timeout: float
) -> tuple[Path, str]:
    """The plain copy pulled into a scratch file, and its SHA-256 ("" when it is missing)."""
    work = scratch_path(scratch, "plain", ".db")
    try:
        return work, await _pull_to(helper, plain, work, timeout)
    except DriveOSError as exc:
        if exc.errno == 2:  # ENOENT: no plain copy
            return work, ""
        raise


async def _apply_patches(
    helper: DriveHelper,
    folder: Path,
    history: History,
    work: Path,
    start: tuple[int, str, str, Mapping[str, Any]],
    goal: int,
    notes: list[str],
    timeout: float,
    verify_each: bool,
) -> Rebuilt:
    current, tag, sha, meta = start
    try:
        while current < goal:
            found = await _next_patch(helper, folder, history, current + 1, sha, timeout, notes)
            if found is None:
                notes.append(
                    f"generation {current + 1} is missing or damaged on Drive; stopped at "
                    f"generation {current}"
                )
                break
            patch_tag, patch = found
            try:
                work = await _apply_one(work, patch, sha, verify_each)
            except PatchError as exc:
                notes.append(
                    f"{current + 1:08d}-{patch_tag}.patch does not make generation "
                    f"{current + 1} ({exc}); stopped at generation {current}"
                )
                break
            current, tag, sha, meta = (
                current + 1,
                patch_tag,
                patch.header.result_sha256,
                patch.header.meta,
            )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove_quietly, work)
        raise
    return Rebuilt(work, current, tag, sha, meta, tuple(notes), current > start[0])


async def _apply_one(work: Path, patch: Patch, sha: str, verify_each: bool) -> Path:
    """Apply ``patch`` to ``work`` (holding ``sha``); the file now holding the result.

    Quick: in place, unchecked (the caller hashes the end of the chain). Checked: into a
    new file, hashed, so that a patch that does not make its result leaves ``work``
    whole and the chain can stop there.
    """
    if not verify_each:
        await anyio.to_thread.run_sync(
            functools.partial(apply_patch_in_place, work, patch, current_sha256=sha, verify=False)
        )
        return work
    out = work.with_name(work.stem + "-next.db")
    await anyio.to_thread.run_sync(remove_quietly, out)
    await anyio.to_thread.run_sync(apply_patch, work, patch, out)
    await anyio.to_thread.run_sync(os.replace, out, work)
    return work


async def _next_patch(
    helper: DriveHelper,
    folder: Path,
    history: History,
    number: int,
    parent_sha: str,
    timeout: float,
    notes: list[str],
) -> tuple[str, Patch] | None:
    for candidate in history.patches.get(number, ()):
        try:
            raw = await helper.read(folder / candidate.name, timeout, limit=_PATCH_READ)
        except DriveOSError as exc:
            notes.append(f"{candidate.name} cannot be read ({exc.strerror})")
            continue
        if raw is None:
            continue
        try:
            patch = await anyio.to_thread.run_sync(decode_patch, raw)
        except PatchError as exc:
            notes.append(f"{candidate.name} is damaged ({exc})")
            continue
        header = patch.header
        if header.parent_generation == number - 1 and header.parent_sha256 == parent_sha:
            return candidate.tag, patch
    return None


async def _pull_to(helper: DriveHelper, source: Path, target: Path, timeout: float) -> str:
    await anyio.to_thread.run_sync(_create_empty, target)
    try:
        await helper.pull(source, target, timeout)
        return await anyio.to_thread.run_sync(sha256_file, target)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove_quietly, target)
        raise


def _create_empty(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.close(fd)


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
            record = await _read_record(helper, folder, base, timeout)
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
    if doomed:
        await helper.remove([folder / name for name in doomed], timeout)
    return len(doomed)
