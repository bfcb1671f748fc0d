"""A database's generations on Drive: where they live, what they are named, what they say.

Every published snapshot of a database is a *generation*, numbered from 1. In the study
folder's ``.sweepsafe/history/<database>/`` on Drive:

- ``00000042-<tag>.patch``: generation 42 as the pages that changed since generation 41,
  compressed and checksummed (see ``_patch_format``); ``<tag>`` names the runtime that
  wrote it.
- ``00000040-<tag>.json``: a *base*: generation 40 is stored whole, in the plain
  ``study.db`` beside the study (``"where": "plain"``, until the next base replaces it)
  or archived as ``00000040-<tag>.db``, a plain SQLite file (``"where": "archive"``).
  It names the SHA-256 of that content; the content is written before its record.

Every generation, bases included, also has its patch, so the chain of patches is
unbroken from the oldest kept base to the newest generation (see ``_rebuild``).
This module names the folder, parses its listing, and reads and writes base records
and the details ``history`` shows; ``_retention`` thins the folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sweepsafe.drive._page_diff import PatchError
from sweepsafe.drive._patch_format import PatchHeader, decode_patch, read_patch_header
from sweepsafe.drive._reserved_names import STATE_DIR_NAME

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper, DriveListing

__all__ = [
    "BaseRecord",
    "Generation",
    "GenerationDetails",
    "History",
    "database_of",
    "history_dir",
    "history_root",
    "length_problem",
    "list_history",
    "parse_history",
    "read_details",
    "read_header",
    "read_record",
    "write_base_record",
]

_NAME = re.compile(r"^(\d{8})-([0-9a-f]{1,32})\.(patch|json|db)$")
_HEADER_READ = 64 << 10
_FORMAT = 1


def history_root(unit_drive: Path) -> Path:
    """The folder of a study on Drive that holds one history folder per database."""
    return unit_drive / STATE_DIR_NAME / "history"


def history_dir(unit_drive: Path, database_rel: str) -> Path:
    """Where the generations of the database ``database_rel`` (in the study folder) live."""
    return history_root(unit_drive) / database_rel.replace("%", "%25").replace("/", "%2F")


def database_of(history_name: str) -> str:
    """The database (relative to its study folder) whose history folder is ``history_name``."""
    return history_name.replace("%2F", "/").replace("%25", "%")


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


async def read_record(
    helper: DriveHelper, folder: Path, base: Generation, timeout: float
) -> BaseRecord | None:
    """The record of ``base``; None when it is gone, unreadable as a record, or the record
    of another generation (a file copied or renamed by hand)."""
    raw = await helper.read(folder / base.name, timeout, limit=_HEADER_READ)
    record = BaseRecord.from_json(raw) if raw is not None else None
    return record if record is not None and record.generation == base.number else None


async def read_header(
    helper: DriveHelper, folder: Path, patch: Generation, timeout: float
) -> PatchHeader:
    """The header of ``patch``, read without its body.

    Raises:
        PatchError: it is gone, or damaged.
    """
    raw = await helper.read(folder / patch.name, timeout, limit=_HEADER_READ, head=True)
    return read_patch_header(raw or b"")


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
    """Every generation's time and metadata, newest first, from headers and records only.

    ``problem`` says why a generation cannot be restored: its own file is damaged, or a
    generation below it on the way from the nearest base is missing or damaged. A patch
    small enough to come whole with its header is checked whole; a larger one by its
    header and its length.
    """
    details: list[GenerationDetails] = []
    for number in sorted({*history.patches, *history.bases}, reverse=True):
        for base in history.bases.get(number, ()):
            record = await read_record(helper, folder, base, timeout)
            if record is None:
                details.append(
                    GenerationDetails(number, base.tag, "base", None, {}, 0, "unreadable record")
                )
            else:
                problem = (
                    "its archived copy is missing"
                    if record.where == "archive" and not base.archived
                    else None
                )
                details.append(
                    GenerationDetails(
                        number, base.tag, "base", record.created, record.meta, record.size, problem
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
                    number,
                    patch.tag,
                    "patch",
                    header.created,
                    header.meta,
                    patch.size,
                    _whole_patch_problem(raw, patch) or length_problem(header, patch),
                )
            )
    return _name_broken_chains(details)


def _whole_patch_problem(raw: bytes | None, patch: Generation) -> str | None:
    """What is wrong with a patch read whole with its header (a small one), or None."""
    if raw is None or len(raw) != patch.size:
        return None  # only its header was read
    try:
        decode_patch(raw)
    except PatchError as exc:
        return str(exc)
    return None


def length_problem(header: PatchHeader, patch: Generation) -> str | None:
    """A patch whose file is not as long as its header says: cut short, or grown."""
    if header.patch_bytes == patch.size:
        return None
    return (
        f"patch is truncated or damaged: {patch.size} bytes, its header says {header.patch_bytes}"
    )


def _name_broken_chains(details: list[GenerationDetails]) -> list[GenerationDetails]:
    """``details`` with a problem named for each generation no chain of patches reaches."""
    numbers = sorted({d.number for d in details})
    reached: set[int] = set()
    cause: dict[int, int] = {}
    for number in numbers:
        here = [d for d in details if d.number == number and d.problem is None]
        if any(d.kind == "base" for d in here) or (
            number - 1 in reached and any(d.kind == "patch" for d in here)
        ):
            reached.add(number)
        elif number - 1 in cause:
            cause[number] = cause[number - 1]
        elif number - 1 in reached or number == numbers[0]:
            cause[number] = number
        else:
            cause[number] = number - 1
    marked: list[GenerationDetails] = []
    for detail in details:
        if detail.problem is None and detail.number not in reached:
            broken = cause[detail.number]
            why = (
                f"cannot be rebuilt: generation {broken} is missing or damaged on Drive"
                if broken != detail.number
                else "cannot be rebuilt: Drive keeps no base below it"
            )
            detail = replace(detail, problem=why)
        marked.append(detail)
    return marked
