"""stages.window on the TestDriver: event-time tumbling windows closed by the watermark."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import DefinitionError, Pipeline, SchemaStore, TopicPolicy
from pipeline.runtime.kafka import partition_for
from pipeline.testing import TestDriver
from stages import WindowResult, filter_stage, tumbling_window
from stages.window import CHUNK

SCHEMAS = SchemaStore.from_directory(Path(__file__).parent / "schemas_stages")
EVENT, COUNT = "stages.test.Event", "stages.test.Count"
MIN = 60_000


def driver_for(stage: Any, partitions: int = 1) -> TestDriver:
    p = Pipeline("w", source="w.in", key="id", schemas=SCHEMAS, topics=TopicPolicy(partitions))
    return TestDriver(p | stage)


def send_at(driver: TestDriver, key: str, ts: int, amount: float = 1.0, **kw: Any) -> None:
    driver.broker.clock = lambda: ts  # the record's Kafka timestamp is its event time
    driver.send({"id": key, "n": ts, "amount": amount}, **kw)


def results(driver: TestDriver) -> list[tuple[bytes | None, dict[str, Any]]]:
    codec = SCHEMAS.codec(COUNT)
    return [(r.key, codec.decode(r.value)) for r in driver.records("w.per_min")]


def per_min(**kw: Any) -> Any:
    return tumbling_window("per_min", size=60, input=EVENT, output=COUNT, sum_field="amount", **kw)


def test_a_later_record_of_any_key_closes_the_window() -> None:
    counts: Counter[str] = Counter()
    driver = driver_for(per_min(counts=counts))
    send_at(driver, "k1", 0, 1.0)
    send_at(driver, "k1", 10_000, 2.0)
    send_at(driver, "k2", 30_000, 5.0)
    send_at(driver, "k1", MIN - 1, 1.5)  # still the first window
    driver.run()
    assert results(driver) == []  # nothing has passed the window's end yet
    send_at(driver, "k2", MIN, 7.0)  # reaches the end: window [0, 60s) closes
    stats = driver.run()["per_min"]
    assert results(driver) == [
        (b"k1", {"key": "k1", "window_start": 0, "window_end": MIN, "count": 3, "sum": 4.5}),
        (b"k2", {"key": "k2", "window_start": 0, "window_end": MIN, "count": 1, "sum": 5.0}),
    ]
    assert (stats.consumed, stats.produced, stats.filtered) == (5, 2, 4)
    assert counts == Counter({"windows": 2})
    # Closed windows leave no state behind; the open one (k2 @ 60s) is kept.
    assert driver.state("per_min", "k1") is None
    assert driver.state("per_min", "k2") == {str(MIN): [1, 7.0]}


def test_grace_keeps_windows_open_for_late_records_then_drops_later_ones() -> None:
    counts: Counter[str] = Counter()
    driver = driver_for(per_min(grace=10, counts=counts))
    send_at(driver, "a", 5_000)
    send_at(driver, "a", 65_000)  # past the end, within the grace: window 0 stays open
    send_at(driver, "a", 55_000)  # late but within grace: still counted in window 0
    send_at(driver, "b", 70_000)  # end + grace reached: window 0 closes
    send_at(driver, "a", 50_000)  # window 0 is closed: too late
    stats = driver.run()["per_min"]
    assert [(k, v["window_start"], v["count"]) for k, v in results(driver)] == [(b"a", 0, 2)]
    assert counts == Counter({"windows": 1, "late": 1})
    assert (stats.filtered, stats.processed, stats.dead_letters) == (4, 1, 0)


def test_open_windows_survive_a_restart() -> None:
    driver = driver_for(per_min())
    for ts in (1_000, 2_000, 3_000):
        send_at(driver, "k", ts, 2.0)
    driver.run()  # this worker stops with the window open
    send_at(driver, "other", 4_000, 1.0)
    send_at(driver, "k", MIN + 1, 1.0)
    stats = driver.run()["per_min"]  # a fresh worker, its table restored from the changelog
    assert stats.restored > 0
    assert [(k, v["count"], v["sum"]) for k, v in results(driver)] == [
        (b"k", 3, 6.0),
        (b"other", 1, 1.0),
    ]


def test_a_redelivered_record_is_not_counted_twice() -> None:
    driver = driver_for(per_min())
    send_at(driver, "k", 1_000, seq=1, event_id=b"e1")
    send_at(driver, "k", 1_000, seq=1, event_id=b"e1")  # the same event again
    send_at(driver, "k", MIN, seq=2)
    stats = driver.run()["per_min"]
    assert [v["count"] for _, v in results(driver)] == [1]
    assert stats.duplicates == 1


def test_watermarks_are_per_partition() -> None:
    keys = [f"key{i}" for i in range(20)]
    a = next(k for k in keys if partition_for(k.encode(), 3) == 0)
    b = next(k for k in keys if partition_for(k.encode(), 3) == 1)
    driver = driver_for(per_min(), partitions=3)
    send_at(driver, a, 1_000)
    send_at(driver, b, 10 * MIN)  # another partition: does not close a's window
    driver.run()
    assert results(driver) == []
    send_at(driver, a, MIN)
    driver.run()
    assert [(k, v["window_start"]) for k, v in results(driver)] == [(a.encode(), 0)]


def test_many_keys_span_several_index_chunks() -> None:
    n = CHUNK * 2 + 10
    driver = driver_for(per_min())
    for i in range(n):
        send_at(driver, f"k{i}", i, float(i))
    send_at(driver, "late", 2 * MIN)  # closes window 0 for all n keys
    driver.run()
    got = results(driver)
    assert len(got) == n
    assert [k for k, _ in got] == [f"k{i}".encode() for i in range(n)]  # arrival order
    assert all(v["count"] == 1 and v["sum"] == float(i) for i, (_, v) in enumerate(got))
    assert all(driver.state("per_min", f"k{i}") is None for i in range(0, n, 37))


def test_results_can_be_shaped() -> None:
    def shape(r: WindowResult) -> dict[str, Any]:
        return {**r.as_dict(), "key": r.key.decode().upper(), "sum": -1.0}

    stage = tumbling_window("per_min", size=60, input=EVENT, output=COUNT, result=shape)
    driver = driver_for(stage)
    send_at(driver, "k", 0)
    send_at(driver, "k", MIN)
    driver.run()
    [(_, value)] = results(driver)
    assert (value["key"], value["sum"], value["count"]) == ("K", -1.0, 1)


def test_unshaped_results_must_match_the_output_schema() -> None:
    stage = tumbling_window("per_min", size=60, input=EVENT, output=COUNT)  # no sum
    driver = driver_for(stage)
    send_at(driver, "k", 0)
    send_at(driver, "k", MIN)
    driver.run()
    [dead] = driver.dead_letters()
    assert dead.error_class == "EncodeError" and "sum" in dead.error_message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size must be > 0"),
        ({"size": "1m"}, "size must be a number"),
        ({"size": 0.0001}, "size in milliseconds"),
        ({"size": 60, "grace": -1}, "grace must be >= 0"),
        ({"size": 60, "sum_field": ""}, "field '' must be"),
        ({"size": 60, "result": "as_dict"}, "result must be callable"),
    ],
)
def test_bad_definitions_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        tumbling_window("w", input=EVENT, output=COUNT, **kwargs)


def test_two_windows_of_a_key_closed_at_once_both_reach_the_next_stage() -> None:
    p = Pipeline("w", source="w.in", key="id", schemas=SCHEMAS, topics=TopicPolicy(1))
    p = p | per_min(grace=120) | filter_stage("next", lambda v: True, schema=COUNT)
    driver = TestDriver(p)
    send_at(driver, "a", 1_000)
    send_at(driver, "a", MIN + 1_000)  # a second window of 'a' while the first is open
    send_at(driver, "b", 5 * MIN)  # closes both at once
    stats = driver.run()
    assert stats["per_min"].produced == 2
    got = [(v["key"], v["window_start"]) for v in driver.outputs("next")]
    assert got == [("a", 0), ("a", MIN)]  # neither taken for a duplicate of the other
    assert stats["next"].duplicates == 0
    ids = [r.header("event-id") for r in driver.records("w.per_min")]
    assert ids == [b"0/a", b"60000/a"]
