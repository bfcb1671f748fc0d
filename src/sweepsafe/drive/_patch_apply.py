"""Applying page patches: one patch to a copy or in place, and a whole chain of them.

Every patch is checked against the hash of the file it applies to before anything is
written, and the result against the hash the patch promises; a chain is checked link
by link before it is applied and once at its end.

Standard library only, and nothing from sweepsafe besides its sibling page modules.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Final

from sweepsafe.drive._page_diff import CHUNK_BYTES, PatchError, StrPath, sha256_file, xor_bytes

if TYPE_CHECKING:
    from sweepsafe.drive._patch_format import Patch, PatchHeader

__all__ = [
    "apply_chain",
    "apply_patch",
    "apply_patch_in_place",
]

_SHOWN_HASH_CHARS: Final = 16


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
                        page_no, record = pages[index]
                        if header.is_xor(page_no):
                            record = xor_bytes(record, bytes(patched[at : at + page_size]))
                        patched[at : at + page_size] = record
                        index += 1
                    piece = patched
                target.write(piece)
                result.update(piece)
                written += len(piece)
            offset += len(chunk)
    _check_parent(parent.hexdigest(), header, f"base {os.fspath(base)}")
    for page_no, page in pages[index:]:
        if header.is_xor(page_no):
            raise PatchError(f"patch changes page {page_no}, which its base {base} lacks")
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
        for page_no, record in patch.pages:
            file.seek((page_no - 1) * page_size)
            if header.is_xor(page_no):
                old = file.read(page_size)
                if len(old) != page_size:
                    raise PatchError(f"patch changes page {page_no}, which {os.fspath(path)} lacks")
                file.seek((page_no - 1) * page_size)
                record = xor_bytes(record, old)
            file.write(record)
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
