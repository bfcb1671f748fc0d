"""Rebuilding any generation of a database from a base and the patches after it.

A generation is rebuilt from the newest usable base at or below it plus the patches
after it, each checked against its predecessor's hash. A missing or damaged patch ends
the chain at the last good generation, and the rebuild says which. The folder's layout
is described in ``_generations``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from sweepsafe.drive._drive_errors import DriveOSError
from sweepsafe.drive._files import pull_new, remove_quietly, scratch_path
from sweepsafe.drive._generations import (
    Generation,
    History,
    list_history,
    read_header,
    read_record,
)
from sweepsafe.drive._page_diff import PatchError, sha256_file
from sweepsafe.drive._patch_apply import apply_patch, apply_patch_in_place
from sweepsafe.drive._patch_fetch import Fetched, PatchFetcher
from sweepsafe.drive._patch_format import Patch, PatchHeader, decode_patch

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper

__all__ = [
    "NoUsableBase",
    "Rebuilt",
    "rebuild",
]


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
        DriveOSError: a patch the chain needs cannot be read from Drive (an I/O error,
            not damage): the rebuild does not stop short of it.
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
    branches = await _branches_taken(helper, folder, history, goal, timeout)
    pulled_plain: tuple[Path, str] | None = None
    try:
        for number in sorted((n for n in history.bases if n <= goal), reverse=True):
            for base in history.bases[number]:
                record = await read_record(helper, folder, base, timeout)
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
                        # The plain copy may still hold this very base (same hash).
                        if pulled_plain is None:
                            pulled_plain = await _pull_plain(helper, plain, scratch, timeout)
                        if pulled_plain[1] != record.sha256:
                            notes.append(
                                f"base generation {number} is damaged on Drive ({source.name})"
                            )
                            continue
                        (work, sha), pulled_plain = pulled_plain, None
                else:
                    continue
                start = (number, base.tag, sha, record.meta)
                patches = PatchFetcher(helper, folder, history, scratch, timeout)
                return await _apply_patches(
                    patches, work, start, goal, notes, verify_each, branches
                )
        # A base is written before its record: a runtime that died (or whose Drive
        # failed) between the two left the plain copy at a generation no record names,
        # but the patch of that generation, written first, names its result.
        if pulled_plain is None:
            pulled_plain = await _pull_plain(helper, plain, scratch, timeout)
        found = await _plain_generation(helper, folder, history, goal, pulled_plain[1], timeout)
        if found is not None:
            (work, sha), pulled_plain = pulled_plain, None
            number, tag, meta = found
            patches = PatchFetcher(helper, folder, history, scratch, timeout)
            return await _apply_patches(
                patches, work, (number, tag, sha, meta), goal, notes, verify_each, branches
            )
    finally:
        if pulled_plain is not None:
            await anyio.to_thread.run_sync(remove_quietly, pulled_plain[0])
    if not notes:
        notes.append("it keeps no base at or below that generation")
    raise NoUsableBase(f"{folder}: " + "; ".join(notes))


async def _plain_generation(
    helper: DriveHelper, folder: Path, history: History, goal: int, sha: str, timeout: float
) -> tuple[int, str, Mapping[str, Any]] | None:
    """The newest generation up to ``goal`` whose patch says it makes the plain copy
    (SHA-256 ``sha``): its number, tag and meta; None if none does."""
    if not sha:
        return None
    for number in sorted((n for n in history.patches if n <= goal), reverse=True):
        for patch in history.patches[number]:
            header = await _header(helper, folder, patch, timeout)
            if header is not None and header.result_sha256 == sha:
                return number, patch.tag, header.meta
    return None


async def _pull_plain(
    helper: DriveHelper, plain: Path, scratch: Path, timeout: float
) -> tuple[Path, str]:
    """The plain copy pulled into a scratch file, and its SHA-256 ("" when it is missing)."""
    work = scratch_path(scratch, "plain", ".db")
    try:
        return work, await _pull_to(helper, plain, work, timeout)
    except DriveOSError as exc:
        if exc.errno == errno.ENOENT:  # no plain copy
            return work, ""
        raise


async def _branches_taken(
    helper: DriveHelper, folder: Path, history: History, goal: int, timeout: float
) -> dict[int, str]:
    """Where two runtimes both published a generation after the same one (a fork), the
    result of the one the later generations up to ``goal`` build on.

    Read from patch headers, from the newest fork down: the patch after a fork names its
    parent. A fork with nothing after it on the way to ``goal`` is left out (any of its
    patches will do).
    """
    forked = sorted(
        (n for n, found in history.patches.items() if len(found) > 1 and n < goal),
        reverse=True,
    )
    taken: dict[int, str] = {}
    for number in forked:
        successors = [
            header
            for patch in history.patches.get(number + 1, ())
            if (header := await _header(helper, folder, patch, timeout)) is not None
        ]
        wanted = taken.get(number + 1)
        if wanted is not None:
            successors = [h for h in successors if h.result_sha256 == wanted]
        parents = {h.parent_sha256 for h in successors if h.parent_generation == number}
        if len(parents) == 1:
            taken[number] = parents.pop()
    return taken


async def _header(
    helper: DriveHelper, folder: Path, patch: Generation, timeout: float
) -> PatchHeader | None:
    try:
        return await read_header(helper, folder, patch, timeout)
    except (DriveOSError, PatchError):
        return None  # the chain meets it again, and says what is wrong with it


async def _apply_patches(
    patches: PatchFetcher,
    work: Path,
    start: tuple[int, str, str, Mapping[str, Any]],
    goal: int,
    notes: list[str],
    verify_each: bool,
    branches: Mapping[int, str],
) -> Rebuilt:
    state = start
    stopped = False
    try:
        while not stopped and state[0] < goal:
            # The patches already read are applied in one go: a thread hop per patch
            # would cost more than applying it.
            run = await patches.run_from(state[0] + 1, goal)
            state, stopped = await anyio.to_thread.run_sync(
                _apply_run, work, run, state, notes, verify_each, branches
            )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove_quietly, work)
        raise
    current, tag, sha, meta = state
    return Rebuilt(work, current, tag, sha, meta, tuple(notes), current > start[0])


def _apply_run(
    work: Path,
    run: list[list[tuple[Generation, Fetched]]],
    state: tuple[int, str, str, Mapping[str, Any]],
    notes: list[str],
    verify_each: bool,
    branches: Mapping[int, str],
) -> tuple[tuple[int, str, str, Mapping[str, Any]], bool]:
    """Apply the patch of each generation of ``run`` in turn to ``work``; the state reached,
    and whether the chain stops there (a generation missing, damaged or not applying)."""
    for candidates in run:
        current, _tag, sha, _meta = state
        found = _choose(candidates, current + 1, sha, notes, branches.get(current + 1))
        if found is None:
            notes.append(
                f"generation {current + 1} is missing or damaged on Drive; stopped at "
                f"generation {current}"
            )
            return state, True
        patch_tag, patch = found
        try:
            _apply_one(work, patch, sha, verify_each)
        except PatchError as exc:
            notes.append(
                f"{current + 1:08d}-{patch_tag}.patch does not make generation "
                f"{current + 1} ({exc}); stopped at generation {current}"
            )
            return state, True
        header = patch.header
        state = (current + 1, patch_tag, header.result_sha256, header.meta)
    return state, False


def _apply_one(work: Path, patch: Patch, sha: str, verify_each: bool) -> None:
    """Apply ``patch`` to ``work`` (holding ``sha``).

    Quick: in place, unchecked (the caller hashes the end of the chain). Checked: into a
    new file, hashed, so that a patch that does not make its result leaves ``work``
    whole and the chain can stop there.
    """
    if not verify_each:
        apply_patch_in_place(work, patch, current_sha256=sha, verify=False)
        return
    out = work.with_name(work.stem + "-next.db")
    remove_quietly(out)
    apply_patch(work, patch, out)
    os.replace(out, work)


def _choose(
    candidates: list[tuple[Generation, Fetched]],
    number: int,
    parent_sha: str,
    notes: list[str],
    wanted: str | None = None,
) -> tuple[str, Patch] | None:
    """The patch of generation ``number`` that follows ``parent_sha``, and its tag: of two
    (a fork), the one making ``wanted``, the result later generations build on."""
    unreadable: DriveOSError | None = None
    follows: list[tuple[str, Patch]] = []
    for candidate, raw in candidates:
        if isinstance(raw, DriveOSError):
            notes.append(f"{candidate.name} cannot be read ({raw.strerror})")
            unreadable = unreadable or raw
            continue
        if raw is None:
            continue
        try:
            patch = decode_patch(raw)
        except PatchError as exc:
            notes.append(f"{candidate.name} is damaged ({exc})")
            continue
        header = patch.header
        if header.parent_generation == number - 1 and header.parent_sha256 == parent_sha:
            if wanted is None or header.result_sha256 == wanted:
                return candidate.tag, patch
            follows.append((candidate.tag, patch))
    if follows:
        return follows[0]
    if unreadable is not None:
        # Drive failed to hand the file over (often for a moment): stopping the chain
        # here would bring back an older generation and leave the newer ones behind.
        raise unreadable
    return None


async def _pull_to(helper: DriveHelper, source: Path, target: Path, timeout: float) -> str:
    await pull_new(helper, source, target, timeout)
    try:
        return await anyio.to_thread.run_sync(sha256_file, target)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove_quietly, target)
        raise
