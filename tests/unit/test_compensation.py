"""Compensation without a broker: which stage a dead letter asks to undo its part, and what the
request carries (the compensations themselves run against Kafka: test_compensation.py)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline import DefinitionError, Pipeline, SchemaStore, StageError, stage
from pipeline.runtime import deadletter as dlq
from pipeline.runtime.compensation import request_id
from pipeline.testing import TestDriver

SCHEMA = {
    "type": "record",
    "name": "t.Step",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
}


def undo(value: dict[str, Any]) -> None:
    pass


def build() -> Pipeline:
    store = SchemaStore()
    store.add(SCHEMA)

    def passing(name: str, **kw: Any) -> Any:
        return stage(name, input="t.Step", output="t.Step", **kw)(lambda v: v)

    @stage(input="t.Step", output="t.Step")
    def last(v: dict[str, Any]) -> dict[str, Any]:
        if v["n"] == 13:
            raise StageError("thirteen", retriable=False)
        return v

    return (
        Pipeline("p", source="p.in", key="id", schemas=store)
        | passing("a", compensate=undo)
        | passing("b")  # nothing to undo
        | passing("c", compensate=undo)
        | last
    )


def test_each_stage_asks_the_nearest_earlier_stage_that_compensates() -> None:
    nodes = {n.name: n for n in build().nodes()}
    assert (nodes["a"].compensate_topic, nodes["a"].undo_topic) == ("p.a.compensate", None)
    assert (nodes["b"].compensate_topic, nodes["b"].undo_topic) == (None, "p.a.compensate")
    assert nodes["c"].undo_topic == "p.a.compensate"  # c's own requests pass on to a
    assert nodes["last"].undo_topic == "p.c.compensate"


def test_a_dead_letter_asks_for_compensation_with_its_bytes_and_error_headers() -> None:
    driver = TestDriver(build())
    sent = [driver.send({"id": f"k{n}", "n": n}) for n in (12, 13, 14)]
    driver.run()
    [ask] = driver.records("p.c.compensate")
    [dead] = driver.broker.records("p.last.dlq")
    assert (ask.key, ask.value, list(ask.headers)) == (dead.key, dead.value, list(dead.headers))
    assert ask.value == sent[1].value  # the original bytes
    assert ask.header(dlq.STAGE) == b"last" and ask.header(dlq.ERROR_CLASS) == b"StageError"
    assert request_id(ask.headers) == sent[1].header("event-id")
    assert driver.records("p.a.compensate") == []  # c passes it on once it has undone its part


def test_compensate_must_be_a_function() -> None:
    with pytest.raises(DefinitionError, match="compensate must be a function"):
        stage("s", input="t.Step", output="t.Step", compensate="nope")(lambda v: v)  # type: ignore[arg-type]
