"""Page deltas: patches rebuild real Optuna snapshots byte for byte, and damage is named."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import os
import re
import shutil
import sqlite3
import tempfile
import zlib
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from sweepsafe.drive._page_diff import (
    CHUNK_BYTES,
    DeltaTooLarge,
    PageSizeMismatch,
    PatchError,
    diff_files,
    page_size_of,
    sha256_file,
    xor_bytes,
)
from sweepsafe.drive._patch_apply import apply_chain, apply_patch, apply_patch_in_place
from sweepsafe.drive._patch_format import (
    FORMAT_VERSION,
    PATCH_MAGIC,
    Patch,
    decode_patch,
    encode_patch,
    read_patch_header,
)
from sweepsafe.drive._sqlite import read_content, read_content_since, snapshot_sqlite

optuna.logging.set_verbosity(optuna.logging.WARNING)

STATES = ("COMPLETE", "FAIL", "PRUNED")


# --- Optuna writes, driven by Hypothesis -------------------------------------------------


@pytest.fixture(scope="module")
def empty_studies(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Optuna's empty schema, per page size; creating it costs a second, copying it nothing."""
    folder = tmp_path_factory.mktemp("templates")
    default = folder / "4096.db"
    optuna.storages.RDBStorage(f"sqlite:///{default}").engine.dispose()
    small = folder / "1024.db"
    shutil.copyfile(default, small)
    connection = sqlite3.connect(small)
    try:
        connection.execute("PRAGMA page_size=1024")
        connection.execute("VACUUM")
    finally:
        connection.close()
    assert page_size_of(default) == 4096
    assert page_size_of(small) == 1024
    return {4096: default, 1024: small}


def _no_fsync(connection: Any, _record: Any) -> None:
    # Only durability changes, not a byte of the file; it keeps the examples quick.
    connection.execute("PRAGMA synchronous=OFF")


class OptunaWriter:
    """Plays a list of Optuna writes against one database, as sweeps and users make them."""

    def __init__(self, database: Path, *, wal: bool) -> None:
        self.database = database
        if wal:
            connection = sqlite3.connect(database)
            try:
                connection.execute("PRAGMA journal_mode=WAL").fetchall()
            finally:
                connection.close()
        self.storage = optuna.storages.RDBStorage(f"sqlite:///{database}")
        sqlalchemy.event.listen(self.storage.engine, "connect", _no_fsync)
        self.storage.engine.dispose()
        self.studies: list[optuna.Study] = []
        self.running: list[tuple[optuna.Study, optuna.Trial, list[int]]] = []
        self.made = 0
        self.new_study()

    def close(self) -> None:
        self.storage.remove_session()
        self.storage.engine.dispose()

    def new_study(self) -> optuna.Study:
        self.made += 1
        study = optuna.create_study(
            storage=self.storage,
            study_name=f"study-{self.made}",
            sampler=optuna.samplers.RandomSampler(seed=self.made),
            direction="maximize" if self.made % 2 == 0 else "minimize",
        )
        self.studies.append(study)
        return study

    def study(self, index: int) -> optuna.Study:
        return self.studies[index % len(self.studies)] if self.studies else self.new_study()

    def play(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "ask_tell":
            _, index, state, value = op
            study = self.study(index)
            trial = study.ask()
            trial.suggest_float("lr", 1e-5, 1e-1, log=True)
            trial.suggest_int("layers", 1, 8)
            trial.suggest_categorical("optimizer", ["adam", "sgd", "rmsprop"])
            self._finish(study, trial, state, value)
        elif kind == "add_trial":
            _, index, params, value = op
            state = TrialState.COMPLETE if value is not None else TrialState.FAIL
            self.study(index).add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions={name: FloatDistribution(-1e3, 1e3) for name in params},
                    value=value,
                    state=state,
                )
            )
        elif kind == "add_trials":
            _, index, count = op
            self.study(index).add_trials(
                [
                    optuna.trial.create_trial(
                        params={"x": float(number)},
                        distributions={"x": FloatDistribution(-1e3, 1e3)},
                        value=float(number),
                        user_attrs={"run": f"run-{number}"},
                    )
                    for number in range(count)
                ]
            )
        elif kind == "ask":
            study = self.study(op[1])
            trial = study.ask()
            trial.suggest_float("x", -5.0, 5.0)
            self.running.append((study, trial, []))
        elif kind == "finish" and self.running:
            study, trial, _ = self.running.pop(0)
            self._finish(study, trial, op[1], op[2])
        elif kind == "report" and self.running:
            _, trial, steps = self.running[-1]
            # Reporting a step twice only warns; each trial reports increasing steps.
            steps.append(len(steps))
            trial.report(op[1], steps[-1])
        elif kind == "user_attr":
            _, key, text, repeat = op
            value = text + "x" * repeat  # long values spill into overflow pages
            if self.running:
                self.running[0][1].set_user_attr(key, value)
            else:
                self.study(0).set_user_attr(key, value)
        elif kind == "new_study":
            self.new_study()
        elif kind == "delete_study" and self.studies:
            _, index, vacuum = op
            study = self.studies.pop(index % len(self.studies))
            self.running = [entry for entry in self.running if entry[0] is not study]
            optuna.delete_study(study_name=study.study_name, storage=self.storage)
            if vacuum:
                self.vacuum()  # gives the freed pages back: the file shrinks
        elif kind == "vacuum":
            self.vacuum()

    def vacuum(self) -> None:
        connection = sqlite3.connect(self.database, timeout=30)
        try:
            connection.execute("VACUUM")
        finally:
            connection.close()

    @staticmethod
    def _finish(study: optuna.Study, trial: optuna.Trial, state: str, value: float) -> None:
        if state == "COMPLETE":
            study.tell(trial, value)
        else:
            study.tell(trial, state=TrialState[state])


_values = st.floats(-1e6, 1e6, allow_nan=False)
_indexes = st.integers(0, 3)
_names = st.sampled_from(["a", "b", "c", "d", "e"])
_ops = st.one_of(
    st.tuples(st.just("ask_tell"), _indexes, st.sampled_from(STATES), _values),
    st.tuples(
        st.just("add_trial"),
        _indexes,
        st.dictionaries(_names, st.floats(-1e3, 1e3), min_size=1),
        st.none() | _values,
    ),
    # Many trials at once, as when a study is imported: the file grows by many pages.
    st.tuples(st.just("add_trials"), _indexes, st.integers(3, 12)),
    st.tuples(st.just("ask"), _indexes),
    st.tuples(st.just("finish"), st.sampled_from(STATES), _values),
    st.tuples(st.just("report"), _values),
    st.tuples(
        st.just("user_attr"), _names, st.text(max_size=20), st.sampled_from([0, 50, 3000, 20_000])
    ),
    st.tuples(st.just("new_study")),
    st.tuples(st.just("delete_study"), _indexes, st.booleans()),
    st.tuples(st.just("vacuum")),
)
# Each step is a write and whether to snapshot after it.
_steps = st.lists(st.tuples(_ops, st.booleans()), min_size=3, max_size=10)


def changed_pages_by_hand(old: Path, new: Path, page_size: int) -> list[int]:
    """Page numbers of ``new`` whose bytes differ from ``old``'s, the slow obvious way."""
    before, after = old.read_bytes(), new.read_bytes()
    return [
        start // page_size + 1
        for start in range(0, len(after), page_size)
        if after[start : start + page_size] != before[start : start + page_size]
    ]


def play_and_snapshot(
    database: Path, steps: list[tuple[tuple[Any, ...], bool]], *, wal: bool
) -> list[Path]:
    """Play ``steps`` on ``database``, snapshotting it first, where a step asks, and last."""
    snapshots: list[Path] = []

    def snapshot() -> None:
        snapshots.append(database.with_name(f"snapshot-{len(snapshots)}.db"))
        snapshot_sqlite(database, snapshots[-1])

    writer = OptunaWriter(database, wal=wal)
    try:
        snapshot()
        for op, take_snapshot in steps:
            event(f"op {op[0]}")
            writer.play(op)
            if take_snapshot:
                snapshot()
        if not steps[-1][1]:
            snapshot()
    finally:
        writer.close()
    return snapshots


# Grow, then delete the bigger study and VACUUM: the file shrinks; always tried, in WAL mode.
_GROW_THEN_SHRINK = [
    (("add_trials", 0, 20), True),
    (("new_study",), False),
    (("add_trials", 1, 20), True),
    (("user_attr", "notes", "", 20_000), True),
    (("delete_study", 0, True), True),
]


@settings(max_examples=25, deadline=None)
@example(steps=_GROW_THEN_SHRINK, page_size=1024, wal=True, chunk_pages=3)
@given(
    steps=_steps,
    page_size=st.sampled_from([4096, 1024]),
    wal=st.booleans(),
    chunk_pages=st.sampled_from([1, 3, 16, None]),
)
def test_patch_chain_rebuilds_the_last_snapshot_of_real_optuna_writes(
    empty_studies: dict[int, Path],
    steps: list[tuple[tuple[Any, ...], bool]],
    page_size: int,
    wal: bool,
    chunk_pages: int | None,
) -> None:
    chunk_bytes = CHUNK_BYTES if chunk_pages is None else chunk_pages * page_size
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        database = folder / "study.db"
        shutil.copyfile(empty_studies[page_size], database)
        snapshots = play_and_snapshot(database, steps, wal=wal)

        patches: list[Patch] = []
        for generation, (old, new) in enumerate(itertools.pairwise(snapshots), 1):
            delta = diff_files(old, new, chunk_bytes=chunk_bytes)
            # Shown by --hypothesis-show-statistics: the cases the examples reached.
            size_change = new.stat().st_size - old.stat().st_size
            event(
                "file " + ("grew" if size_change > 0 else "shrank" if size_change else "same size")
            )
            if delta.pages and old.stat().st_size > chunk_bytes:
                event("diff over several chunks")
            assert [page_no for page_no, _ in delta.pages] == changed_pages_by_hand(
                old, new, page_size
            )
            assert delta.page_size == page_size
            assert delta.page_count * page_size == new.stat().st_size
            assert delta.sha256 == sha256_file(new)
            data = encode_patch(
                delta,
                generation=generation,
                parent_generation=generation - 1,
                parent_sha256=sha256_file(old),
                created=1_700_000_000.5 + generation,
                meta={"trials": generation, "note": "ok"},
            )
            header = read_patch_header(data)
            assert header.generation == generation
            assert header.parent_generation == generation - 1
            assert header.result_sha256 == delta.sha256
            assert header.changed_pages == len(delta.pages)
            assert header.created == 1_700_000_000.5 + generation
            assert dict(header.meta) == {"trials": generation, "note": "ok"}
            assert header.patch_bytes == len(data)
            patch = decode_patch(data)
            assert patch.header == header
            assert header.parent_page_count == old.stat().st_size // page_size
            # A page the parent has travels as its XOR with the old page; the others whole.
            old_bytes = old.read_bytes()
            assert [
                xor_bytes(record, old_bytes[(no - 1) * page_size : no * page_size])
                if header.is_xor(no)
                else record
                for no, record in patch.pages
            ] == [page for _, page in delta.pages]
            patches.append(patch)

        last = snapshots[-1].read_bytes()
        # One patch at a time, each into a new file.
        current = snapshots[0]
        for number, patch in enumerate(patches):
            following = folder / f"rebuilt-{number}.db"
            apply_patch(current, patch, following)
            current = following
        assert current.read_bytes() == last
        # The whole chain at once.
        apply_chain(snapshots[0], patches, folder / "chain.db")
        assert (folder / "chain.db").read_bytes() == last
        # In place on one working copy, each result verified.
        working = folder / "working.db"
        shutil.copyfile(snapshots[0], working)
        for patch in patches:
            apply_patch_in_place(working, patch)
        assert working.read_bytes() == last


@settings(max_examples=20, deadline=None)
@example(steps=_GROW_THEN_SHRINK, wal=True)
@given(steps=_steps, wal=st.booleans())
def test_reading_a_snapshot_as_its_difference_from_the_last_one_reads_what_it_holds(
    empty_studies: dict[int, Path], steps: list[tuple[tuple[Any, ...], bool]], wal: bool
) -> None:
    # Each backup reads its snapshot as the difference from the one before it; whatever
    # Optuna wrote in between (new studies, deleted ones, VACUUM), the finished trials
    # and studies it finds must be those a whole read finds, or the monotonic check and
    # the trial-folder sync would work from a wrong list.
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        database = folder / "study.db"
        shutil.copyfile(empty_studies[4096], database)
        snapshots = play_and_snapshot(database, steps, wal=wal)

        contents = [read_content(path, check=None) for path in snapshots]
        for (old, new), (old_content, new_content) in zip(
            itertools.pairwise(snapshots), itertools.pairwise(contents), strict=True
        ):
            assert read_content_since(new, old, old_content) == new_content
            event("lost trials" if old_content.missing_from(new_content) else "none lost")
        # Told the wrong content of the older file, it reads the whole file instead.
        stale = dataclasses.replace(contents[-2], finished=contents[-2].finished | {("x", 9, "")})
        assert read_content_since(snapshots[-1], snapshots[-2], stale) == contents[-1]
        # An older file that is not an Optuna study at all: the same.
        plain = folder / "plain.db"
        write(plain, "CREATE TABLE t(x)")
        assert read_content_since(snapshots[-1], plain, contents[-1]) == contents[-1]


# --- Plain SQLite files for the deterministic cases ----------------------------------------


def make_database(path: Path, rows: int, *, page_size: int = 4096, payload: int = 200) -> None:
    """A database of ``rows`` rows of ``payload`` pseudo-random bytes each."""
    connection = sqlite3.connect(path)
    try:
        connection.execute(f"PRAGMA page_size={page_size}")
        connection.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, blob BLOB)")
        connection.executemany(
            "INSERT INTO items (blob) VALUES (?)",
            ((os.urandom(payload),) for _ in range(rows)),
        )
        connection.commit()
    finally:
        connection.close()


def write(path: Path, *statements: str) -> None:
    connection = sqlite3.connect(path)
    try:
        for statement in statements:
            connection.execute(statement)
        connection.commit()
    finally:
        connection.close()


@dataclasses.dataclass
class Pair:
    """Two snapshots of one database and the encoded patch between them."""

    old: Path
    new: Path
    data: bytes

    @property
    def patch(self) -> Patch:
        return decode_patch(self.data)


def snapshot_pair(folder: Path, *changes: str, rows: int = 40) -> Pair:
    source = folder / "source.db"
    make_database(source, rows)
    old, new = folder / "old.db", folder / "new.db"
    snapshot_sqlite(source, old)
    write(source, *changes)
    snapshot_sqlite(source, new)
    data = encode_patch(
        diff_files(old, new),
        generation=2,
        parent_generation=1,
        parent_sha256=sha256_file(old),
        created=1_700_000_000.0,
        meta={"trials": 7},
    )
    return Pair(old, new, data)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return snapshot_pair(
        tmp_path,
        "UPDATE items SET blob = x'00' WHERE id = 3",
        "INSERT INTO items (blob) VALUES (zeroblob(9000))",
    )


def test_a_trial_ships_its_changed_bytes_not_its_changed_pages(tmp_path: Path) -> None:
    """A trial rewrites a few pages, each for a row or two: the patch carries the change."""
    database = tmp_path / "study.db"
    study = optuna.create_study(storage=f"sqlite:///{database}", study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), 200)
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    snapshot_sqlite(database, old)
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), 1)
    snapshot_sqlite(database, new)
    delta = diff_files(old, new)
    arguments: dict[str, Any] = {
        "generation": 2,
        "parent_generation": 1,
        "parent_sha256": sha256_file(old),
        "created": 0.0,
        "meta": {},
    }
    changes = encode_patch(delta, **arguments)
    whole_pages = encode_patch(dataclasses.replace(delta, parent_page_count=None), **arguments)
    assert read_patch_header(changes).format_version == FORMAT_VERSION
    assert read_patch_header(whole_pages).format_version == 1
    assert len(changes) * 4 < len(whole_pages), (len(changes), len(whole_pages))
    for data in (changes, whole_pages):
        out = tmp_path / f"out-{len(data)}.db"
        apply_patch(old, decode_patch(data), out)
        assert out.read_bytes() == new.read_bytes()


def test_a_chain_of_version_1_and_version_2_patches_still_applies(tmp_path: Path) -> None:
    """Patches written before version 2 (whole pages) stay on Drive; restores read them."""
    source = tmp_path / "source.db"
    make_database(source, 300)
    snapshots = [tmp_path / "s0.db"]
    snapshot_sqlite(source, snapshots[0])
    for step in range(1, 5):
        write(source, f"UPDATE items SET blob = zeroblob({step * 10}) WHERE id % 7 = {step}")
        write(source, f"INSERT INTO items (blob) VALUES (zeroblob({step * 3000}))")
        snapshots.append(tmp_path / f"s{step}.db")
        snapshot_sqlite(source, snapshots[-1])
    patches = []
    for generation, (old, new) in enumerate(itertools.pairwise(snapshots), 1):
        delta = diff_files(old, new)
        if generation % 2:
            delta = dataclasses.replace(delta, parent_page_count=None, parent_pages=())
        patches.append(
            decode_patch(
                encode_patch(
                    delta,
                    generation=generation,
                    parent_generation=generation - 1,
                    parent_sha256=sha256_file(old),
                    created=0.0,
                    meta={},
                )
            )
        )
    assert [p.header.format_version for p in patches] == [1, 2, 1, 2]
    apply_chain(snapshots[0], patches, tmp_path / "out.db")
    assert (tmp_path / "out.db").read_bytes() == snapshots[-1].read_bytes()


def test_a_database_larger_than_a_chunk_ships_only_its_changed_pages(tmp_path: Path) -> None:
    pair = snapshot_pair(tmp_path, "UPDATE items SET blob = x'0102' WHERE id = 9000", rows=20_000)
    assert pair.old.stat().st_size > 3 * CHUNK_BYTES
    patch = pair.patch
    # The row's leaf page, perhaps an interior page and the header page; not the 3 MiB.
    assert 1 <= len(patch.pages) <= 3
    apply_patch(pair.old, patch, tmp_path / "out.db")
    assert (tmp_path / "out.db").read_bytes() == pair.new.read_bytes()


def test_a_shrunk_database_is_truncated_to_the_new_page_count(tmp_path: Path) -> None:
    pair = snapshot_pair(tmp_path, "DELETE FROM items WHERE id > 100", rows=3000)
    source = tmp_path / "source.db"
    write(source, "VACUUM")
    smaller = tmp_path / "smaller.db"
    snapshot_sqlite(source, smaller)
    delta = diff_files(pair.old, smaller)
    assert delta.page_count * delta.page_size == smaller.stat().st_size < pair.old.stat().st_size
    data = encode_patch(
        delta,
        generation=2,
        parent_generation=1,
        parent_sha256=sha256_file(pair.old),
        created=0.0,
        meta={},
    )
    apply_patch(pair.old, decode_patch(data), tmp_path / "out.db")
    assert (tmp_path / "out.db").read_bytes() == smaller.read_bytes()


def test_identical_snapshots_make_an_empty_patch(tmp_path: Path) -> None:
    source = tmp_path / "source.db"
    make_database(source, 50)
    delta = diff_files(source, source)
    assert delta.pages == ()
    data = encode_patch(
        delta,
        generation=1,
        parent_generation=0,
        parent_sha256=delta.sha256,
        created=0.0,
        meta={},
    )
    apply_patch(source, decode_patch(data), tmp_path / "out.db")
    assert (tmp_path / "out.db").read_bytes() == source.read_bytes()


# --- Damage is caught and named ------------------------------------------------------------


def header_end(data: bytes) -> int:
    return 14 + int.from_bytes(data[10:14], "big") + 12


def test_every_flipped_bit_is_caught_and_named(pair: Pair) -> None:
    data = pair.data
    end_of_header = header_end(data)
    for index in range(len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 1 << (index % 8)
        with pytest.raises(PatchError) as caught:
            decode_patch(damaged)
        message = str(caught.value)
        if index < len(PATCH_MAGIC):
            assert "bad magic" in message
        elif index < len(PATCH_MAGIC) + 2:
            assert "unsupported patch format version" in message
        else:
            assert re.search(
                r"checksum mismatch|truncated or damaged|unexpected bytes .* or is damaged",
                message,
            ), (index, message)
        if index < end_of_header:
            # The cheap header read catches damage to the header on its own.
            with pytest.raises(PatchError):
                read_patch_header(damaged)
        else:
            assert read_patch_header(damaged) == read_patch_header(data)


def test_a_flipped_bit_in_the_body_is_a_checksum_mismatch(pair: Pair) -> None:
    damaged = bytearray(pair.data)
    damaged[header_end(pair.data) + 5] ^= 0x10
    with pytest.raises(PatchError, match="checksum mismatch"):
        decode_patch(damaged)


def test_every_truncation_is_caught_and_named(pair: Pair) -> None:
    for size in range(len(pair.data)):
        with pytest.raises(PatchError, match="truncated"):
            decode_patch(pair.data[:size])
        if size < header_end(pair.data):
            with pytest.raises(PatchError, match="truncated"):
                read_patch_header(pair.data[:size])


def test_extra_bytes_after_the_patch_are_named(pair: Pair) -> None:
    with pytest.raises(PatchError, match="3 unexpected bytes"):
        decode_patch(pair.data + b"abc")


def test_something_else_entirely_is_not_a_patch(pair: Pair) -> None:
    with pytest.raises(PatchError, match="bad magic"):
        decode_patch(pair.old.read_bytes())
    with pytest.raises(PatchError, match="bad magic"):
        read_patch_header(b"PK\x03\x04")


def reseal(data: bytes, *, version: int) -> bytes:
    """``data`` with another format version and both checksums recomputed to match."""
    body = bytearray(data[:-32])
    body[8:10] = version.to_bytes(2, "big")
    end = header_end(data)
    body[end - 4 : end] = zlib.crc32(bytes(body[: end - 4])).to_bytes(4, "big")
    return bytes(body) + hashlib.sha256(body).digest()


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 0xFFFF])
def test_an_unknown_format_version_is_named_even_when_its_checksums_match(
    pair: Pair, version: int
) -> None:
    data = reseal(pair.data, version=version)
    expected = f"unsupported patch format version {version} "
    with pytest.raises(PatchError, match=re.escape(expected)):
        decode_patch(data)
    with pytest.raises(PatchError, match=re.escape(expected)):
        read_patch_header(data)


def test_resealing_with_the_same_version_keeps_a_valid_patch(pair: Pair) -> None:
    # Guards the test above: its resealing is right, so only the version is rejected.
    assert decode_patch(reseal(pair.data, version=FORMAT_VERSION)) == pair.patch


def test_a_wrong_base_is_refused_and_leaves_no_output(tmp_path: Path, pair: Pair) -> None:
    out = tmp_path / "out.db"
    with pytest.raises(PatchError, match="does not match the patch's parent"):
        apply_patch(pair.new, pair.patch, out)
    assert not out.exists()


def test_a_wrong_base_is_refused_in_place_before_anything_is_written(pair: Pair) -> None:
    before = pair.new.read_bytes()
    with pytest.raises(PatchError, match="does not match the patch's parent"):
        apply_patch_in_place(pair.new, pair.patch)
    assert pair.new.read_bytes() == before


def test_a_patch_whose_pages_do_not_make_its_result_is_refused(tmp_path: Path, pair: Pair) -> None:
    patch = pair.patch
    page_no, page = patch.pages[-1]
    tampered = dataclasses.replace(
        patch, pages=(*patch.pages[:-1], (page_no, bytes(len(page) - 1) + b"\x01"))
    )
    out = tmp_path / "out.db"
    with pytest.raises(PatchError, match="does not match its result_sha256"):
        apply_patch(pair.old, tampered, out)
    assert not out.exists()
    working = tmp_path / "working.db"
    shutil.copyfile(pair.old, working)
    with pytest.raises(PatchError, match=r"now damaged.*does not match its result_sha256"):
        apply_patch_in_place(working, tampered)


def test_a_chain_with_a_missing_link_is_refused(tmp_path: Path, pair: Pair) -> None:
    out = tmp_path / "out.db"
    with pytest.raises(PatchError, match="does not follow generation 2"):
        apply_chain(pair.old, [pair.patch, pair.patch], out)
    assert not out.exists()


def test_apply_never_overwrites_an_existing_file(tmp_path: Path, pair: Pair) -> None:
    with pytest.raises(FileExistsError):
        apply_patch(pair.old, pair.patch, pair.old)
    assert sha256_file(pair.old) == pair.patch.header.parent_sha256


# --- Headers, page sizes, limits -----------------------------------------------------------


def test_the_header_reads_from_a_path_or_a_file_without_the_body(
    tmp_path: Path, pair: Pair
) -> None:
    path = tmp_path / "patch.bin"
    path.write_bytes(pair.data)
    assert read_patch_header(path) == pair.patch.header
    with open(path, "rb") as file:
        assert read_patch_header(file) == pair.patch.header
        assert file.tell() == header_end(pair.data)
    # A body that is not even zlib does not matter to the header.
    stream = io.BytesIO(pair.data[: header_end(pair.data)] + b"\xff" * 100)
    assert read_patch_header(stream).generation == 2


@pytest.mark.parametrize("page_size", [512, 4096, 32768, 65536])
def test_page_size_is_read_from_the_header(tmp_path: Path, page_size: int) -> None:
    path = tmp_path / "db.sqlite"
    make_database(path, 5, page_size=page_size)
    assert page_size_of(path) == page_size


def test_different_page_sizes_are_detected(tmp_path: Path) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    make_database(old, 20, page_size=4096)
    make_database(new, 20, page_size=8192)
    with pytest.raises(PageSizeMismatch, match="from 4096 to 8192") as caught:
        diff_files(old, new)
    assert (caught.value.old_page_size, caught.value.new_page_size) == (4096, 8192)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    database, other = tmp_path / "db.sqlite", tmp_path / "notes.txt"
    make_database(database, 5)
    other.write_bytes(b"not a database" * 100)
    with pytest.raises(PatchError, match="not an SQLite database"):
        page_size_of(other)
    with pytest.raises(PatchError, match=r"notes\.txt is not an SQLite database"):
        diff_files(database, other)
    with pytest.raises(PatchError, match=r"notes\.txt is not an SQLite database"):
        diff_files(other, database)


def test_a_file_that_is_not_whole_pages_is_refused(tmp_path: Path) -> None:
    database, torn = tmp_path / "db.sqlite", tmp_path / "torn.sqlite"
    make_database(database, 100)
    torn.write_bytes(database.read_bytes()[:-100])
    with pytest.raises(PatchError, match="not a whole number of 4096-byte pages"):
        diff_files(database, torn)


def test_too_many_changed_pages_stop_the_diff(tmp_path: Path) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    make_database(old, 10)
    make_database(new, 2000)
    with pytest.raises(DeltaTooLarge, match="more than 40960 bytes of pages changed"):
        diff_files(old, new, max_changed_bytes=10 * 4096)
    assert len(diff_files(old, new, max_changed_bytes=10**9).pages) > 10


def test_meta_that_is_not_json_is_refused_when_encoding(pair: Pair) -> None:
    delta = diff_files(pair.old, pair.new)
    with pytest.raises(TypeError):
        encode_patch(
            delta,
            generation=1,
            parent_generation=0,
            parent_sha256=delta.sha256,
            created=0.0,
            meta={"when": object()},
        )
