"""The frame format of the pipe between the store and a Drive helper process.

Each message is a frame ``>II`` (header length, payload length), a JSON header and raw
payload bytes. The store sends one request and reads one reply. A reply header has
``"ok": true`` and the result fields, or ``"ok": false`` with ``errno``, ``error`` and
``path``.

Standard library only: the helper process, run by file path, imports this module from
its own folder.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

__all__ = ["FRAME_PREFIX", "SMALL_READ_LIMIT", "Header", "encode_frame"]

FRAME_PREFIX = struct.Struct(">II")

SMALL_READ_LIMIT = 4 << 20
"""The most a ``read`` or ``read_many`` request returns per file; larger files are pulled."""

Header = dict[str, Any]


def encode_frame(header: Header, payload: bytes = b"") -> bytes:
    """One protocol frame: length prefix, JSON header, payload."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    return FRAME_PREFIX.pack(len(raw), len(payload)) + raw + payload


def _read_exactly(fd: int, count: int) -> bytes | None:
    parts: list[bytes] = []
    remaining = count
    while remaining:
        part = os.read(fd, remaining)
        if not part:
            return None
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)
