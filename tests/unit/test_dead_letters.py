"""Dead letters in memory: parked keys, the replay rule, header stripping, ``--where``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pipeline import Pipeline, RetryPolicy, SchemaStore, StageError, stage
from pipeline.dlq import DeadLetterRecord, Replay, ReplayReport, Where
from pipeline.record import ID_HEADER, SEQ_HEADER, encode_seq
from pipeline.runtime import deadletter as dlq
from pipeline.runtime.parking import Park, new_replay_id
from pipeline.runtime.state import (
    PARK_PREFIX,
    REPLAY_PREFIX,
    PartitionTable,
)
from pipeline.stage import DeadLetterPolicy, DedupPolicy
from pipeline.testing import TestDriver

SCHEMA = {
    "type": "record",
    "name": "t.Event",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
}
NO_RETRY = RetryPolicy(max_attempts=1)


def build(bad: set[int], *, park: bool = True, concurrency: int = 1) -> Pipeline:
    """One stage, ``work``, that fails for every ``n`` in ``bad`` (clear it to "fix" it)."""
    store = SchemaStore()
    store.add(SCHEMA)
    policy = DeadLetterPolicy.park() if park else DeadLetterPolicy.proceed()

    def check(event: dict[str, Any]) -> dict[str, Any]:
        if event["n"] in bad:
            raise ValueError(f"n={event['n']} is bad")
        if event["n"] < 0:
            return {**event, "n": "not an int"}  # breaks the output schema
        return event

    if concurrency > 1:

        @stage(input="t.Event", output="t.Event", retry=NO_RETRY, on_dead_letter=policy,
               concurrency=concurrency)  # fmt: skip
        async def work(event: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(0)
            return check(event)

    else:

        @stage(input="t.Event", output="t.Event", retry=NO_RETRY, on_dead_letter=policy)
        def work(event: dict[str, Any]) -> dict[str, Any]:
            return check(event)

    return Pipeline("p", source="p.in", key="id", schemas=store) | work


def outputs(driver: TestDriver, key: str) -> list[int]:
    return [v["n"] for v in driver.outputs() if v["id"] == key]


def dead(driver: TestDriver, key: str) -> list[tuple[int, str]]:
    """(n, error class) of the key's dead letters, in order."""
    found = driver.dead_letters("work")
    return [(d.value["n"], d.error_class) for d in found if d.key == key.encode()]


def replay(driver: TestDriver, *where: str, replay_id: str | None = None) -> ReplayReport:
    """What ``pipeline dlq replay`` does, on the in-memory broker."""
    node = driver.pipeline.node("work")
    run = Replay("work", node.input_topic, Where.parse(where), replay_id)
    for record in driver.records(node.dlq_topic):
        item = run.offer(DeadLetterRecord.of(record))
        if item is not None:
            driver.send_raw(item.key, item.value, item.headers, stage="work")
    return run.report


def send(driver: TestDriver, key: str, *ns: int) -> None:
    for n in ns:
        driver.send({"id": key, "n": n})


# -- parking ------------------------------------------------------------------------------


def test_continue_mode_processes_later_records_of_the_key() -> None:
    driver = TestDriver(build({2}, park=False))
    send(driver, "a", 1, 2, 3)
    driver.run()
    assert outputs(driver, "a") == [1, 3]
    assert dead(driver, "a") == [(2, "ValueError")]


def test_park_mode_parks_the_rest_of_the_key_in_order_and_leaves_other_keys_alone() -> None:
    driver = TestDriver(build({2}))
    send(driver, "a", 1, 2, 3, 4)
    send(driver, "b", 1, 2)  # b's 2 fails too: b is parked after it, independently of a
    send(driver, "c", 5, 6)
    stats = driver.run()["work"]
    assert outputs(driver, "a") == [1]
    assert dead(driver, "a") == [(2, "ValueError"), (3, "Parked"), (4, "Parked")]
    assert dead(driver, "b") == [(2, "ValueError")]
    assert outputs(driver, "c") == [5, 6]
    first = next(d for d in driver.dead_letters() if d.key == b"a")
    where = f"p.in/{first.headers[dlq.PARTITION].decode()}@{first.headers[dlq.OFFSET].decode()}"
    parked = [d for d in driver.dead_letters() if d.error_class == "Parked"]
    for d in parked:
        assert where in d.error_message and "ValueError" in d.error_message
        assert d.attempts == 0
    assert stats.dead_by_error == {"ValueError": 2, "Parked": 2}
    assert stats.consumed == stats.processed + stats.dead_letters == 8


def test_undecodable_and_unencodable_records_park_their_key_too() -> None:
    driver = TestDriver(build(set()))
    driver.send_raw(b"a", b"\xc3\x01truncated", [(SEQ_HEADER, encode_seq(1))])
    send(driver, "a", 7)
    send(driver, "b", -1, 8)  # -1 produces an output that breaks the schema
    driver.run()
    assert [d.error_class for d in driver.dead_letters() if d.key == b"a"] == [
        "DecodeError",
        "Parked",
    ]
    assert dead(driver, "b") == [(-1, "EncodeError"), (8, "Parked")]
    assert driver.outputs() == []


def test_null_keys_are_dead_lettered_but_never_parked() -> None:
    driver = TestDriver(build({2}))
    codec = driver.pipeline.schemas.codec("t.Event")
    driver.send_raw(None, codec.encode({"id": "x", "n": 2}))
    driver.send_raw(None, codec.encode({"id": "x", "n": 3}))
    driver.run()
    assert dead(driver, "x") == []
    assert [d.error_class for d in driver.dead_letters()] == ["ValueError"]
    assert outputs(driver, "x") == [3]


def test_parks_survive_a_restart_through_the_changelog() -> None:
    driver = TestDriver(build({2}))
    send(driver, "a", 1, 2)
    driver.run()
    parks = [r for r in driver.records("p.work.state") if r.key == PARK_PREFIX + b"a"]
    assert len(parks) == 1 and Park.decode(parks[0].value or b"").error == "ValueError"
    send(driver, "a", 3)
    driver.run()  # a new worker: its table is restored from the changelog
    assert dead(driver, "a") == [(2, "ValueError"), (3, "Parked")]
    assert outputs(driver, "a") == [1]


def test_a_redelivered_copy_of_a_parked_record_is_a_duplicate_not_a_second_dead_letter() -> None:
    driver = TestDriver(build({2}))
    driver.send({"id": "a", "n": 2}, seq=100)
    driver.send({"id": "a", "n": 3}, seq=101, event_id="e3")
    driver.send({"id": "a", "n": 3}, seq=101, event_id="e3")  # redelivered
    stats = driver.run()["work"]
    assert dead(driver, "a") == [(2, "ValueError"), (3, "Parked")]
    assert stats.duplicates == 1


@pytest.mark.parametrize("concurrency", [1, 4])
def test_replay_after_the_fix_sends_the_key_through_in_order_and_unparks_it(
    concurrency: int,
) -> None:
    bad = {2}
    driver = TestDriver(build(bad, concurrency=concurrency))
    send(driver, "a", 1, 2, 3, 4)
    send(driver, "b", *range(10, 30))
    driver.run()
    bad.clear()  # the bug is fixed
    report = replay(driver)
    assert (report.read, report.matched, report.replayed, report.skipped) == (3, 3, 3, 0)
    assert dict(report.by_class) == {"ValueError": 1, "Parked": 2}
    send(driver, "a", 5)  # after the replayed ones: the key is unparked by then
    driver.run()
    assert outputs(driver, "a") == [1, 2, 3, 4, 5]
    assert outputs(driver, "b") == list(range(10, 30))
    assert len(driver.dead_letters()) == 3  # nothing new
    tombstones = [r for r in driver.records("p.work.state") if r.key == PARK_PREFIX + b"a"]
    assert tombstones[-1].value is None


def test_a_second_replay_adds_nothing_its_records_are_counted_duplicates() -> None:
    bad = {2}
    driver = TestDriver(build(bad))
    send(driver, "a", 1, 2, 3)
    driver.run()
    bad.clear()
    replay(driver)
    driver.run()
    before = driver.stats["work"].duplicates
    again = replay(driver)
    driver.run()
    assert again.replayed == 2
    assert driver.stats["work"].duplicates - before == 2
    assert outputs(driver, "a") == [1, 2, 3]
    assert any(r.key and r.key.startswith(REPLAY_PREFIX) for r in driver.records("p.work.state"))


def test_replay_in_continue_mode_is_not_mistaken_for_a_duplicate_by_sequence() -> None:
    # Later records of the key passed already, so by sequence the replayed one looks old.
    bad = {2}
    driver = TestDriver(build(bad, park=False))
    send(driver, "a", 1, 2, 3)
    driver.run()
    bad.clear()
    replay(driver)
    driver.run()
    assert outputs(driver, "a") == [1, 3, 2]
    replay(driver)
    driver.run()
    assert outputs(driver, "a") == [1, 3, 2]
    assert driver.stats["work"].duplicates == 1


def test_a_record_that_fails_again_re_parks_the_key_under_the_replay_and_keeps_order() -> None:
    bad = {2}
    driver = TestDriver(build(bad))
    send(driver, "a", 1, 2, 3, 4)
    driver.run()
    first = replay(driver, replay_id="r1")  # not fixed yet
    driver.run()
    assert dead(driver, "a")[3:] == [(2, "ValueError"), (3, "Parked"), (4, "Parked")]
    assert "in replay r1" in driver.dead_letters()[-1].error_message
    send(driver, "a", 5)  # a new record while the key is parked again
    driver.run()
    assert outputs(driver, "a") == [1]
    bad.clear()
    second = replay(driver, replay_id="r2")  # everything: the originals, r1's copies, 5
    driver.run()
    assert (first.replayed, second.replayed) == (3, 7)
    assert outputs(driver, "a") == [1, 2, 3, 4, 5]
    assert driver.stats["work"].duplicates == 3  # r1's copies of 2, 3, 4


def test_a_stale_replay_does_not_unpark_a_key_parked_by_a_later_one() -> None:
    bad = {2}
    driver = TestDriver(build(bad))
    send(driver, "a", 2)
    driver.run()
    replay(driver, replay_id="r2")
    driver.run()  # fails again: parked under r2
    bad.clear()
    codec = driver.pipeline.schemas.codec("t.Event")
    stale = dlq.replay_headers([(SEQ_HEADER, encode_seq(99))], replay_id="r1", stage="work")
    driver.send_raw(b"a", codec.encode({"id": "a", "n": 9}), stale, stage="work")
    driver.run()
    assert outputs(driver, "a") == []
    assert dead(driver, "a")[-1] == (9, "Parked")


def test_a_record_replayed_to_another_stage_is_parked_like_a_new_one() -> None:
    driver = TestDriver(build({2}))
    send(driver, "a", 2)
    driver.run()
    codec = driver.pipeline.schemas.codec("t.Event")
    upstream = dlq.replay_headers([(ID_HEADER, b"e9")], replay_id=new_replay_id(), stage="up")
    driver.send_raw(b"a", codec.encode({"id": "a", "n": 9}), upstream, stage="work")
    driver.run()
    assert dead(driver, "a") == [(2, "ValueError"), (9, "Parked")]


def test_park_entries_restore_and_tombstone_through_the_changelog() -> None:
    table = PartitionTable(0, {}, DedupPolicy(ttl=1, max_ids=10))
    park = Park("", "p.in", 0, 7, "ValueError")
    table.park(b"k", park.encode())
    table.remember_replayed(b"s-id", 5)
    restored = PartitionTable(0, {}, DedupPolicy(ttl=1, max_ids=10))
    for key, value in table.take_dirty().items():
        restored.apply(key, value, 0)
    assert Park.decode(restored.parked(b"k") or b"") == park
    assert restored.was_replayed(b"s-id") and not restored.was_replayed(b"other")
    table.unpark(b"k")
    for key, value in table.take_dirty().items():
        restored.apply(key, value, 0)
    assert restored.parked(b"k") is None


def test_dead_letters_by_class_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    driver = TestDriver(build({2}))
    send(driver, "a", 2, 3)
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime.handler"):
        driver.run()
    assert "dead letters by error class: ValueError=1 (1 in all)" in caplog.text


# -- headers across cycles, a non-retriable error ---------------------------------------


def test_headers_do_not_grow_across_dead_letter_and_replay_cycles() -> None:
    driver = TestDriver(build({2}, park=False))
    driver.send_raw(b"a", driver.pipeline.schemas.codec("t.Event").encode({"id": "a", "n": 2}),
                    [(SEQ_HEADER, encode_seq(1)), ("trace-id", b"t1")])  # fmt: skip
    driver.run()
    sizes = []
    for _ in range(3):
        sizes.append(len(driver.dead_letters()[-1].headers))
        last = driver.records("p.work.dlq")[-1]
        run = Replay("work", "p.in", Where())
        item = run.offer(DeadLetterRecord.of(last))
        assert item is not None
        assert not any(k.startswith("dlq.") and k not in (dlq.REPLAYED, dlq.REPLAYED_STAGE)
                       for k, _ in item.headers)  # fmt: skip
        driver.send_raw(item.key, item.value, item.headers)
        driver.run()
    headers = driver.records("p.work.dlq")[-1].headers
    assert sizes == [sizes[0]] * 3 and len(headers) == sizes[0]
    assert [k for k, _ in headers][:2] == [SEQ_HEADER, "trace-id"]


def test_stage_error_non_retriable_then_fixed_replay_reaches_the_output() -> None:
    store = SchemaStore()
    store.add(SCHEMA)
    broken = [True]

    @stage(input="t.Event", output="t.Event", on_dead_letter=DeadLetterPolicy.park())
    def work(event: dict[str, Any]) -> dict[str, Any]:
        if broken[0]:
            raise StageError("downstream is down", retriable=False)
        return event

    driver = TestDriver(Pipeline("p", source="p.in", key="id", schemas=store) | work)
    send(driver, "a", 1, 2)
    driver.run()
    assert dead(driver, "a") == [(1, "StageError"), (2, "Parked")]
    broken[0] = False
    replay(driver)
    driver.run()
    assert outputs(driver, "a") == [1, 2]
