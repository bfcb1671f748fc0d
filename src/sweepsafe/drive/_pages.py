"""Page deltas between two SQLite snapshots, and the patch files that carry them to Drive.

A snapshot taken after a trial differs from the previous one in a handful of pages, so
shipping those pages instead of the whole database keeps each backup small. This module
finds the changed pages, packs them into a versioned, compressed and checksummed patch,
and applies patches to rebuild a snapshot byte for byte.

Standard library only, and nothing from sweepsafe: the module is meant to move into a
subpackage on its own.

Patch format, version 1 (integers big-endian)::

    offset   size  content
    0        8     magic b"\\x89SSPD\\r\\n\\x1a"
    8        2     format version, u16
    10       4     header length H, u32
    14       H     header: a UTF-8 JSON object (see PatchHeader)
    14+H     8     body length B, u64
    22+H     4     CRC-32 of bytes [0, 22+H)
    26+H     B     body: one zlib stream of records, each a u32 page number (1-based)
                   followed by page_size bytes, in ascending page order
    26+H+B   32    SHA-256 of bytes [0, 26+H+B)

The CRC lets :func:`read_patch_header` trust a header without reading the body; the
SHA-256 trailer covers the whole patch and is what :func:`decode_patch` checks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import IO, Any, Final, TypeAlias

__all__ = [
    "CHUNK_BYTES",
    "FORMAT_VERSION",
    "PATCH_MAGIC",
    "DeltaTooLarge",
    "PageDelta",
    "PageSizeMismatch",
    "Patch",
    "PatchError",
    "PatchHeader",
    "apply_chain",
    "apply_patch",
    "apply_patch_in_place",
    "decode_patch",
    "diff_files",
    "encode_patch",
    "page_size_of",
    "read_patch_header",
    "sha256_file",
]

StrPath: TypeAlias = "str | os.PathLike[str]"

SQLITE_MAGIC: Final = b"SQLite format 3\x00"
SQLITE_HEADER_BYTES: Final = 100

CHUNK_BYTES: Final = 1 << 20
"""Read size for diffs and hashes: a multiple of every SQLite page size (at most 64 KiB)."""

# The first byte is not ASCII so the file is never taken for text; CR LF and ^Z catch a
# transfer that rewrote line endings or stopped at an end-of-file character.
PATCH_MAGIC: Final = b"\x89SSPD\r\n\x1a"
FORMAT_VERSION: Final = 1

_PREAMBLE = struct.Struct(">8sHI")  # magic, format version, header length
_HEADER_TAIL = struct.Struct(">QI")  # body length, CRC-32 of everything before it
_PAGE_NO = struct.Struct(">I")
_DIGEST_BYTES: Final = 32
# Real headers are a few hundred bytes; the cap stops a damaged length from asking for
# gigabytes before the CRC could reject it.
MAX_HEADER_BYTES: Final = 1 << 20
_SHOWN_HASH_CHARS: Final = 16


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

    @property
    def changed_bytes(self) -> int:
        """Bytes of page content the delta carries (before compression)."""
        return len(self.pages) * self.page_size


@dataclass(frozen=True)
class PatchHeader:
    """What a patch says about itself; read without decompressing its body."""

    format_version: int
    generation: int
    """The generation of the snapshot this patch produces."""
    parent_generation: int
    """The generation of the snapshot it applies to."""
    parent_sha256: str
    result_sha256: str
    page_size: int
    page_count: int
    """Pages in the result; the result is truncated to ``page_count * page_size`` bytes."""
    changed_pages: int
    created: float
    """When the patch was made, seconds since the epoch."""
    meta: Mapping[str, Any]
    """The caller's JSON object, read-only."""
    patch_bytes: int
    """Length of the whole patch as its header declares it."""


@dataclass(frozen=True)
class Patch:
    """A decoded, checksum-verified patch."""

    header: PatchHeader
    pages: tuple[tuple[int, bytes], ...]
    """``(page_number, content)`` in ascending order."""


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
        offset = 0
        while new_chunk := new_file.read(chunk_bytes):
            digest.update(new_chunk)
            old_chunk = old_file.read(chunk_bytes)
            # One memcmp settles the common case: nothing in this chunk changed.
            if new_chunk != old_chunk:
                for start in range(0, len(new_chunk), page_size):
                    page = new_chunk[start : start + page_size]
                    if page != old_chunk[start : start + page_size]:
                        pages.append(((offset + start) // page_size + 1, page))
                if max_changed_bytes is not None and len(pages) * page_size > max_changed_bytes:
                    raise DeltaTooLarge(
                        f"more than {max_changed_bytes} bytes of pages changed "
                        f"({len(pages)} pages by byte {offset + len(new_chunk)})"
                    )
            offset += len(new_chunk)
    if offset % page_size:
        raise PatchError(
            f"{os.fspath(new)} is {offset} bytes, not a whole number of {page_size}-byte pages"
        )
    return PageDelta(
        page_size=page_size,
        page_count=offset // page_size,
        sha256=digest.hexdigest(),
        pages=tuple(pages),
    )


def encode_patch(
    delta: PageDelta,
    *,
    generation: int,
    parent_generation: int,
    parent_sha256: str,
    created: float,
    meta: Mapping[str, Any],
    compression_level: int = 6,
) -> bytes:
    """The patch that turns the snapshot hashing to ``parent_sha256`` into ``delta``'s file.

    ``meta`` must be JSON-serialisable (``json`` raises ``TypeError`` or ``ValueError``
    otherwise); ``created`` must be finite and the generations whole numbers >= 0.
    """
    _check_sha256(parent_sha256, "parent_sha256")
    for name, value in (("generation", generation), ("parent_generation", parent_generation)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
    header = {
        "generation": generation,
        "parent_generation": parent_generation,
        "parent_sha256": parent_sha256,
        "result_sha256": delta.sha256,
        "page_size": delta.page_size,
        "page_count": delta.page_count,
        "changed_pages": len(delta.pages),
        "created": float(created),
        "meta": dict(meta),
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    header_json = text.encode("utf-8")
    if len(header_json) > MAX_HEADER_BYTES:
        raise ValueError(f"the patch header is {len(header_json)} bytes; meta is too large")
    compressor = zlib.compressobj(compression_level)
    parts: list[bytes] = []
    for page_no, page in delta.pages:
        parts.append(compressor.compress(_PAGE_NO.pack(page_no)))
        parts.append(compressor.compress(page))
    parts.append(compressor.flush())
    body = b"".join(parts)
    head = _PREAMBLE.pack(PATCH_MAGIC, FORMAT_VERSION, len(header_json)) + header_json
    head += len(body).to_bytes(8, "big")
    head += zlib.crc32(head).to_bytes(4, "big")
    digest = hashlib.sha256(head)
    digest.update(body)
    return head + body + digest.digest()


def read_patch_header(source: bytes | bytearray | memoryview | StrPath | IO[bytes]) -> PatchHeader:
    """The header of a patch given as bytes, a path or a binary file, reading only the header.

    Checks the magic, the version and the header's CRC, not the body or the trailer:
    a patch whose header reads fine can still fail :func:`decode_patch`. A file object is
    read from its current position and left just past the header.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        position = 0

        def read(size: int) -> bytes:
            nonlocal position
            piece = bytes(view[position : position + size])
            position += len(piece)
            return piece

        return _read_header(read)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            return _read_header(file.read)
    return _read_header(source.read)


def _read_header(read: Callable[[int], bytes]) -> PatchHeader:
    preamble = read(_PREAMBLE.size)
    _check_magic_and_version(preamble)
    if len(preamble) < _PREAMBLE.size:
        raise PatchError(f"patch is truncated: {len(preamble)} bytes, not even a preamble")
    _, version, header_length = _PREAMBLE.unpack(preamble)
    if header_length > MAX_HEADER_BYTES:
        raise PatchError(f"patch header length {header_length} is implausible; damaged patch")
    rest = read(header_length + _HEADER_TAIL.size)
    if len(rest) < header_length + _HEADER_TAIL.size:
        raise PatchError(
            f"patch is truncated inside its header: {_PREAMBLE.size + len(rest)} bytes of "
            f"{_PREAMBLE.size + header_length + _HEADER_TAIL.size}"
        )
    body_length, crc = _HEADER_TAIL.unpack(rest[header_length:])
    if zlib.crc32(preamble + rest[:-4]) != crc:
        raise PatchError("patch header checksum mismatch (CRC-32): the header is damaged")
    return _parse_header_json(
        rest[:header_length], version, _patch_length(header_length, body_length)
    )


def _check_magic_and_version(preamble: bytes) -> None:
    magic = preamble[: len(PATCH_MAGIC)]
    if magic != PATCH_MAGIC[: len(magic)]:
        raise PatchError(f"not a sweepsafe page patch: bad magic bytes {magic!r}")
    if len(preamble) >= len(PATCH_MAGIC) + 2:
        version = int.from_bytes(preamble[len(PATCH_MAGIC) : len(PATCH_MAGIC) + 2], "big")
        if version != FORMAT_VERSION:
            raise PatchError(
                f"unsupported patch format version {version} (this reader knows {FORMAT_VERSION})"
            )


def _parse_header_json(raw: bytes, version: int, patch_bytes: int) -> PatchHeader:
    try:
        fields = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PatchError(f"patch header is not valid JSON: {exc}") from exc
    if not isinstance(fields, dict):
        raise PatchError("patch header is not a JSON object")
    header = PatchHeader(
        format_version=version,
        generation=_int_field(fields, "generation"),
        parent_generation=_int_field(fields, "parent_generation"),
        parent_sha256=_sha_field(fields, "parent_sha256"),
        result_sha256=_sha_field(fields, "result_sha256"),
        page_size=_int_field(fields, "page_size"),
        page_count=_int_field(fields, "page_count"),
        changed_pages=_int_field(fields, "changed_pages"),
        created=_float_field(fields, "created"),
        meta=MappingProxyType(_dict_field(fields, "meta")),
        patch_bytes=patch_bytes,
    )
    if not _is_valid_page_size(header.page_size):
        raise PatchError(f"patch header has an invalid page_size ({header.page_size})")
    if not 0 <= header.changed_pages <= header.page_count:
        raise PatchError(
            f"patch header has changed_pages={header.changed_pages} "
            f"for page_count={header.page_count}"
        )
    return header


def _int_field(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name)
    # bool is an int subclass, and never a sensible count.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PatchError(f"patch header field {name!r} is missing or not a whole number")
    return value


def _float_field(fields: dict[str, Any], name: str) -> float:
    value = fields.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise PatchError(f"patch header field {name!r} is missing or not a number")
    return float(value)


def _sha_field(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not _is_sha256_hex(value):
        raise PatchError(f"patch header field {name!r} is missing or not a SHA-256 hex digest")
    return value


def _dict_field(fields: dict[str, Any], name: str) -> dict[str, Any]:
    value = fields.get(name)
    if not isinstance(value, dict):
        raise PatchError(f"patch header field {name!r} is missing or not a JSON object")
    return value


def _is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(char in "0123456789abcdef" for char in value)


def _check_sha256(value: str, name: str) -> None:
    if not _is_sha256_hex(value):
        raise ValueError(f"{name} must be a lowercase hex SHA-256 digest, not {value!r}")


def decode_patch(data: bytes | bytearray | memoryview) -> Patch:
    """Check a whole patch (magic, version, length, SHA-256, header CRC) and decode it.

    Raises :class:`PatchError` naming what is wrong.
    """
    view = memoryview(data)
    size = len(view)
    _check_magic_and_version(bytes(view[: _PREAMBLE.size]))
    lengths = _declared_lengths(view)
    declared = None if lengths is None else _patch_length(*lengths)
    if size < _PREAMBLE.size + _HEADER_TAIL.size + _DIGEST_BYTES or not _trailer_matches(view):
        # Say truncated when the length fields explain the failure; a flipped bit in a
        # length field reads the same way, hence "or damaged".
        if declared is None or declared > size:
            need = "more" if declared is None else str(declared)
            raise PatchError(
                f"patch is truncated or damaged: {size} bytes, its lengths need {need}"
            )
        if declared < size:
            raise PatchError(
                f"patch has {size - declared} unexpected bytes after its end, or is damaged"
            )
        raise PatchError("patch checksum mismatch (SHA-256 trailer): the patch is damaged")
    if declared != size:
        raise PatchError(
            f"patch lengths add up to {declared} bytes but it has {size}; malformed patch"
        )
    assert lengths is not None  # the trailer matched, so the lengths were readable
    header = read_patch_header(view)
    body_start = _PREAMBLE.size + lengths[0] + _HEADER_TAIL.size
    pages = _decode_body(view[body_start : size - _DIGEST_BYTES], header)
    return Patch(header=header, pages=pages)


def _declared_lengths(view: memoryview) -> tuple[int, int] | None:
    """``(header_length, body_length)`` as the patch's length fields say, if present."""
    if len(view) < _PREAMBLE.size:
        return None
    header_length = int.from_bytes(view[10:14], "big")
    tail_at = _PREAMBLE.size + header_length
    if header_length > MAX_HEADER_BYTES or len(view) < tail_at + 8:
        return None
    return header_length, int.from_bytes(view[tail_at : tail_at + 8], "big")


def _patch_length(header_length: int, body_length: int) -> int:
    return _PREAMBLE.size + header_length + _HEADER_TAIL.size + body_length + _DIGEST_BYTES


def _trailer_matches(view: memoryview) -> bool:
    if len(view) < _DIGEST_BYTES:
        return False
    return hashlib.sha256(view[:-_DIGEST_BYTES]).digest() == bytes(view[-_DIGEST_BYTES:])


def _decode_body(body: memoryview, header: PatchHeader) -> tuple[tuple[int, bytes], ...]:
    # Past the checksum, a bad body means the writer was wrong, not the transfer; still
    # check everything apply relies on rather than trusting it.
    record = _PAGE_NO.size + header.page_size
    expected = header.changed_pages * record
    decompressor = zlib.decompressobj()
    try:
        # max_length bounds memory by what the header promises, plus one byte to see excess.
        raw = decompressor.decompress(body, expected + 1)
    except zlib.error as exc:
        raise PatchError(f"patch body does not decompress: {exc}") from exc
    if (
        len(raw) != expected
        or not decompressor.eof
        or decompressor.unused_data
        or decompressor.unconsumed_tail
    ):
        raise PatchError(
            f"patch body holds {len(raw)} bytes of records, its header promises {expected}"
        )
    pages: list[tuple[int, bytes]] = []
    previous = 0
    for start in range(0, expected, record):
        page_no = int.from_bytes(raw[start : start + _PAGE_NO.size], "big")
        if not previous < page_no <= header.page_count:
            raise PatchError(
                f"patch body has page {page_no} after page {previous} "
                f"(pages must ascend within 1..{header.page_count})"
            )
        pages.append((page_no, raw[start + _PAGE_NO.size : start + record]))
        previous = page_no
    return tuple(pages)


def apply_patch(base: StrPath, patch: Patch, out: StrPath) -> None:
    """Write ``base`` with ``patch`` applied to the new file ``out``, in one pass over ``base``.

    Checks that ``base`` hashes to the patch's parent and that the result hashes to its
    ``result_sha256``; on any failure ``out`` is removed and :class:`PatchError` raised.
    ``out`` must not exist (so it can never be ``base``).
    """
    with open(out, "xb") as target:
        try:
            _write_patched(base, patch, target)
        except BaseException:
            target.close()
            os.remove(out)
            raise


def _write_patched(base: StrPath, patch: Patch, target: IO[bytes]) -> None:
    header = patch.header
    page_size = header.page_size
    end = header.page_count * page_size
    parent = hashlib.sha256()
    result = hashlib.sha256()
    pages = patch.pages
    index = 0
    offset = 0
    written = 0
    with open(base, "rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            parent.update(chunk)
            if offset < end:
                # Slicing bytes to their full length copies nothing.
                piece: bytes | bytearray = chunk[: end - offset]
                limit = offset + len(piece)
                if index < len(pages) and (pages[index][0] - 1) * page_size < limit:
                    # Only chunks that patched pages land in are copied to be changed.
                    patched = bytearray(piece)
                    while index < len(pages) and (pages[index][0] - 1) * page_size < limit:
                        at = (pages[index][0] - 1) * page_size - offset
                        # A page straddling the base's end extends the piece; only the
                        # last chunk can be short, so nothing follows it.
                        patched[at : at + page_size] = pages[index][1]
                        index += 1
                    piece = patched
                target.write(piece)
                result.update(piece)
                written += len(piece)
            offset += len(chunk)
    _check_parent(parent.hexdigest(), header, f"base {os.fspath(base)}")
    for page_no, page in pages[index:]:
        if (page_no - 1) * page_size != written:
            raise PatchError(
                f"patch does not define byte {written} of the result (next page is {page_no})"
            )
        target.write(page)
        result.update(page)
        written += page_size
    if written != end:
        raise PatchError(f"patch leaves the result at {written} bytes, not {end}")
    _check_result(result.hexdigest(), header, "the result")


def _check_parent(actual: str, header: PatchHeader, what: str) -> None:
    if actual != header.parent_sha256:
        raise PatchError(
            f"{what} does not match the patch's parent: its SHA-256 is "
            f"{actual[:_SHOWN_HASH_CHARS]}…, patch generation {header.generation} expects "
            f"generation {header.parent_generation} with "
            f"{header.parent_sha256[:_SHOWN_HASH_CHARS]}…"
        )


def _check_result(actual: str, header: PatchHeader, what: str) -> None:
    if actual != header.result_sha256:
        raise PatchError(
            f"{what} of patch generation {header.generation} does not match its "
            f"result_sha256: {actual[:_SHOWN_HASH_CHARS]}…, expected "
            f"{header.result_sha256[:_SHOWN_HASH_CHARS]}…"
        )


def apply_patch_in_place(
    path: StrPath,
    patch: Patch,
    *,
    current_sha256: str | None = None,
    verify: bool = True,
) -> None:
    """Apply ``patch`` to the file at ``path`` itself, for applying chains to one working copy.

    The file must hash to the patch's parent: pass ``current_sha256`` when it is already
    known (say, the previous patch's ``result_sha256``), else the file is hashed first.
    A mismatch raises :class:`PatchError` before anything is written. With ``verify``,
    the result is hashed afterwards; a mismatch then raises and the file is left damaged,
    so work on a copy. ``verify=False`` saves a full read per patch when the caller checks
    the end of the chain itself, as :func:`apply_chain` does.
    """
    header = patch.header
    actual = current_sha256 if current_sha256 is not None else sha256_file(path)
    _check_parent(actual, header, os.fspath(path))
    page_size = header.page_size
    with open(path, "r+b") as file:
        size = os.fstat(file.fileno()).st_size
        present = {page_no for page_no, _ in patch.pages}
        first_beyond = -(-size // page_size) + 1
        for page_no in range(first_beyond, header.page_count + 1):
            if page_no not in present:
                raise PatchError(
                    f"patch grows {os.fspath(path)} to {header.page_count} pages but lacks "
                    f"page {page_no}"
                )
        for page_no, page in patch.pages:
            file.seek((page_no - 1) * page_size)
            file.write(page)
        file.truncate(header.page_count * page_size)
    if verify:
        _check_result(sha256_file(path), header, f"{os.fspath(path)} (now damaged)")


def apply_chain(base: StrPath, patches: Sequence[Patch], out: StrPath) -> None:
    """Write ``base`` with every patch of ``patches`` applied, in order, to the new file ``out``.

    Checks that each patch's parent is its predecessor's result before writing anything,
    that ``base`` is the first parent, and that ``out`` ends as the last result; the
    intermediate results are not hashed, since only the end of the chain is kept. On any
    failure ``out`` is removed. With no patches, ``out`` is a plain copy of ``base``.
    """
    for before, after in itertools.pairwise(patches):
        if after.header.parent_sha256 != before.header.result_sha256:
            raise PatchError(
                f"patch generation {after.header.generation} does not follow generation "
                f"{before.header.generation}: its parent SHA-256 is "
                f"{after.header.parent_sha256[:_SHOWN_HASH_CHARS]}…, generation "
                f"{before.header.generation} makes "
                f"{before.header.result_sha256[:_SHOWN_HASH_CHARS]}…"
            )
    if not patches:
        with open(base, "rb") as source, open(out, "xb") as target:
            try:
                while chunk := source.read(CHUNK_BYTES):
                    target.write(chunk)
            except BaseException:
                target.close()
                os.remove(out)
                raise
        return
    apply_patch(base, patches[0], out)
    try:
        for patch in patches[1:]:
            # The parent hash is known from the link check above; no need to hash the file.
            apply_patch_in_place(
                out, patch, current_sha256=patch.header.parent_sha256, verify=False
            )
        if len(patches) > 1:
            _check_result(
                sha256_file(out), patches[-1].header, f"the chain's end ({os.fspath(out)})"
            )
    except BaseException:
        os.remove(out)
        raise
