"""Broker trouble told once per episode; a stage with no broker says so; topics replicated
by the cluster's size and checked; a publish returns only once its record is durable."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from pipeline import DefinitionError, Publisher, SchemaStore, TopicPolicy
from pipeline.errors import TopicError
from pipeline.runtime.connectivity import BrokerEpisodes, Connectivity
from pipeline.runtime.topics import TopicSpec, _check


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("aiokafka", level, __file__, 1, msg, (), None)


def test_a_broker_outage_is_one_line_then_counted_then_one_line_when_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    episodes = BrokerEpisodes(quiet=5, clock=clock)
    episodes.starting = False  # the stages run: this is trouble
    storm = [
        "Unable connect to node with id 1: [Errno 111] Connect call failed",
        "Failed fetch messages from 1: NodeNotReadyError",
        "Got error produce response: NodeNotReadyError",
        'Unable connect to "127.0.0.1:9092": [Errno 111]',
    ] * 50
    passed = []
    for msg in storm:
        clock.now += 0.01
        rec = record(msg)
        if episodes.filter(rec):
            passed.append(rec)
    assert len(passed) == 1 and episodes.errors == 200 and episodes.episodes == 1
    assert passed[0].levelname == "WARNING"
    assert "Kafka broker trouble: Unable connect" in passed[0].getMessage()
    assert "retrying" in passed[0].getMessage()
    # Anything else aiokafka says still passes untouched.
    other = record("Some other aiokafka message", logging.WARNING)
    assert episodes.filter(other) and other.getMessage() == "Some other aiokafka message"
    episodes.tick()
    assert episodes.open  # not quiet for long enough yet
    clock.now += 5
    with caplog.at_level(logging.WARNING, "pipeline.broker"):
        episodes.tick()
    assert not episodes.open
    assert "trouble over after 2.0s (200 broker errors retried)" in caplog.text
    assert episodes.filter(record("Unable connect to node with id 2"))  # a new episode
    assert episodes.episodes == 2


def test_while_starting_a_coordinator_not_there_yet_is_not_trouble(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fresh broker answers GroupCoordinatorNotAvailable until its offsets topic exists:
    before the stages run, that is said at INFO (dropped where aiokafka logs at WARNING)."""
    clock = Clock()
    episodes = BrokerEpisodes(quiet=5, clock=clock)
    rec = record("Group Coordinator Request failed: [Error 15] GroupCoordinatorNotAvailable")
    logging.getLogger("aiokafka").setLevel(logging.INFO)
    try:
        assert episodes.filter(rec)
        assert rec.levelname == "INFO" and "waiting for Kafka while starting" in rec.getMessage()
        logging.getLogger("aiokafka").setLevel(logging.WARNING)  # as `pipeline run` sets it
        assert not episodes.filter(record("GroupCoordinatorNotAvailable")), "counted, unseen"
    finally:
        logging.getLogger("aiokafka").setLevel(logging.NOTSET)
    assert episodes.errors == 2
    clock.now += 6
    with caplog.at_level(logging.INFO, logger="pipeline"):
        episodes.tick()  # the end of a start-up episode is no alarm either
    [end] = [r for r in caplog.records if "while starting" in r.getMessage()]
    assert end.levelname == "INFO"
    assert "2 transient broker errors while starting" in end.getMessage()


def test_install_attaches_to_every_aiokafka_logger() -> None:
    episodes = BrokerEpisodes.install()
    try:
        for name in ("aiokafka", "aiokafka.conn", "aiokafka.consumer.fetcher"):
            assert episodes in logging.getLogger(name).filters
    finally:
        episodes.uninstall()
    assert episodes not in logging.getLogger("aiokafka").filters


def test_no_broker_for_longer_than_the_limit_is_an_error_and_not_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, up = Clock(), [True]
    link = Connectivity("price", lambda: up[0], unreachable_after=30, clock=clock)
    assert link.check()
    up[0] = False
    with caplog.at_level(logging.WARNING, "pipeline.broker"):
        for _ in range(30):  # first seen down at the first check
            clock.now += 1
            assert link.check()  # a short blip is not worth a page
        clock.now += 1
        assert not link.check()
        clock.now += 60
        assert not link.check()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, "said once, not once a second"
        assert "stage price: no Kafka broker reachable for 30s" in errors[0].getMessage()
        up[0] = True
        assert link.check()
    assert "reachable again after 90s" in caplog.text


# -- TopicPolicy: replication by the cluster's size, and checked ---------------------------


@pytest.mark.parametrize(
    ("policy", "brokers", "replicas", "min_isr"),
    [
        (TopicPolicy(), 1, 1, 1),
        (TopicPolicy(), 2, 2, 2),
        (TopicPolicy(), 3, 3, 2),
        (TopicPolicy(), 6, 3, 2),
        (TopicPolicy(replication=2), 6, 2, 2),
        (TopicPolicy(replication=3, min_insync=3), 6, 3, 3),
    ],
)
def test_replication_follows_the_cluster(
    policy: TopicPolicy, brokers: int, replicas: int, min_isr: int
) -> None:
    assert policy.replicas_for(brokers) == replicas
    assert policy.min_insync_for(brokers) == min_isr
    spec = TopicSpec("t", "source", 3, policy.replication, min_insync=policy.min_insync)
    assert spec.topic_config(brokers)["min.insync.replicas"] == str(min_isr)


def test_a_policy_that_could_never_acknowledge_is_refused() -> None:
    with pytest.raises(DefinitionError, match=r"min_insync \(3\) cannot exceed replication \(2\)"):
        TopicPolicy(replication=2, min_insync=3)
    with pytest.raises(DefinitionError, match="replication must be at least 1"):
        TopicPolicy(replication=0)


def test_existing_topics_with_too_few_replicas_are_refused() -> None:
    auto = TopicSpec("p.in", "source", 3)
    _check([auto], {"p.in": (3, 3)}, brokers=3)
    _check([auto], {"p.in": (3, 3)}, brokers=2)  # a broker down: still enough
    with pytest.raises(
        TopicError,
        match=r"p.in \(source\) has 1 replica\(s\), but the pipeline "
        r"needs 3 on this cluster of 3 broker",
    ):
        _check([auto], {"p.in": (3, 1)}, brokers=3)
    fixed = TopicSpec("p.in", "source", 3, replication=2)
    with pytest.raises(TopicError, match=r"TopicPolicy\(replication=2\) asks for 2"):
        _check([fixed], {"p.in": (3, 3)}, brokers=3)
    with pytest.raises(TopicError, match="has 6 partitions, but the pipeline needs 3"):
        _check([auto], {"p.in": (6, 3)}, brokers=3)


# -- Publisher: durable on return, batches shared by overlapping calls ---------------------


class SlowWriter:
    """Stands in for the BatchWriter: each send is acknowledged 10 ms after it is dispatched,
    and records what it sent."""

    def __init__(self) -> None:
        self.buffer: list[Any] = []
        self.flushed: list[list[Any]] = []
        self.durable: set[Any] = set()

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    def append(self, topic: str, part: int, key: bytes, *rest: Any) -> None:
        self.buffer.append(key)

    def take(self) -> list[Any]:
        batch, self.buffer = self.buffer, []
        return batch

    async def dispatch(self, batch: list[Any]) -> list[asyncio.Task[None]]:
        async def acked() -> None:
            await asyncio.sleep(0.01)
            if batch:
                self.flushed.append(batch)
            self.durable.update(batch)

        return [asyncio.create_task(acked())]

    async def acknowledged(self, batch: list[Any], futures: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*futures)


async def test_publish_returns_once_its_record_is_durable_and_overlapping_calls_share() -> None:
    store = SchemaStore.from_directory(Path(__file__).parent / "schemas_worker")
    pub = Publisher("localhost:1", "orders", store.codec("test.worker.Order"), "order_id")
    writer = SlowWriter()
    pub._writer, pub._partitions = writer, 3  # type: ignore[assignment]

    async def one(i: int) -> None:
        stamp = await pub.publish({"order_id": f"o-{i}", "n": i, "amount": 1.0, "note": ""})
        assert stamp.key in writer.durable, f"publish {i} returned before its record was durable"

    await asyncio.gather(*(one(i) for i in range(200)))
    assert pub.sent == 200 and sum(map(len, writer.flushed)) == 200
    assert len(writer.flushed) <= 3, "overlapping publishes must share flushes"
    for i in range(5):  # one after another: each its own flush, each durable on return
        await one(1000 + i)
    assert len(writer.flushed) <= 8
