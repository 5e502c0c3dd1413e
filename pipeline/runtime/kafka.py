"""aiokafka behind the :class:`~pipeline.runtime.transport.Transport` interface.

All aiokafka errors of the worker path are translated here (:func:`translate`) so that the
rest of the framework only sees :class:`~pipeline.errors.PipelineError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka import errors as kerr
from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition as KafkaTP

from pipeline.errors import BrokerError, BrokerUnavailableError, PipelineError, TopicError
from pipeline.runtime.transport import Batching, RebalanceCallback

log = logging.getLogger(__name__)

_PARTITION_CACHE_LIMIT = 200_000


def translate(exc: BaseException, action: str, **context: Any) -> PipelineError:
    """Turn an aiokafka error into the framework's error, saying what was being done."""
    if isinstance(exc, PipelineError):
        return exc
    if isinstance(exc, kerr.KafkaConnectionError | kerr.NoBrokersAvailable):
        return BrokerUnavailableError(
            f"{action}: no Kafka broker answers ({exc}); check the bootstrap address",
            **context,
        )
    if isinstance(exc, kerr.UnknownTopicOrPartitionError):
        return TopicError(f"{action}: topic does not exist ({exc})", **context)
    if isinstance(exc, kerr.KafkaTimeoutError | kerr.RequestTimedOutError):
        return BrokerError(f"{action}: timed out ({exc})", retriable=True, **context)
    retriable = bool(getattr(exc, "retriable", False))
    return BrokerError(f"{action}: {type(exc).__name__}: {exc}", retriable=retriable, **context)


class BatchWriter:
    """Buffers records into one producer batch per partition; :meth:`flush` sends them all.

    Appending never waits; the one wait per flush is for the acknowledgements (acks=all), so
    the hot path pays one await per batch instead of one per record.
    """

    __slots__ = ("_builders", "_full", "_producer", "buffered")

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._builders: dict[tuple[str, int], Any] = {}
        self._full: list[tuple[Any, str, int]] = []
        self.buffered = 0

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        timestamp: int | None,
    ) -> None:
        if type(headers) is not list:  # the C batch builder takes lists only
            headers = list(headers)
        slot = (topic, partition)
        builder = self._builders.get(slot)
        if builder is None:
            builder = self._builders[slot] = self._producer.create_batch()
        if builder.append(key=key, value=value, timestamp=timestamp, headers=headers) is None:
            # Full: keep it for flush() and start the next batch of this partition.
            self._full.append((builder, topic, partition))
            builder = self._builders[slot] = self._producer.create_batch()
            builder.append(key=key, value=value, timestamp=timestamp, headers=headers)
        self.buffered += 1

    async def flush(self) -> int:
        """Send every buffered record; return how many, once all are acknowledged."""
        batches = self._full
        batches.extend((b, t, p) for (t, p), b in self._builders.items())
        count = self.buffered
        # Swap the buffers before the first await: records appended meanwhile go to the next
        # flush (the concurrent worker relies on this).
        self._full, self._builders, self.buffered = [], {}, 0
        if not batches:
            return 0
        try:
            futures = [await self._producer.send_batch(b, t, partition=p) for b, t, p in batches]
            for fut in futures:
                await fut
        except kerr.KafkaError as exc:
            raise translate(exc, "writing records") from exc
        return count


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of ``key`` as the Java client's default partitioner picks it (murmur2)."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_revoked: RebalanceCallback, on_assigned: RebalanceCallback) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._on_assigned(set(assigned))


class KafkaTransport:
    """One consumer (the stage's group) and one idempotent producer.

    Args:
        bootstrap: Bootstrap servers.
        group: The stage's consumer group.
        input_topic: The topic the stage reads.
        batching: Fetch and produce batch sizes.
        client_id: Shown in broker logs and group listings.
        session_timeout_ms: How long the group waits for a silent member before moving its
            partitions.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        group: str,
        input_topic: str,
        batching: Batching = Batching(),
        client_id: str = "pipeline",
        session_timeout_ms: int = 10_000,
        isolation_level: str = "read_uncommitted",
    ) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.input_topic = input_topic
        self.batching = batching
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=isolation_level,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(1000, session_timeout_ms // 4),
            max_poll_records=batching.max_records,
            fetch_max_wait_ms=batching.fetch_wait_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=batching.linger_ms,
            max_batch_size=batching.max_batch_bytes,
        )
        self._partitions: dict[str, int] = {}
        self._part_cache: dict[tuple[str, bytes], int] = {}
        self._writer = BatchWriter(self._producer)
        self._started: list[Any] = []

    async def start(self, on_revoked: RebalanceCallback, on_assigned: RebalanceCallback) -> None:
        try:
            await self._producer.start()
            self._started.append(self._producer)
            await self._consumer.start()
            self._started.append(self._consumer)
            self._consumer.subscribe(
                [self.input_topic], listener=_Listener(on_revoked, on_assigned)
            )
        except Exception as exc:
            await self.stop()
            raise translate(exc, "starting the stage's Kafka clients", group=self.group) from exc

    async def stop(self) -> None:
        while self._started:
            client = self._started.pop()
            with contextlib.suppress(Exception):
                await client.stop()

    async def fetch(self, timeout_ms: int, max_records: int) -> Mapping[Any, list[Any]]:
        try:
            result: Mapping[Any, list[Any]] = await self._consumer.getmany(
                timeout_ms=timeout_ms, max_records=max_records
            )
        except kerr.KafkaError as exc:
            raise translate(exc, "fetching records", topic=self.input_topic) from exc
        return result

    def assignment(self) -> set[Any]:
        return set(self._consumer.assignment())

    async def prepare_topic(self, topic: str) -> int:
        """Learn ``topic``'s partition count (before :meth:`partition_for` is used on it)."""
        try:
            parts = await self._producer.partitions_for(topic)
        except kerr.KafkaError as exc:
            raise translate(exc, "reading topic metadata", topic=topic) from exc
        count = len(parts)
        self._partitions[topic] = count
        return count

    def partition_for(self, topic: str, key: bytes | None) -> int:
        """The partition of ``key`` in ``topic`` (cached: keys repeat, murmur2 is Python)."""
        if key is None:
            return 0
        cache_key = (topic, key)
        part = self._part_cache.get(cache_key)
        if part is None:
            if len(self._part_cache) > _PARTITION_CACHE_LIMIT:
                self._part_cache.clear()
            part = partition_for(key, self._partitions[topic])
            self._part_cache[cache_key] = part
        return part

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        timestamp: int | None,
    ) -> None:
        self._writer.append(topic, partition, key, value, headers, timestamp)

    async def flush(self) -> None:
        await self._writer.flush()

    async def commit(self, offsets: Mapping[Any, int]) -> None:
        if not offsets:
            return
        try:
            await self._consumer.commit(
                {KafkaTP(tp.topic, tp.partition): o for tp, o in offsets.items()}
            )
        except kerr.CommitFailedError as exc:
            # The group rebalanced under us: these partitions are someone else's now. Their
            # outputs are durable, so the new owner's redelivery is a duplicate that the next
            # stage's dedup table drops: at-least-once holds. Not an error worth stopping for.
            log.warning("group %s: commit failed after a rebalance: %s", self.group, exc)
        except kerr.KafkaError as exc:
            raise translate(exc, "committing offsets", group=self.group) from exc
