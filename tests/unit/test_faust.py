"""The Faust runtime (pipeline.faust) without a broker: the app it builds, and the record path
inside an agent (what one event writes, when it is acknowledged). Against the real broker:
the conformance tests' faust runs and the demo with Faust stages (tests/integration)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline import DefinitionError, Pipeline, RetryPolicy, SchemaStore, StageError, stage
from pipeline.errors import ConfigError
from pipeline.faust import FaustOptions, FaustStage, faust_app
from pipeline.priority import Priority
from pipeline.record import ID_HEADER, SEQ_HEADER, WRITER_HEADER, encode_seq
from pipeline.runtime import deadletter as dlq
from pipeline.runtime.state import SEQ_PREFIX
from pipeline.security import Connection, Security

SCHEMA = {
    "type": "record",
    "name": "f.Event",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
}


@stage(input="f.Event", output="f.Event", retry=RetryPolicy(2, 0.001, jitter=0))
def bump(event: dict[str, Any]) -> dict[str, Any]:
    if event["n"] < 0:
        raise StageError("negative", retriable=False)
    return {**event, "n": event["n"] + 1}


def build(source: Any = "p.in") -> Pipeline:
    store = SchemaStore()
    store.add(SCHEMA)
    return Pipeline("p", source=source, key="id", schemas=store) | bump


def test_one_stage_app_uses_the_stage_group_and_creates_no_topics_of_its_own() -> None:
    app = faust_app(build(), ["bump"], "127.0.0.1:9092", options=FaustOptions(commit_interval=2))
    assert app.conf.id == "p.bump"  # the stage's consumer group: offsets and lag are the stage's
    assert app.conf.topic_allow_declare is False
    assert app.conf.topic_disable_leader is True
    assert app.conf.broker_commit_interval == 2
    assert [a.name for a in app.agents.values()] == ["pipeline.bump"]
    [service] = [app.pipeline_stages]
    assert [s.node.input_topic for s in service.stages] == ["p.in"]


def test_each_priority_lane_is_an_agent_of_its_own() -> None:
    app = faust_app(build(Priority({"p.hi": 3, "p.lo": 1})), ["bump"], "127.0.0.1:9092")
    assert sorted(a.name for a in app.agents.values()) == [
        "pipeline.bump[p.hi]",
        "pipeline.bump[p.lo]",
    ]


def test_bad_arguments_are_refused_with_what_to_do() -> None:
    with pytest.raises(DefinitionError, match="nope"):
        faust_app(build(), ["nope"], "127.0.0.1:9092")
    with pytest.raises(ConfigError, match="at least one stage"):
        faust_app(build(), [], "127.0.0.1:9092")
    secure = Connection("127.0.0.1:9093", Security(protocol="SASL_SSL", username="u", password="p"))
    with pytest.raises(ConfigError, match="add_to"):
        faust_app(build(), ["bump"], secure)
    with pytest.raises(ConfigError, match="must be > 0"):
        FaustOptions(commit_interval=0)


class Owner:
    """Stands in for FaustStages: topic sizes, and what the stage asks it to deliver."""

    def __init__(self) -> None:
        self.partitions = {"p.in": 3, "p.bump": 3, "p.bump.dlq": 3, "p.bump.state": 3}
        self.delivered: list[tuple[list[Any], Any]] = []

    async def deliver(self, sends: list[Any], event: Any) -> None:
        self.delivered.append((sends, event))


class Event:
    def __init__(self, value: bytes, offset: int, headers: Sequence[tuple[str, bytes]]) -> None:
        self.message = SimpleNamespace(
            topic="p.in", partition=1, offset=offset, timestamp=1700000000.5, key=b"k",
            value=value, headers=headers,
        )  # fmt: skip
        self.acked = False

    def ack(self) -> bool:
        self.acked = True
        return True


def event(p: Pipeline, n: int, seq: int, offset: int) -> Event:
    headers = [(SEQ_HEADER, encode_seq(seq)), (WRITER_HEADER, b"w1"), (ID_HEADER, b"e%d" % seq)]
    return Event(p.schemas.codec("f.Event").encode({"id": "k", "n": n}), offset, headers)


async def test_an_event_writes_output_and_state_then_waits_for_delivery_to_be_acked() -> None:
    p, owner = build(), Owner()
    s = FaustStage(owner, p, p.nodes()[0])  # type: ignore[arg-type]
    s.handler.output.keep_partition = True
    s.table.open(1)  # restored (reading the changelog needs a broker)
    first = event(p, 1, seq=1, offset=10)
    await s.handle(first)
    [(sends, acked_later)] = owner.delivered
    assert acked_later is first and not first.acked  # acked by the owner once durable
    topics = [send[0] for send in sends]
    assert topics == ["p.bump", "p.bump.state"]
    out = sends[0]
    assert (out[1], out[2], out[5]) == (1, b"k", 1700000000500)  # partition, key, ms
    assert p.schemas.codec("f.Event").decode(out[3]) == {"id": "k", "n": 2}
    assert dict(out[4])[SEQ_HEADER] == encode_seq(1)  # headers travel on
    assert sends[1][2] == SEQ_PREFIX + b"k"  # the dedup entry, in the framework's format

    again = event(p, 1, seq=1, offset=11)  # a retransmission: nothing written, acked at once
    await s.handle(again)
    assert again.acked and len(owner.delivered) == 1
    assert (s.stats.consumed, s.stats.processed, s.stats.duplicates) == (2, 1, 1)


async def test_a_failing_record_goes_to_the_stage_dead_letter_topic_with_dlq_headers() -> None:
    p, owner = build(), Owner()
    s = FaustStage(owner, p, p.nodes()[0])  # type: ignore[arg-type]
    s.table.open(1)
    await s.handle(event(p, -5, seq=1, offset=42))
    [(sends, _)] = owner.delivered
    dead = next(send for send in sends if send[0] == "p.bump.dlq")
    headers = dict(dead[4])
    assert headers[dlq.ERROR_CLASS] == b"StageError"
    assert headers[dlq.STAGE] == b"bump"
    assert (headers[dlq.TOPIC], headers[dlq.PARTITION], headers[dlq.OFFSET]) == (
        b"p.in", b"1", b"42",
    )  # fmt: skip
    assert p.schemas.codec("f.Event").decode(dead[3]) == {"id": "k", "n": -5}  # bytes untouched
    assert not any(send[0] == "p.bump" for send in sends)
    assert s.stats.dead_letters == 1
