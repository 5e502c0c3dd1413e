"""The in-memory TestDriver: a whole pipeline, dedup, retries on virtual time, dead letters."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline import EncodeError, Pipeline, RetryPolicy, SchemaStore, stage
from pipeline.record import Record
from pipeline.testing import TestDriver

SCHEMA = {
    "type": "record",
    "name": "t.Event",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
}


def build() -> Pipeline:
    store = SchemaStore()
    store.add(SCHEMA)

    @stage(input="t.Event", output="t.Event", retry=RetryPolicy(max_attempts=3, jitter=0))
    def inc(event: dict[str, Any], record: Record) -> dict[str, Any]:
        record.state.set(record.state.get(0) + 1)
        if event["n"] == 3:
            raise ValueError("three is poison")
        return {**event, "n": event["n"] + 1}

    @stage(input="t.Event", output="t.Event")
    def double_evens(event: dict[str, Any]) -> dict[str, Any] | None:
        return None if event["n"] % 2 else {**event, "n": event["n"] * 2}

    return Pipeline("p", source="p.in", key="id", schemas=store) | inc | double_evens


def test_pipeline_runs_end_to_end_in_memory() -> None:
    driver = TestDriver(build())
    for n in range(6):
        driver.send({"id": f"k{n % 2}", "n": n})
    stats = driver.run()
    assert sorted(v["n"] for v in driver.outputs()) == [4, 12]  # 1->2->4, 5->6->12
    assert sorted(v["n"] for v in driver.outputs("inc")) == [1, 2, 3, 5, 6]  # 3 died
    inc, dbl = stats["inc"], stats["double_evens"]
    assert (inc.consumed, inc.produced, inc.dead_letters) == (6, 5, 1)
    assert (dbl.consumed, dbl.produced, dbl.filtered) == (5, 2, 3)
    for s in (inc, dbl):
        assert s.consumed == s.processed + s.filtered + s.duplicates + s.dead_letters


def test_retries_wait_on_virtual_time_then_dead_letter() -> None:
    driver = TestDriver(build())
    driver.send({"id": "k", "n": 3})
    driver.run()
    assert driver.clock.waits == [0.1, 0.2]  # two retries, no real sleeping
    [dead] = driver.dead_letters("inc")
    assert (dead.error_class, dead.attempts, dead.value) == ("ValueError", 3, {"id": "k", "n": 3})
    assert "three is poison" in dead.error_message


def test_retransmitted_event_is_dropped_once_and_counted() -> None:
    driver = TestDriver(build())
    first = driver.send({"id": "k", "n": 1}, seq=7)
    driver.send({"id": "k", "n": 1}, seq=7)  # the same event again
    driver.broker.produce(first.topic, first.key, first.value, first.headers)  # and again
    stats = driver.run()
    assert stats["inc"].duplicates == 2
    assert driver.outputs() == [{"id": "k", "n": 4}]


def test_poison_bytes_are_dead_lettered_untouched() -> None:
    driver = TestDriver(build())
    driver.send_raw(b"k", b"\x00garbage")
    driver.run()
    [dead] = driver.dead_letters()
    assert (dead.raw, dead.error_class, dead.attempts) == (b"\x00garbage", "DecodeError", 0)


def test_state_survives_runs_through_the_changelog() -> None:
    driver = TestDriver(build())
    driver.send({"id": "k", "n": 0})
    driver.run()
    driver.send({"id": "k", "n": 4})
    driver.run()  # a fresh worker: the count is restored from the changelog
    assert driver.state("inc", "k") == 2


def test_invalid_values_are_refused_at_send() -> None:
    driver = TestDriver(build())
    with pytest.raises(EncodeError, match="n"):
        driver.send({"id": "k", "n": "x"})
    with pytest.raises(EncodeError):
        driver.send({"n": 1})
