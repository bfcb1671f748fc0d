"""Page deltas between two SQLite snapshots: which pages of a new snapshot changed.

A snapshot taken after a trial differs from the previous one in a handful of pages, so
shipping those pages instead of the whole database keeps each backup small. This module
reads the page size an SQLite file declares, finds the changed pages and the new file's
hash in one pass, and holds the errors shared by the page modules; ``_patch_format``
packs the pages into a patch and ``_patch_apply`` applies patches to rebuild a snapshot
byte for byte.

Standard library only, and nothing from sweepsafe besides those two sibling modules:
the three are meant to move into a subpackage together.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "CHUNK_BYTES",
    "DeltaTooLarge",
    "PageDelta",
    "PageSizeMismatch",
    "PatchError",
    "diff_files",
    "page_size_of",
    "sha256_file",
    "xor_bytes",
]

StrPath: TypeAlias = "str | os.PathLike[str]"

SQLITE_MAGIC: Final = b"SQLite format 3\x00"
SQLITE_HEADER_BYTES: Final = 100

CHUNK_BYTES: Final = 1 << 20
"""Read size for diffs and hashes: a multiple of every SQLite page size (at most 64 KiB)."""


class PatchError(Exception):
    """A patch or a database file cannot be used: damaged, mismatched or not what it claims."""


class PageSizeMismatch(PatchError):
    """The two databases use different page sizes; ship a full copy instead of a patch."""

    def __init__(self, old_page_size: int, new_page_size: int) -> None:
        super().__init__(
            f"page size changed from {old_page_size} to {new_page_size} bytes; "
            "a page delta cannot express that, ship the whole database"
        )
        self.old_page_size = old_page_size
        self.new_page_size = new_page_size


class DeltaTooLarge(PatchError):
    """More pages changed than the caller's limit; a full copy is the better choice."""


@dataclass(frozen=True)
class PageDelta:
    """The pages of a new snapshot that differ from the old one, and the new file's hash."""

    page_size: int
    page_count: int
    """Pages in the new file: its size is ``page_count * page_size``."""
    sha256: str
    """SHA-256 of the whole new file, hex."""
    pages: tuple[tuple[int, bytes], ...]
    """``(page_number, content)`` in ascending order; page numbers start at 1, as SQLite's."""
    parent_page_count: int | None = None
    """Pages in the old file, when ``parent_pages`` are known."""
    parent_pages: tuple[bytes, ...] = ()
    """The old content of each changed page the old file has (those numbered up to
    ``parent_page_count``), in the order of ``pages``: a patch ships the changed bytes
    of such a page (its XOR with the old one), which compress to almost nothing."""

    @property
    def changed_bytes(self) -> int:
        """Bytes of page content the delta carries (before compression)."""
        return len(self.pages) * self.page_size


def sha256_file(path: StrPath) -> str:
    """SHA-256 of a file's content, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def page_size_of(path: StrPath) -> int:
    """The page size an SQLite database file declares in its header.

    Raises :class:`PatchError` when the file does not start with a sound SQLite header.
    """
    with open(path, "rb") as file:
        return _page_size_from_header(file.read(SQLITE_HEADER_BYTES), path)


def _page_size_from_header(head: bytes, path: StrPath) -> int:
    if len(head) < SQLITE_HEADER_BYTES or not head.startswith(SQLITE_MAGIC):
        raise PatchError(f"{os.fspath(path)} is not an SQLite database (no SQLite header)")
    raw = int.from_bytes(head[16:18], "big")
    # 65536 does not fit in the u16 field; SQLite stores it as 1.
    page_size = 65536 if raw == 1 else raw
    if not _is_valid_page_size(page_size):
        raise PatchError(f"{os.fspath(path)} declares an invalid SQLite page size ({raw})")
    return page_size


def _is_valid_page_size(page_size: int) -> bool:
    return 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0


def diff_files(
    old: StrPath,
    new: StrPath,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    max_changed_bytes: int | None = None,
) -> PageDelta:
    """The pages of ``new`` that differ from ``old``, and the SHA-256 of ``new``, in one pass.

    Pages past the end of ``old`` count as changed; pages of ``old`` past the end of
    ``new`` are dropped by truncation when the patch is applied. Memory stays at two
    chunks plus the changed pages; ``max_changed_bytes`` bounds the latter by raising
    :class:`DeltaTooLarge` after the first chunk that exceeds it. Raises :class:`PageSizeMismatch`
    when the page sizes differ and :class:`PatchError` when either file is not an SQLite
    database or ``new`` is not a whole number of pages. ``chunk_bytes`` must be a
    multiple of the page size.
    """
    with open(old, "rb") as old_file, open(new, "rb") as new_file:
        old_page_size = _page_size_from_header(old_file.read(SQLITE_HEADER_BYTES), old)
        page_size = _page_size_from_header(new_file.read(SQLITE_HEADER_BYTES), new)
        if old_page_size != page_size:
            raise PageSizeMismatch(old_page_size, page_size)
        if chunk_bytes <= 0 or chunk_bytes % page_size:
            raise ValueError(f"chunk_bytes={chunk_bytes} is not a multiple of {page_size}")
        old_file.seek(0)
        new_file.seek(0)
        digest = hashlib.sha256()
        pages: list[tuple[int, bytes]] = []
        parent_pages: list[bytes] = []
        offset = 0
        while new_chunk := new_file.read(chunk_bytes):
            digest.update(new_chunk)
            old_chunk = old_file.read(chunk_bytes)
            # One memcmp settles the common case: nothing in this chunk changed.
            if new_chunk != old_chunk:
                for start in range(0, len(new_chunk), page_size):
                    page = new_chunk[start : start + page_size]
                    before = old_chunk[start : start + page_size]
                    if page != before:
                        pages.append(((offset + start) // page_size + 1, page))
                        if len(before) == page_size:
                            parent_pages.append(before)
                if max_changed_bytes is not None and len(pages) * page_size > max_changed_bytes:
                    raise DeltaTooLarge(
                        f"more than {max_changed_bytes} bytes of pages changed "
                        f"({len(pages)} pages by byte {offset + len(new_chunk)})"
                    )
            offset += len(new_chunk)
        old_size = os.fstat(old_file.fileno()).st_size
    if offset % page_size:
        raise PatchError(
            f"{os.fspath(new)} is {offset} bytes, not a whole number of {page_size}-byte pages"
        )
    return PageDelta(
        page_size=page_size,
        page_count=offset // page_size,
        sha256=digest.hexdigest(),
        pages=tuple(pages),
        parent_page_count=old_size // page_size,
        parent_pages=tuple(parent_pages),
    )


def xor_bytes(first: bytes, second: bytes) -> bytes:
    """The byte-wise XOR of two pages of the same length."""
    size = len(first)
    return (int.from_bytes(first, "little") ^ int.from_bytes(second, "little")).to_bytes(
        size, "little"
    )
