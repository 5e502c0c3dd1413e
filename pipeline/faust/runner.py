"""The stages inside a Faust app: one agent per stage, the framework's record path inside it.

Each event goes through the framework's :class:`~pipeline.runtime.handler.RecordHandler`
(dedup, decode, call, retries, outputs, dead letters, job reports), exactly as in a framework
worker. What it writes (outputs, dead letters, changelog updates) is sent by the stages'
own idempotent producer (acks=all), and the event is acknowledged to Faust only once all of
it is durable: Faust commits an offset only past acknowledged events (it tracks gaps), so a
crash re-delivers what was not written and the dedup table drops what was.

The dedup state of input partition p lives in changelog partition p, in the framework's format:
it is read back the first time an event of p arrives after p was assigned, and dropped when p
is revoked.

What differs from a framework worker (see the README's Faust section): Faust commits on its
timer (``broker_commit_interval``) and rebalances its own way; at-least-once only (no
transactions); one record at a time per agent (``concurrency`` of the stage is not used); no
circuit breaker (records whose retries run out are dead-lettered at once), no crash-loop marks,
no priority-lane turns (each lane is an agent of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kerr
from mode import Service

from pipeline.dsl import Pipeline, StageNode
from pipeline.runtime.handler import RecordHandler
from pipeline.runtime.holds import Holds
from pipeline.runtime.kafka import partition_for, translate
from pipeline.runtime.kafka_transport import read_changelog
from pipeline.runtime.runner import write_stats
from pipeline.runtime.setup import enter_setup
from pipeline.runtime.state import MemoryStores, PartitionTable, StateTable, now_ms
from pipeline.runtime.stats import StageStats
from pipeline.runtime.topics import ensure_topics, stage_topic_specs
from pipeline.runtime.transport import Transport
from pipeline.security import Connection
from pipeline.stage import BreakerPolicy

log = logging.getLogger(__name__)

_Send = tuple[str, int, bytes | None, bytes | None, Sequence[tuple[str, bytes]], int | None]


class _Message:
    """A Faust consumer message as the record handler reads it (timestamp in ms)."""

    __slots__ = ("headers", "key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, message: Any) -> None:
        self.topic: str = message.topic
        self.partition: int = message.partition
        self.offset: int = message.offset
        stamp = message.timestamp
        self.timestamp = int(stamp * 1000) if stamp is not None else now_ms()
        self.key: bytes | None = message.key
        self.value: bytes | None = message.value
        self.headers: list[tuple[str, bytes]] = list(message.headers or ())


class _Outbox:
    """What the record handler writes for one event, until the agent sends it (the part of
    :class:`~pipeline.runtime.transport.Transport` the handler uses)."""

    def __init__(self, partitions: dict[str, int]) -> None:
        self.partitions = partitions
        self.pending: list[_Send] = []

    def partition_for(self, topic: str, key: bytes | None) -> int:
        return 0 if key is None else partition_for(key, self.partitions[topic])

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        timestamp: int | None,
        source: int,
    ) -> None:
        self.pending.append((topic, partition, key, value, headers, timestamp))

    def take(self) -> list[_Send]:
        pending, self.pending = self.pending, []
        return pending


class FaustStage:
    """One stage (or one priority lane of one) as a Faust agent.

    Attributes:
        node: The stage's node in the compiled pipeline.
        stats: Its counters (the same as a framework worker's).
    """

    def __init__(self, owner: FaustStages, pipeline: Pipeline, node: StageNode) -> None:
        self.owner = owner
        self.node = node
        self.stats = StageStats(node.label)
        self.outbox = _Outbox(owner.partitions)
        self.handler = RecordHandler(
            node, pipeline.schemas, cast(Transport, self.outbox), self.stats
        )
        self.handler.holds = Holds(BreakerPolicy.off())  # no pause: Faust owns the consumer
        self.table = StateTable(node.state_topic, node.stage.dedup, MemoryStores(), self.stats)
        self._restoring = asyncio.Lock()

    async def agent(self, stream: Any) -> None:
        """The Faust agent: every event through the record handler, acknowledged once what
        it wrote is durable."""
        async for event in stream.noack().events():
            await self.handle(event)

    async def handle(self, event: Any) -> None:
        msg = _Message(event.message)
        partition = msg.partition
        table = self.table.partitions.get(partition)
        if table is None:
            table = await self._restore(partition)
        await self.handler.handle_one(msg, table)
        if table.pending:
            state = self.node.state_topic
            for key, value in table.take_dirty().items():
                self.outbox.append(state, partition, key, value, (), None, partition)
        sends = self.outbox.take()
        if not sends:  # nothing written (a duplicate, a filtered record): nothing to wait for
            event.ack()
            return
        await self.owner.deliver(sends, event)

    async def _restore(self, partition: int) -> PartitionTable:
        async with self._restoring:
            table = self.table.partitions.get(partition)
            if table is not None:
                return table
            await self.owner.flush()  # this process's own changelog writes first
            began = time.monotonic()
            table, start = self.table.open(partition)
            count, now = 0, now_ms()
            async for batch in read_changelog(
                self.owner.connection, self.node.state_topic, partition, start,
                read_committed=False,
            ):  # fmt: skip
                table.apply_many(batch, now)
                count += len(batch)
            self.stats.restored += count
            self.stats.restore_seconds += time.monotonic() - began
            log.info(
                "stage %s (faust): restored partition %d from its changelog: %d records",
                self.node.label, partition, count,
            )  # fmt: skip
            return table

    def revoke(self, partitions: set[int]) -> None:
        for partition in partitions & set(self.table.partitions):
            self.table.close(partition)


class FaustStages(Service):
    """The pipeline stages of one Faust app: their topics, producer, tables and counters.

    A dependency of the app, started before the app's consumer and agents: it checks (and
    creates) the stages' topics, enters each stage's ``setup`` and starts the producer.
    """

    def __init__(
        self,
        app: Any,
        pipeline: Pipeline,
        nodes: list[StageNode],
        conn: Connection,
        options: Any,
    ) -> None:
        super().__init__()
        self.app = app
        self.pipeline = pipeline
        self.nodes = nodes
        self.connection = conn
        self.options = options
        self.partitions: dict[str, int] = {}
        self.stages = [FaustStage(self, pipeline, node) for node in nodes]
        self.producer: AIOKafkaProducer | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._setup = contextlib.AsyncExitStack()
        self._stop = asyncio.Event()

    async def on_start(self) -> None:
        specs = stage_topic_specs(self.pipeline, self.nodes)
        await ensure_topics(self.connection, specs)
        self.partitions.update({s.name: s.partitions for s in specs})
        for stage in self.stages:
            node = stage.node
            stage.handler.output.keep_partition = bool(
                node.output_topic
                and self.partitions[node.input_topic] == self.partitions[node.output_topic]
            )
            stage.handler.resource = await enter_setup(
                node.stage, self._setup, self._stop, stage.stats
            )
            stage.stats.state = "running"
        self.producer = AIOKafkaProducer(
            **self.connection.client_args(),
            client_id=self.app.conf.id,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
        )
        try:
            await self.producer.start()
        except kerr.KafkaError as exc:
            raise translate(exc, "starting the Faust stages' producer") from exc
        self.add_future(self._report())

    async def on_stop(self) -> None:
        self._stop.set()
        if self._inflight:  # what was handled gets acknowledged (committed by Faust's stop)
            await asyncio.wait(self._inflight, timeout=15)
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
        await self._setup.aclose()
        for stage in self.stages:
            stage.stats.state = "stopped"
        write_stats(self.options.stats_file, [s.stats for s in self.stages])

    # -- delivery ---------------------------------------------------------------------------

    async def deliver(self, sends: list[_Send], event: Any) -> None:
        """Send what one event wrote (in order: sends are queued here, one event after the
        other); acknowledge the event once all of it is durable, without waiting for that."""
        producer = self.producer
        assert producer is not None
        try:
            futures = [
                await producer.send(
                    topic, value, key=key, partition=partition, timestamp_ms=stamp,
                    headers=list(headers),
                )
                for topic, partition, key, value, headers, stamp in sends
            ]  # fmt: skip
        except Exception as exc:
            await self._failed(exc)
            return
        task = asyncio.ensure_future(self._ack(futures, event))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _ack(self, futures: list[Any], event: Any) -> None:
        try:
            await asyncio.gather(*futures)
        except Exception as exc:
            await self._failed(exc)
            return
        event.ack()

    async def _failed(self, exc: Exception) -> None:
        """A write failed: the event is never acknowledged (Faust commits nothing past it)
        and the app stops, so that a restart reads it again."""
        log.error("faust stages: a write failed, stopping the app: %s", exc)
        if isinstance(exc, kerr.KafkaError):
            exc = translate(exc, "writing a stage's outputs")
        await self.app.crash(exc)

    async def flush(self) -> None:
        if self._inflight:
            await asyncio.wait(set(self._inflight))

    # -- rebalances and counters ------------------------------------------------------------

    async def assigned(self, sender: Any, assigned: Any, **_: Any) -> None:
        for stage in self.stages:
            mine = sorted(tp.partition for tp in assigned if tp.topic == stage.node.input_topic)
            log.info("stage %s (faust): partitions assigned: %s", stage.node.label, mine)

    async def revoked(self, sender: Any, revoked: Any, **_: Any) -> None:
        for stage in self.stages:
            stage.revoke({tp.partition for tp in revoked if tp.topic == stage.node.input_topic})

    async def _report(self) -> None:
        while not self.should_stop:
            write_stats(self.options.stats_file, [s.stats for s in self.stages])
            await self.sleep(self.options.stats_interval)
