"""Dedup state that holds with many writers and stays bounded: writers per key, event ids."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import DedupPolicy, Pipeline, SchemaStore, stage
from pipeline.publish import writer_identity
from pipeline.record import WRITER_HEADER
from pipeline.runtime import writers
from pipeline.runtime.gate import Gate
from pipeline.runtime.ids import ID_PREFIX, MemoryIds, StoreIds
from pipeline.runtime.state import (
    DUPLICATE,
    GAP,
    NEW,
    SEQ_PREFIX,
    PartitionTable,
    RocksStores,
    StateTable,
    position,
)
from pipeline.runtime.stats import StageStats
from pipeline.testing import TestDriver

SCHEMA = {
    "type": "record",
    "name": "t.Event",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
}


def one_stage(dedup: DedupPolicy | None = None) -> Pipeline:
    store = SchemaStore()
    store.add(SCHEMA)

    @stage(input="t.Event", output="t.Event", dedup=dedup)
    def keep(event: dict[str, Any]) -> dict[str, Any]:
        return event

    return Pipeline("p", source="p.in", key="id", schemas=store) | keep


# -- many writers of one key --------------------------------------------------------------


def test_two_publishers_of_one_key_both_get_through() -> None:
    """Issue 9's first finding: the later publisher's clock made the earlier one's records
    look old. Each publisher is its own writer now."""
    driver = TestDriver(one_stage())
    for n in range(500):
        driver.send({"id": "k", "n": n}, writer="web-1")
        driver.send({"id": "k", "n": 1000 + n}, writer="web-2")
    stats = driver.run()["keep"]
    assert len(driver.outputs()) == 1000
    assert (stats.duplicates, stats.gaps) == (0, 0)


def test_a_retransmission_is_a_duplicate_of_its_own_writer_only() -> None:
    driver = TestDriver(one_stage())
    driver.send({"id": "k", "n": 1}, seq=7, writer="a")
    driver.send({"id": "k", "n": 2}, seq=7, writer="b")  # same number, another writer: new
    driver.send({"id": "k", "n": 3}, seq=7, writer="a")  # a's retransmission: duplicate
    driver.send({"id": "k", "n": 4}, seq=9, writer="b")  # b skipped 8: a gap of b's
    stats = driver.run()["keep"]
    assert [v["n"] for v in driver.outputs()] == [1, 2, 4]
    assert (stats.duplicates, stats.gaps) == (1, 1)


def test_records_without_a_writer_header_are_one_anonymous_writer() -> None:
    driver = TestDriver(one_stage())
    for seq in (1, 2, 2, 3):
        sent = driver.send({"id": "k", "n": seq}, seq=seq)
        driver.send_raw(
            sent.key, sent.value, [(k, v) for k, v in sent.headers if k != WRITER_HEADER]
        )
    stats = driver.run()["keep"]
    # Each event went once with the driver's writer and once anonymously: two writers.
    assert len(driver.outputs()) == 6 and stats.duplicates == 2


def test_writer_positions_check_and_bound() -> None:
    stats = StageStats("s")
    table = PartitionTable(0, {}, DedupPolicy(max_writers=2, writer_ttl=10), stats)
    key = b"k"
    table.remember_sequence(key, b"w1", position(5, 0), now_ms=1_000)
    assert table.check_sequence(key, b"w1", position(5, 0)) == DUPLICATE
    assert table.check_sequence(key, b"w1", position(6, 0)) == NEW
    assert table.check_sequence(key, b"w1", position(8, 0)) == GAP
    assert table.check_sequence(key, b"w2", position(1, 0)) == NEW
    table.remember_sequence(key, b"w2", position(1, 0), now_ms=2_000)
    table.remember_sequence(key, b"w3", position(1, 0), now_ms=3_000)  # bound: w1 goes
    assert table.last_position(key, b"w1") is None
    assert table.last_position(key, b"w3") == position(1, 0)
    assert stats.writers_evicted == 1
    # Idle past the TTL: forgotten when a new writer arrives, not counted as evicted.
    table.remember_sequence(key, b"w4", position(1, 0), now_ms=3_000 + 20_000)
    assert table.last_position(key, b"w2") is None and stats.writers_evicted == 1


def test_writer_entries_round_trip_through_the_changelog() -> None:
    table = PartitionTable(0, {})
    for i, w in enumerate((b"a", b"b" * 64, b"c")):
        table.remember_sequence(b"k", w, position(10 + i, i), now_ms=10**12)
    dirty = table.take_dirty()
    assert list(dirty) == [b"\x00k"]  # one changelog record per key per commit
    restored = PartitionTable(0, {})
    for ckey, value in dirty.items():
        restored.apply(ckey, value, now_ms=10**12)
    for i, w in enumerate((b"a", b"b" * 64, b"c")):
        assert restored.last_position(b"k", w) == position(10 + i, i)
    assert writers.decode(dirty[b"\x00k"]) == table.store[b"\x00k"]


def test_a_restore_forgets_idle_writers_in_the_changelog_too() -> None:
    week = 7 * 24 * 3600 * 1000
    table = PartitionTable(0, {})
    table.remember_sequence(b"k", b"old", position(1, 0), now_ms=0)
    [(ckey, value)] = table.take_dirty().items()
    restored = PartitionTable(0, {})
    restored.apply(ckey, value, now_ms=week + 1)
    assert restored.last_position(b"k", b"old") is None
    assert restored.take_dirty() == {ckey: None}  # a tombstone


def test_long_foreign_writer_ids_are_shortened() -> None:
    long = b"x" * 300
    assert len(writers.writer_id(long)) == 17
    assert writers.writer_id(long) == writers.writer_id(long) != writers.writer_id(b"y" * 300)
    assert writers.writer_id(b"web-1") == b"web-1"


def test_writer_identity_is_checked() -> None:
    from pipeline import ConfigError

    with pytest.raises(ConfigError, match="1 to 64 bytes"):
        writer_identity("")
    assert writer_identity() != writer_identity()


# -- event ids: bounded, and the changelog forgets what memory forgot ------------------------


def test_expired_event_ids_get_tombstones() -> None:
    table = PartitionTable(0, {}, DedupPolicy.by_event_id(ttl=1))
    table.remember_id(b"a", 0)
    table.remember_id(b"b", 500)
    table.take_dirty()
    table.remember_id(b"c", 1_200)  # a is past its TTL: forgotten, tombstoned
    dirty = table.take_dirty()
    assert dirty[ID_PREFIX + b"a"] is None and dirty[ID_PREFIX + b"c"] is not None
    assert not table.seen_id(b"a", 1_200) and table.seen_id(b"b", 1_200)
    assert len(table.ids) == 2


def test_max_ids_evicts_the_oldest_with_a_tombstone_and_counts_it() -> None:
    stats = StageStats("s")
    table = PartitionTable(0, {}, DedupPolicy.by_event_id(max_ids=2), stats)
    for i, eid in enumerate((b"a", b"b", b"c")):
        table.remember_id(eid, i)
    assert table.take_dirty()[ID_PREFIX + b"a"] is None
    assert stats.ids_evicted == 1 and len(table.ids) == 2


def test_a_restore_loads_only_live_ids_and_tombstones_the_rest() -> None:
    table = PartitionTable(0, {}, DedupPolicy.by_event_id(ttl=10))
    records = [
        (ID_PREFIX + b"old", (0).to_bytes(8, "big")),
        (ID_PREFIX + b"new", (9_000).to_bytes(8, "big")),
    ]
    for ckey, value in records:
        table.apply(ckey, value, now_ms=12_000)
    assert len(table.ids) == 1 and table.seen_id(b"new", 12_000)
    assert table.take_dirty() == {ID_PREFIX + b"old": None}


@pytest.mark.parametrize("kind", ["memory", "rocks"])
def test_id_sets_agree(kind: str, tmp_path: Path) -> None:
    ids: Any
    if kind == "memory":
        ids = MemoryIds(ttl_ms=1_000, max_ids=3)
    else:
        store = RocksStores(tmp_path).open("t", 0)
        ids = StoreIds(store, ttl_ms=1_000, max_ids=3)
    assert ids.add(b"a", 0) == ()
    assert ids.add(b"b", 100) == ()
    assert ids.add(b"c", 200) == ()
    assert ids.add(b"d", 300) == (b"a",) and ids.evicted == 1  # the bound
    assert ids.add(b"b", 400) == ()  # seen again: moves to the back
    assert ids.add(b"e", 1_250) == (b"c",)  # c is past its TTL; d is not, and 3 fit
    assert ids.seen(b"b", 1_250) and ids.seen(b"e", 1_250) and not ids.seen(b"c", 1_250)
    assert ids.load(b"x", 0, now=5_000) == (b"x",)  # expired on restore: tombstone it
    assert ids.load(b"e", None, now=5_000) == () and not ids.seen(b"e", 1_300)


def test_rocks_ids_survive_a_clean_close(tmp_path: Path) -> None:
    stores = RocksStores(tmp_path)
    store = stores.open("t", 0)
    ids = StoreIds(store, ttl_ms=10**9, max_ids=10)
    for i in range(5):
        ids.add(b"id%d" % i, i)
    ids.close()
    stores.save_checkpoint("t", 0, 42)
    stores.close("t", 0, store)
    store = stores.open("t", 0)
    assert stores.checkpoint("t", 0) == 42
    again = StoreIds(store, ttl_ms=10**9, max_ids=10)
    assert len(again) == 5 and again.seen(b"id3", 10)
    stores.close("t", 0, store)


def test_event_id_dedup_in_a_pipeline_with_a_tiny_ttl() -> None:
    driver = TestDriver(one_stage(DedupPolicy.by_event_id(ttl=3600)))
    driver.send({"id": "k", "n": 1}, event_id="e-1")
    driver.send({"id": "k", "n": 1}, event_id="e-1")
    stats = driver.run()["keep"]
    assert len(driver.outputs()) == 1 and stats.duplicates == 1


def test_a_changelog_entry_in_another_format_starts_the_key_afresh() -> None:
    table = PartitionTable(0, {})
    for raw in (b"\x01\x05ab", b"\x09", b"\x02\x10"):  # truncated or unknown: never a crash
        table.apply(b"\x00k", raw, now_ms=10**12)
        assert table.last_position(b"k", b"") is None


# -- restoring a batch at a time ----------------------------------------------------------

_KEYS = [b"a", b"b", b"c"]
_changelog_record = st.one_of(
    st.tuples(  # a writers entry, live or idle past the TTL
        st.sampled_from([SEQ_PREFIX + k for k in _KEYS]),
        st.tuples(st.sampled_from([b"w1", b"w2"]), st.integers(0, 99), st.sampled_from([0, 9_000]))
        .map(lambda e: writers.encode(writers.updated(None, e[0], e[1], e[2], 10_000, 8)[0])),
    ),
    st.tuples(st.sampled_from([SEQ_PREFIX + k for k in _KEYS]), st.just(b"\xffjunk")),
    st.tuples(st.sampled_from([p + k for p in (SEQ_PREFIX, b"\x02", b"\x03") for k in _KEYS]),
              st.none()),  # tombstones
    st.tuples(st.sampled_from([b"\x02" + k for k in _KEYS]), st.binary(min_size=1, max_size=3)),
    st.tuples(st.sampled_from([ID_PREFIX + k for k in _KEYS]),
              st.sampled_from([(0).to_bytes(8, "big"), (9_500).to_bytes(8, "big"), None])),
)  # fmt: skip


def _decoded(store: dict[bytes, Any]) -> dict[bytes, Any]:
    """A store's contents with writer entries decoded (a restore may keep them encoded)."""
    return {
        k: writers.decode(v) if k[:1] == SEQ_PREFIX and type(v) is bytes else v
        for k, v in store.items()
    }


@settings(max_examples=300, deadline=None)
@given(st.lists(_changelog_record, max_size=40), st.integers(1, 10))
def test_apply_many_leaves_what_apply_one_by_one_leaves(
    records: list[tuple[bytes, bytes | None]], chunk: int
) -> None:
    policy = DedupPolicy(ttl=10, writer_ttl=10)
    one, many = PartitionTable(0, {}, policy), PartitionTable(0, {}, policy)
    for ckey, value in records:
        one.apply(ckey, value, now_ms=12_000)
    for start in range(0, len(records), chunk):
        many.apply_many(records[start : start + chunk], now_ms=12_000)
    assert _decoded(many.store) == _decoded(one.store)
    assert many.take_dirty() == one.take_dirty()
    assert len(many.ids) == len(one.ids)
    assert [many.seen_id(k, 12_000) for k in _KEYS] == [one.seen_id(k, 12_000) for k in _KEYS]


def test_apply_many_into_rocksdb_writes_one_batch(tmp_path: Path) -> None:
    stores = RocksStores(tmp_path)
    table, _ = StateTable("t", DedupPolicy(), stores).open(0)
    entries = {SEQ_PREFIX + b"k%d" % i: writers.updated(None, b"w", i, 10**12, 1, 8)[0]
               for i in range(1000)}  # fmt: skip
    records = [(k, writers.encode(e)) for k, e in entries.items()]
    records.append((SEQ_PREFIX + b"k0", None))  # a tombstone after its key's entry
    table.apply_many(records, now_ms=10**12)
    assert table.store.get(SEQ_PREFIX + b"k0") is None
    kept = table.store.get(SEQ_PREFIX + b"k999")
    assert kept == writers.encode(entries[SEQ_PREFIX + b"k999"])  # as the changelog holds it
    assert table.last_position(b"k999", b"w") == 999
    assert table.check_sequence(b"k999", b"w", 999) == DUPLICATE
    stores.close("t", 0, table.store)


def test_a_rocksdb_store_an_earlier_version_wrote_still_answers(tmp_path: Path) -> None:
    """Earlier versions kept writer entries in RocksDB as (pickled) tuples: a store reopened
    from its checkpoint still answers from them, and the next write is in today's form."""
    stores = RocksStores(tmp_path)
    table, _ = StateTable("t", DedupPolicy(), stores).open(0)
    table.store[SEQ_PREFIX + b"k"] = (b"w", position(7, 0), 10**12)  # as rocksdict kept it
    assert table.check_sequence(b"k", b"w", position(7, 0)) == DUPLICATE
    assert table.check_sequence(b"k", b"w", position(8, 0)) == NEW
    table.remember_sequence(b"k", b"w", position(8, 0), 10**12 + 1)
    assert type(table.store.get(SEQ_PREFIX + b"k")) is bytes
    assert table.last_position(b"k", b"w") == position(8, 0)
    assert table.take_dirty() == {
        SEQ_PREFIX + b"k": writers.encode((b"w", position(8, 0), 10**12 + 1))
    }
    stores.close("t", 0, table.store)


@settings(max_examples=60, deadline=None)
@given(st.lists(_changelog_record, max_size=40), st.integers(1, 10))
def test_a_rocksdb_table_restored_a_batch_at_a_time_answers_as_a_memory_one(
    records: list[tuple[bytes, bytes | None]], chunk: int
) -> None:
    """RocksDB keeps writer entries encoded (a restore writes what it read); what the table
    answers and what it owes the changelog are those of a memory table applied one by one."""
    policy = DedupPolicy(ttl=10, writer_ttl=10)
    memory = PartitionTable(0, {}, policy)
    for ckey, value in records:
        memory.apply(ckey, value, now_ms=12_000)
    with tempfile.TemporaryDirectory() as directory:
        stores = RocksStores(Path(directory))
        rocks, _ = StateTable("t", policy, stores).open(0)
        try:
            for start in range(0, len(records), chunk):
                rocks.apply_many(records[start : start + chunk], now_ms=12_000)
            assert rocks.take_dirty() == memory.take_dirty()
            for key in _KEYS:
                for prefix in (b"\x02", b"\x03"):
                    assert rocks.store.get(prefix + key) == memory.store.get(prefix + key)
                for writer in (b"w1", b"w2"):
                    assert rocks.last_position(key, writer) == memory.last_position(key, writer)
                    for pos in (0, 50, 99, 100):
                        assert rocks.check_sequence(key, writer, pos) == memory.check_sequence(
                            key, writer, pos
                        )
                assert rocks.seen_id(key, 12_000) == memory.seen_id(key, 12_000)
            # Handled records are remembered alike, and owed to the changelog alike.
            for key in _KEYS:
                rocks.remember_sequence(key, b"w1", 120, 12_000)
                memory.remember_sequence(key, b"w1", 120, 12_000)
            assert rocks.take_dirty() == memory.take_dirty()
            assert [rocks.last_position(k, b"w2") for k in _KEYS] == [
                memory.last_position(k, b"w2") for k in _KEYS
            ]
        finally:
            stores.close("t", 0, rocks.store)


# -- what a second delivery would find ------------------------------------------------------


def test_the_gate_says_when_a_handled_record_would_not_be_found_a_duplicate() -> None:
    """Exactly-once key lanes commit outputs ahead of offsets only for records whose second
    delivery the table drops; the gate flags any other (then the lanes settle first)."""
    node = one_stage().node("keep")
    gate = Gate(node, StageStats("keep"), lambda *_: None)
    table = PartitionTable(0, {})

    class Msg:
        key, headers, topic, partition, offset = b"k", [], "p.in", 0, 0

    mark = gate.check(Msg(), table, 5, 0, None, None, b"w")
    gate.remember(Msg(), table, mark, b"w", 0)
    assert not gate.unprotected  # a sequenced record: its second delivery is a duplicate
    assert gate.check(Msg(), table, 5, 0, None, None, b"w") is None
    mark = gate.check(Msg(), table, None, 0, None, None, b"w")  # no seq, no event id
    assert mark is False
    gate.remember(Msg(), table, mark, b"w", 0)
    assert gate.unprotected
