"""Positions gone from the log stop a stage (or skip on, counted); fences always stop it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pipeline import (
    FencedError,
    OffsetOutOfRangeError,
    OffsetReset,
    Pipeline,
    SchemaStore,
    stage,
)
from pipeline.errors import BrokerError, ConfigError
from pipeline.runtime.offsets import out_of_range
from pipeline.runtime.transport import Batching
from pipeline.runtime.worker import StageWorker
from pipeline.testing import TestDriver
from pipeline.testing.memory import MemoryBroker, MemoryTransport

SCHEMA = {
    "type": "record",
    "name": "t.Event",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
}


def one_stage() -> Pipeline:
    store = SchemaStore()
    store.add(SCHEMA)

    @stage(input="t.Event", output="t.Event")
    def keep(event: dict[str, Any]) -> dict[str, Any]:
        return event

    return Pipeline("p", source="p.in", key="id", schemas=store) | keep


def stopped_stage_then_deleted(reset: OffsetReset) -> TestDriver:
    """5 records handled and committed, 5 more published, then offsets 0..7 deleted."""
    driver = TestDriver(one_stage(), offset_reset=reset)
    for n in range(5):
        driver.send({"id": "k", "n": n})
    driver.run()
    for n in range(5, 10):
        driver.send({"id": "k", "n": n})
    [rec] = driver.records("p.in")[:1]
    assert driver.broker.delete_records("p.in", rec.partition, 8) == 8
    return driver


def test_a_position_below_the_log_start_stops_the_stage_by_default() -> None:
    driver = stopped_stage_then_deleted(OffsetReset.fail())
    with pytest.raises(OffsetOutOfRangeError) as caught:
        driver.run()
    err = caught.value
    assert (err.position, err.start, err.end, err.lost) == (5, 8, 10, 3)
    text = str(err)
    assert "below the log start 8: 3 records were deleted" in text
    assert "--offset-reset earliest" in text and "stopped without skipping" in text
    assert [v["n"] for v in driver.outputs()] == [0, 1, 2, 3, 4]


def test_earliest_skips_exactly_the_deleted_records_and_counts_them() -> None:
    driver = stopped_stage_then_deleted(OffsetReset.earliest())
    stats = driver.run()["keep"]
    assert [v["n"] for v in driver.outputs()] == [0, 1, 2, 3, 4, 8, 9]
    assert stats.skipped == 3


def test_latest_skips_to_the_end_and_counts_it() -> None:
    driver = stopped_stage_then_deleted(OffsetReset.latest())
    stats = driver.run()["keep"]
    assert [v["n"] for v in driver.outputs()] == [0, 1, 2, 3, 4]
    assert stats.skipped == 5


def test_past_the_end_says_so() -> None:
    err = out_of_range("t", 2, position=50, start=0, end=20, group="g")
    assert "past the log end 20" in str(err) and err.lost == 0
    assert OffsetReset.earliest().seek_to(err) == (0, 0)


def test_offset_reset_parses_the_cli_words() -> None:
    assert OffsetReset.parse(" Latest ") == OffsetReset.latest()
    with pytest.raises(ConfigError, match="fail, earliest or latest"):
        OffsetReset.parse("smallest")


class FencedOnRevoke(MemoryTransport):
    """A transport whose commits fail as a fenced producer's would, once ``fenced`` is set."""

    fenced = False

    async def commit(self, offsets: Any, state: Any, metadata: Any = None) -> set[int]:
        if self.fenced:
            raise FencedError("another instance took over partition 0 (test)", partition=0)
        return await super().commit(offsets, state, metadata)


class FailsToClaim(MemoryTransport):
    """A transport whose partition take-over fails once ``broken`` is set."""

    broken = False

    async def claim(self, partition: int) -> None:
        if self.broken:
            raise BrokerError("starting a transactional producer: timed out", partition=partition)


@pytest.mark.parametrize(
    ("transport_type", "exactly_once", "error", "match"),
    [
        (FencedOnRevoke, True, FencedError, "took over"),
        (FailsToClaim, False, BrokerError, "transactional producer"),
    ],
)
async def test_an_error_in_a_rebalance_callback_stops_the_worker(
    transport_type: type[Any], exactly_once: bool, error: type[Exception], match: str
) -> None:
    """aiokafka logs and swallows errors raised in rebalance callbacks; the worker must not
    go on with stale or half-built state but stop with the error. Under exactly-once the
    revocation commits the positions again, so a zombie meets its fence there."""
    pipeline = one_stage()
    node = pipeline.nodes()[0]
    broker = MemoryBroker()
    for topic in (node.input_topic, node.output_topic, node.dlq_topic, node.state_topic):
        assert topic is not None
        broker.create_topic(topic, 1)
    transport = transport_type(
        broker, group=node.group, input_topic=node.input_topic, state_topic=node.state_topic
    )
    worker = StageWorker(node, pipeline.schemas, transport, exactly_once=exactly_once)
    codec = pipeline.schemas.codec("t.Event")
    broker.produce(
        node.input_topic, b"k", codec.encode({"id": "k", "n": 1}), [("seq", b"\0" * 7 + b"\1")]
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(5):
        while True:  # until the record is handled and committed
            await asyncio.sleep(0.005)
            if not broker.lag(node.group, node.input_topic):
                break
    transport.fenced = transport.broken = True
    await transport.rebalance([0])  # revoke, then assign again
    with pytest.raises(error, match=match):
        async with asyncio.timeout(5):
            await task
    assert worker.stats.state == "failed"
    assert worker.table.partitions == {}  # no state kept, none restored after the fence


def one_partition(node: Any, transport: type[MemoryTransport]) -> tuple[MemoryBroker, Any]:
    """A memory broker with the stage's topics (one partition each), and a ``transport`` on
    it for the stage."""
    broker = MemoryBroker()
    for topic in (node.input_topic, node.output_topic, node.dlq_topic, node.state_topic):
        assert topic is not None
        broker.create_topic(topic, 1)
    return broker, transport(
        broker, group=node.group, input_topic=node.input_topic, state_topic=node.state_topic
    )


class BrokerDownForCommits(MemoryTransport):
    """A transport whose next ``failures`` commits fail as they do while no broker answers
    (past the client's own retries): nothing of them is written."""

    failures = 0

    async def commit(self, offsets: Any, state: Any, metadata: Any = None) -> set[int]:
        if self.failures:
            self.failures -= 1
            raise BrokerError("writing records: timed out (KafkaTimeoutError)", retriable=True)
        return await super().commit(offsets, state, metadata)

    def discard(self, partition: int) -> None:
        self._pending = []  # what the failed commit had buffered is gone, as in Kafka

    async def rewind(self, partition: int) -> None:
        if self.failures:  # the broker is still down: so is the committed offset
            self.failures -= 1
            raise BrokerError("reading the committed offset: no broker", retriable=True)
        await super().rewind(partition)


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_commit_failing_while_the_broker_is_down_does_not_stop_the_worker(
    concurrency: int,
) -> None:
    """A retriable broker error out of a commit (the broker stayed down past the client's
    retries): the worker drops what it had not committed, waits, reads the partition again
    from its committed offset with its state restored: every record once, none lost."""
    store = SchemaStore()
    store.add(SCHEMA)

    @stage(input="t.Event", output="t.Event", concurrency=concurrency)
    async def keep(event: dict[str, Any]) -> dict[str, Any]:
        return event

    pipeline = Pipeline("p", source="p.in", key="id", schemas=store) | keep
    node = pipeline.nodes()[0]
    broker, transport = one_partition(node, BrokerDownForCommits)
    worker = StageWorker(node, pipeline.schemas, transport)
    codec = pipeline.schemas.codec("t.Event")

    def send(n: int) -> None:
        seq = n.to_bytes(8, "big")
        broker.produce(
            node.input_topic,
            f"k{n % 3}".encode(),
            codec.encode({"id": f"k{n % 3}", "n": n}),
            [("seq", seq)],
        )

    async def drained() -> None:
        async with asyncio.timeout(10):
            while broker.lag(node.group, node.input_topic):  # noqa: ASYNC110 (polls the log)
                await asyncio.sleep(0.005)

    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    for n in range(1, 11):
        send(n)
    await drained()
    transport.failures = 3  # the next commit and two attempts to read its offset fail
    for n in range(11, 31):
        send(n)
    await drained()
    stop.set()
    stats = await task
    out = [codec.decode(r.value)["n"] for r in broker.records(node.output_topic)]
    assert sorted(set(out)) == list(range(1, 31)), out  # nothing lost
    assert len(out) == 30, "a record whose commit failed was written twice"
    assert stats.recoveries == 1
    assert stats.duplicates == 0, "the state of records never committed was kept"


class SlowCommits(MemoryTransport):
    """A transport whose commits take ``delay`` seconds (a busy broker's round trips)."""

    delay = 0.3
    started = 0

    async def commit(self, offsets: Any, state: Any, metadata: Any = None) -> set[int]:
        self.started += 1
        await asyncio.sleep(self.delay)
        return await super().commit(offsets, state, metadata)


@pytest.mark.parametrize("overlap_ms", [5000, 20])
async def test_batches_pass_a_young_commit_and_wait_for_an_old_one(overlap_ms: int) -> None:
    """Inline: a batch handled while the last commit runs joins the next commit instead of
    waiting for it, while that commit is younger than ``commit_overlap_ms``: the next batch
    is handled at once. Older, the worker waits for it. Either way everything is committed."""
    store = SchemaStore()
    store.add(SCHEMA)
    handled: list[float] = []

    @stage(input="t.Event", output="t.Event")
    def keep(event: dict[str, Any]) -> dict[str, Any]:
        handled.append(asyncio.get_running_loop().time())
        if event["n"] == 1:
            time.sleep(0.05)  # a slow batch: blocks the loop (and the commit in flight)
        return event

    pipeline = Pipeline("p", source="p.in", key="id", schemas=store) | keep
    node = pipeline.nodes()[0]
    broker, transport = one_partition(node, SlowCommits)
    batching = Batching(fetch_wait_ms=1, commit_overlap_ms=overlap_ms)
    worker = StageWorker(node, pipeline.schemas, transport, batching=batching)
    codec = pipeline.schemas.codec("t.Event")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(10):
        for n in range(3):  # three batches, one record each, each sent once the last is handled
            broker.produce(node.input_topic, b"k", codec.encode({"id": "k", "n": n}))
            while len(handled) <= n:  # noqa: ASYNC110 (polls the stage)
                await asyncio.sleep(0.001)
        while broker.lag(node.group, node.input_topic):  # noqa: ASYNC110 (polls the log)
            await asyncio.sleep(0.005)
    stop.set()
    await task
    first_to_third = handled[2] - handled[0]
    if overlap_ms > 1000:  # the third batch did not wait for the first batch's commit
        assert first_to_third < SlowCommits.delay / 2, handled
    else:  # the first commit was older than 20 ms after the slow batch: that batch waited
        assert first_to_third >= SlowCommits.delay * 0.9, handled
    assert len(broker.records(node.output_topic)) == 3
    assert broker.committed(node.group, node.input_topic) == {0: 3}
