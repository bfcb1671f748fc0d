"""Reading Drive copies without changing them: verify a database, list its generations.

Both run through a helper with a deadline, like every Drive-side call, so a stalled
mount makes them fail in time instead of hanging the command that asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from sweepsafe.drive._drive_errors import DriveOSError, DriveTimeout
from sweepsafe.drive._generations import (
    Generation,
    History,
    history_dir,
    length_problem,
    list_history,
    read_details,
    read_header,
    read_record,
)
from sweepsafe.drive._helper_client import HelperPool
from sweepsafe.drive._helper_wire import SMALL_READ_LIMIT
from sweepsafe.drive._messages import explain_failure
from sweepsafe.drive._page_diff import PatchError
from sweepsafe.drive._patch_fetch import PatchFetcher
from sweepsafe.drive._patch_format import decode_patch
from sweepsafe.drive._reserved_names import STATE_DIR_NAME
from sweepsafe.drive._results import GenerationInfo, StudySummary, VerifyResult

if TYPE_CHECKING:
    from sweepsafe.drive._drive_helper import DriveHelper

__all__ = [
    "check_database",
    "folder_entries",
    "generations_of",
    "path_kind",
    "studies_of",
    "verify_database",
]

_ANCESTORS = 4


def studies_of(info: Mapping[str, Any]) -> tuple[StudySummary, ...]:
    """The studies an ``inspect`` reply describes."""
    return tuple(
        StudySummary(
            name=str(study["name"]),
            directions=tuple(study["directions"]),
            trial_counts=MappingProxyType(dict(study["trial_counts"])),
            best_value=study["best"],
        )
        for study in info.get("studies", ())
    )


async def find_history(helper: DriveHelper, database: Path, timeout: float) -> Path | None:
    """The history folder of a database on Drive, looking in its study folder and above
    (in an object store, never above its root: nothing there belongs to it)."""
    top = Path(helper.place_root) if helper.place_root is not None else None
    folder = database.parent
    for _ in range(_ANCESTORS):
        rel = database.relative_to(folder).as_posix()
        candidate = history_dir(folder, rel)
        info = await helper.stat(candidate, timeout)
        if info["exists"]:
            return candidate
        if (
            (await helper.stat(folder / STATE_DIR_NAME, timeout))["exists"]
            or folder.parent == folder
            or folder == top
        ):
            return None  # the study folder: it keeps no history of this database
        folder = folder.parent
    return None


async def verify_database(pool: HelperPool, remote: Path, timeout: float) -> VerifyResult:
    """Check a Drive file: existence, integrity, studies, generations and missing files."""
    try:
        async with pool.session() as helper:
            info = await helper.inspect(remote, timeout, sha256=True)
            if not info["exists"]:
                return VerifyResult(path=remote, exists=False)
            if info["kind"] != "file":
                return VerifyResult(
                    path=remote,
                    exists=True,
                    mtime=info.get("mtime"),
                    error=f"{remote} is a folder, not a file",
                )
            if not info.get("is_sqlite"):
                return VerifyResult(
                    path=remote, exists=True, size=info.get("size"), mtime=info.get("mtime")
                )
            history_folder = await find_history(helper, remote, timeout)
            generations = (
                await _generations(helper, history_folder, str(info.get("sha256")), timeout)
                if history_folder is not None
                else None
            )
    except (OSError, DriveTimeout) as exc:
        message, _ = explain_failure(exc, remote, "checking", remote)
        return VerifyResult(path=remote, exists=False, error=message)
    problem = info.get("integrity_problem")
    error: str | None = None
    plain, newest, missing, broken, newest_finished = generations or (None, None, {}, None, None)
    if problem:
        error = f"{remote} failed its integrity check ({problem}); "
        if newest is not None and broken is None:
            # A restore rebuilds the newest generation from the history, not this copy.
            error += (
                "do not open or copy it by hand: a restore rebuilds generation "
                f"{newest} from Drive's history, and the next end-of-sweep backup rewrites it"
            )
        else:
            error += "do not restore from it"
    if error is None and generations is not None and plain != newest and plain is None:
        error = (
            f"{remote} is not a generation Drive's history knows; the newest generation "
            f"is {newest}, which a restore rebuilds"
        )
    if error is None and broken is not None:
        error = (
            f"the newest generation of {remote} on Drive ({newest}) cannot be rebuilt: "
            f"{broken}; a restore brings nothing back without --generation (see "
            "`sweepsafe history`)"
        )
    if error is None and missing:
        trials = ", ".join(str(n) for n in sorted(missing)[:5])
        error = f"finished trials {trials} of {remote} lack files on Drive"
    return VerifyResult(
        path=remote,
        exists=True,
        size=info.get("size"),
        mtime=info.get("mtime"),
        is_sqlite=True,
        integrity_ok=not problem,
        studies=studies_of(info),
        generation=plain,
        newest_generation=newest,
        newest_finished_trials=newest_finished,
        missing_files=MappingProxyType(missing),
        error=error,
    )


async def _generations(
    helper: DriveHelper, folder: Path, plain_sha: str, timeout: float
) -> tuple[int | None, int | None, dict[int, tuple[str, ...]], str | None, int | None]:
    """(generation the plain copy holds, newest generation, missing files by the newest,
    why the newest cannot be rebuilt or None, finished trials of the newest)."""
    history = await list_history(helper, folder, timeout)
    if history.empty:
        return None, None, {}, None, None
    plain: int | None = None
    for number in sorted(history.bases, reverse=True):
        for base in history.bases[number]:
            record = await read_record(helper, folder, base, timeout)
            if record is not None and record.sha256 == plain_sha:
                plain = number
                break
        if plain is not None:
            break
    meta = await _newest_meta(helper, folder, history, timeout)
    missing = {
        int(number): tuple(str(f) for f in files)
        for number, files in (meta.get("missing_files") or {}).items()
    }
    broken = await _newest_unreachable(helper, folder, history, timeout)
    finished = meta.get("finished")
    return plain, history.head, missing, broken, int(finished) if finished is not None else None


async def _newest_unreachable(
    helper: DriveHelper, folder: Path, history: History, timeout: float
) -> str | None:
    """Why the newest generation cannot be rebuilt, or None: every patch from the nearest
    base up is read, as a restore would (see :func:`_patch_problems`)."""
    head = history.head
    if head in history.bases:
        return None
    below = [n for n in history.bases if n < head]
    if not below:
        return "Drive keeps no base below it"
    first = max(below) + 1
    gaps = [n for n in range(first, head + 1) if n not in history.patches]
    if gaps:
        return f"generation {gaps[0]} is missing on Drive"
    chain = [patch for number in range(first, head + 1) for patch in history.patches[number]]
    problems = await _patch_problems(helper, folder, history, chain, timeout)
    # The lowest generation with no sound patch is where the chain breaks.
    for number in range(first, head + 1):
        here = history.patches[number]
        if all(problems[patch.name] is not None for patch in here):
            damage = "; ".join(f"{patch.name}: {problems[patch.name]}" for patch in here)
            return f"generation {number} is damaged on Drive ({damage})"
    return None


async def _patch_problems(
    helper: DriveHelper,
    folder: Path,
    history: History,
    patches: Sequence[Generation],
    timeout: float,
) -> dict[str, str | None]:
    """Per patch: what is wrong with it, or None.

    A patch up to what one read returns is read whole and its checksums checked; such
    patches come many to a request, fetched as a restore fetches them. A larger one is
    checked by its header and its length, not pulled whole.
    """
    fetcher = PatchFetcher(helper, folder, history, None, timeout)
    problems: dict[str, str | None] = {}
    for patch in patches:
        if patch.size <= SMALL_READ_LIMIT:
            problems[patch.name] = _whole_problem(await fetcher.fetch(patch), patch)
            continue
        try:
            header = await read_header(helper, folder, patch, timeout)
        except PatchError as exc:
            problems[patch.name] = str(exc)
            continue
        problems[patch.name] = length_problem(header, patch)
    return problems


def _whole_problem(raw: bytes | DriveOSError | None, patch: Generation) -> str | None:
    if raw is None:
        return "gone since the listing"
    if isinstance(raw, DriveOSError):
        return f"unreadable ({raw.strerror or raw})"
    try:
        decoded = decode_patch(raw)
    except PatchError as exc:
        return str(exc)
    if decoded.header.generation != patch.number:
        return f"it holds generation {decoded.header.generation}"
    return None


async def _newest_meta(
    helper: DriveHelper, folder: Path, history: History, timeout: float
) -> Mapping[str, Any]:
    head = history.head
    for patch in history.patches.get(head, ()):
        try:
            return (await read_header(helper, folder, patch, timeout)).meta
        except PatchError:
            continue
    for base in history.bases.get(head, ()):
        record = await read_record(helper, folder, base, timeout)
        if record is not None:
            return record.meta
    return {}


async def generations_of(pool: HelperPool, remote: Path, timeout: float) -> list[GenerationInfo]:
    """Every generation of the database ``remote`` kept on Drive, newest first."""
    async with pool.session() as helper:
        folder = await find_history(helper, remote, timeout)
        if folder is None:
            return []
        history = await list_history(helper, folder, timeout)
        details = await read_details(helper, folder, history, timeout)
    infos: list[GenerationInfo] = []
    for detail in details:
        studies = detail.meta.get("studies") or []
        best = studies[0].get("best") if len(studies) == 1 else None
        finished = detail.meta.get("finished")
        infos.append(
            GenerationInfo(
                number=detail.number,
                kind=detail.kind,
                created=detail.created,
                finished_trials=int(finished) if finished is not None else None,
                best_value=float(best) if best is not None else None,
                size=detail.size,
                runtime=detail.tag,
                problem=detail.problem,
            )
        )
    return infos


async def check_database(
    path: Path, *, timeout: float = 60.0, helper_command: Sequence[str] | None = None
) -> VerifyResult:
    """Check one database where it lies (local or on Drive), read-only, within ``timeout``.

    The reading happens in a helper process abandoned at the deadline, so a database on
    a stalled mount gives an error instead of a hang.
    """
    pool = HelperPool(helper_command)
    try:
        return await verify_database(pool, path, timeout)
    finally:
        pool.close()


async def path_kind(
    path: Path, *, timeout: float, helper_command: Sequence[str] | None = None
) -> str:
    """``"dir"``, ``"file"``, ``"other"`` or ``"missing"``: what ``path`` is, asked of a
    helper so that a stalled mount answers within ``timeout`` (else DriveTimeout)."""
    pool = HelperPool(helper_command)
    try:
        async with pool.session() as helper:
            info = await helper.stat(path, timeout)
    finally:
        pool.close()
    return str(info["kind"]) if info["exists"] else "missing"


async def folder_entries(
    path: Path, *, timeout: float, helper_command: Sequence[str] | None = None
) -> list[tuple[str, str]] | None:
    """(name, kind) of each entry of a folder, asked of a helper with a deadline; None
    when there is no such folder."""
    pool = HelperPool(helper_command)
    try:
        async with pool.session() as helper:
            listing = await helper.listdir(path, timeout)
    finally:
        pool.close()
    if not listing.exists:
        return None
    return sorted((entry.name, entry.kind) for entry in listing.entries)
