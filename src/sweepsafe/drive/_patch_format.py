"""The patch file that carries a page delta to Drive: encoding, header and decoding.

A patch is a :class:`~sweepsafe.drive._page_diff.PageDelta` packed into a versioned,
compressed and checksummed file, with a header that says which generation it makes and
from what. ``_patch_apply`` applies decoded patches.

Standard library only, and nothing from sweepsafe besides its sibling page modules.

Patch format, version 2 (integers big-endian)::

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

In version 2 the header also holds ``parent_page_count``, and the record of a page the
parent has (numbered up to it) carries the XOR of its new and old content: a trial
changes a few rows of a page, so that XOR is mostly zeros and compresses to a few
dozen bytes where the page itself takes a kilobyte or more. Pages past the parent's end
are carried whole. Version 1 (no ``parent_page_count``, every page whole) is still read.

The CRC lets :func:`read_patch_header` trust a header without reading the body; the
SHA-256 trailer covers the whole patch and is what :func:`decode_patch` checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import IO, Any, Final

from sweepsafe.drive._page_diff import (
    PageDelta,
    PatchError,
    StrPath,
    _is_valid_page_size,
    xor_bytes,
)

__all__ = [
    "FORMAT_VERSION",
    "PATCH_MAGIC",
    "Patch",
    "PatchHeader",
    "decode_patch",
    "encode_patch",
    "read_patch_header",
]

# The first byte is not ASCII so the file is never taken for text; CR LF and ^Z catch a
# transfer that rewrote line endings or stopped at an end-of-file character.
PATCH_MAGIC: Final = b"\x89SSPD\r\n\x1a"
FORMAT_VERSION: Final = 2
_READABLE_VERSIONS: Final = (1, 2)

_PREAMBLE = struct.Struct(">8sHI")  # magic, format version, header length
_HEADER_TAIL = struct.Struct(">QI")  # body length, CRC-32 of everything before it
_PAGE_NO = struct.Struct(">I")
_DIGEST_BYTES: Final = 32
# Real headers are a few hundred bytes; the cap stops a damaged length from asking for
# gigabytes before the CRC could reject it.
MAX_HEADER_BYTES: Final = 1 << 20


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
    parent_page_count: int | None = None
    """Version 2: pages in the parent; records of pages up to it are XORs with the
    parent's page. None in version 1, whose records are whole pages."""

    def is_xor(self, page_no: int) -> bool:
        """Whether the record of ``page_no`` is the XOR of the new and the parent's page."""
        return self.parent_page_count is not None and page_no <= self.parent_page_count


@dataclass(frozen=True)
class Patch:
    """A decoded, checksum-verified patch."""

    header: PatchHeader
    pages: tuple[tuple[int, bytes], ...]
    """``(page_number, record)`` in ascending order: the page's new content, or its XOR
    with the parent's page where ``header.is_xor(page_number)``."""


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
    parent_count = delta.parent_page_count
    records = list(delta.pages)
    if parent_count is not None:
        known = [index for index, (page_no, _) in enumerate(records) if page_no <= parent_count]
        if len(known) != len(delta.parent_pages):
            raise ValueError(
                f"the delta has {len(delta.parent_pages)} parent pages for {len(known)} "
                "changed pages of the parent"
            )
        for index, old in zip(known, delta.parent_pages, strict=True):
            page_no, page = records[index]
            records[index] = (page_no, xor_bytes(page, old))
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
    if parent_count is not None:
        header["parent_page_count"] = parent_count
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    header_json = text.encode("utf-8")
    if len(header_json) > MAX_HEADER_BYTES:
        raise ValueError(f"the patch header is {len(header_json)} bytes; meta is too large")
    compressor = zlib.compressobj(compression_level)
    parts: list[bytes] = []
    for page_no, page in records:
        parts.append(compressor.compress(_PAGE_NO.pack(page_no)))
        parts.append(compressor.compress(page))
    parts.append(compressor.flush())
    body = b"".join(parts)
    version = FORMAT_VERSION if parent_count is not None else 1
    head = _PREAMBLE.pack(PATCH_MAGIC, version, len(header_json)) + header_json
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
        if version not in _READABLE_VERSIONS:
            raise PatchError(
                f"unsupported patch format version {version} (this reader knows versions "
                f"{_READABLE_VERSIONS[0]} to {_READABLE_VERSIONS[-1]})"
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
        parent_page_count=_int_field(fields, "parent_page_count") if version >= 2 else None,
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
