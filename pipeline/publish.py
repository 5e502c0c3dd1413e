"""The client applications use to feed a pipeline's input topic.

Each value is validated against the input schema, keyed by its sequence-key field, stamped with
a per-key sequence number, the publisher's writer identity and an event id, and sent through an
idempotent producer (acks=all) in batches.

Two ways to publish, both durable:

- ``await publish(value)`` returns once the event is durable (written to every in-sync replica)
  or raises: an application may answer its own caller then. Calls that overlap (many requests,
  many tasks) share batches: while one batch is in flight, the next one collects (a group
  commit), so concurrency gives throughput without lingering;
- ``buffer(value)`` only buffers, and ``await flush()`` makes everything buffered durable, for
  loops that send many events and can retry a whole chunk (``publish_many`` does that).

Sequence numbers are counted per writer: two replicas of an application publishing the same
keys each have their own identity (random by default), and the pipeline's dedup tables keep
the last sequence per (key, writer), so neither makes the other's records look old.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kerr
from aiokafka.protocol.metadata import MetadataRequest

from pipeline.codec import Codec
from pipeline.errors import ConfigError, EncodeError, PipelineError, TopicError
from pipeline.ops.tracing import current_traceparent, otel_available
from pipeline.record import (
    ID_HEADER,
    SEQ_HEADER,
    TRACE_HEADER,
    WRITER_HEADER,
    encode_seq,
)
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import BatchWriter, partition_for, translate
from pipeline.security import Bootstrap, connection

_PARTITION_CACHE = 65_536  # keys whose partition a publisher remembers


class Stamp(NamedTuple):
    """What a publisher stamped on an event: publish it again with the same ``seq`` and
    ``event_id`` (through the same publisher) and the pipeline drops it as a duplicate."""

    key: bytes
    seq: int
    event_id: bytes


class SequenceClock:
    """Per-key sequence numbers: dense within a publisher, growing across restarts.

    A key's first number is the publisher's start time in microseconds; each later event of
    the key adds one. So numbers are consecutive (a gap downstream means a record went
    missing or was filtered) while a restarted publisher starts above anything an earlier one
    issued (clocks permitting: a key would need a million events a second to catch up).

    Example:
        >>> clock = SequenceClock()
        >>> a, b = clock.next(b"k"), clock.next(b"k")
        >>> b - a
        1
    """

    __slots__ = ("_base", "_last")

    def __init__(self) -> None:
        self._base = time.time_ns() // 1000
        self._last: dict[bytes | None, int] = {}

    def next(self, key: bytes | None) -> int:
        last = self._last.get(key)
        seq = self._base if last is None else last + 1
        self._last[key] = seq
        return seq


def writer_identity(writer: str | bytes | None = None) -> bytes:
    """A writer identity: ``writer`` checked, or a new random one (16 hex characters).

    Give a stable identity (``"web-1"``) to a publisher whose restarts must keep
    deduplicating its retransmissions; its sequence clock starts above the last run's.

    Raises:
        ConfigError: An empty identity or one longer than 64 bytes.

    Example:
        >>> writer_identity("web-1"), len(writer_identity())
        (b'web-1', 16)
    """
    if writer is None:
        return secrets.token_hex(8).encode()
    raw = writer.encode() if isinstance(writer, str) else bytes(writer)
    if not 0 < len(raw) <= 64:
        raise ConfigError(f"a writer identity must have 1 to 64 bytes, not {len(raw)}")
    return raw


class Events:
    """Validates events and turns them into keyed, sequenced records (key, value, headers).

    Shared by :class:`Publisher` and the in-memory test driver, so both stamp events alike.

    Args:
        codec: The input schema's codec.
        key_field: The sequence-key field.
        clock: Per-key sequence numbers (a new clock by default).
        writer: This writer's identity (see :func:`writer_identity`; random by default).

    Example:
        >>> events = Events(store.codec("com.example.Order"), "order_id")  # doctest: +SKIP
        >>> key, data, headers = events.record({"order_id": "o-1", "total": 9.5})  # doctest: +SKIP
    """

    __slots__ = ("_otel", "clock", "codec", "key_field", "writer")

    def __init__(
        self,
        codec: Codec,
        key_field: str,
        clock: SequenceClock | None = None,
        writer: str | bytes | None = None,
    ) -> None:
        self.codec = codec
        self.key_field = key_field
        self.clock = clock or SequenceClock()
        self.writer = writer_identity(writer)
        self._otel = otel_available()  # the caller's span context travels as traceparent

    def check(self, value: Any) -> bytes:
        """Validate ``value`` and return its key bytes.

        Raises:
            EncodeError: The value breaks the schema or lacks the key field (says which).
        """
        if not isinstance(value, dict):
            raise EncodeError(f"expected a JSON object / dict, got {type(value).__name__}")
        reason = self.codec.validate(value)
        if reason is not None:
            raise EncodeError(reason)
        key = value.get(self.key_field)
        if key is None:
            raise EncodeError(f"sequence key field '{self.key_field}' is missing or null")
        return str(key).encode()

    def record(
        self,
        value: Any,
        *,
        seq: int | None = None,
        event_id: bytes | str | None = None,
        traceparent: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        """Key, encoded value and ``seq`` / ``writer`` / ``event-id`` headers of one event
        (and ``traceparent``: given, or the caller's OpenTelemetry span, if any), then
        ``headers``.

        Raises:
            EncodeError: The value breaks the schema or lacks the key field.
        """
        stamp, data, stamped = self.stamped(
            value, seq=seq, event_id=event_id, traceparent=traceparent, headers=headers
        )
        return stamp.key, data, stamped

    def stamped(
        self,
        value: Any,
        *,
        seq: int | None = None,
        event_id: bytes | str | None = None,
        traceparent: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        trace_lookup: bool = True,
    ) -> tuple[Stamp, bytes, list[tuple[str, bytes]]]:
        """:meth:`record`, with the stamp (key, seq, event id) instead of the key alone;
        without ``trace_lookup`` a missing ``traceparent`` stays missing (the caller looked
        it up once for many events)."""
        key = self.check(value)
        data = self.codec.encode(value)
        if seq is None:
            seq = self.clock.next(key)
        if event_id is None:
            eid = os.urandom(16)  # 128 random bits, as unique as a uuid4's 122
        else:
            eid = event_id.encode() if isinstance(event_id, str) else event_id
        stamped = [(SEQ_HEADER, encode_seq(seq)), (WRITER_HEADER, self.writer), (ID_HEADER, eid)]
        if traceparent is None and self._otel and trace_lookup:
            traceparent = current_traceparent()
        if traceparent is not None:
            trace = traceparent.encode() if isinstance(traceparent, str) else traceparent
            stamped.append((TRACE_HEADER, trace))
        if headers:
            stamped.extend(headers)
        return Stamp(key, seq, eid), data, stamped


async def _refused(producer: AIOKafkaProducer, topic: str) -> None:
    """Raise TopicAuthorizationFailedError if the broker hides ``topic`` from this principal
    (a topic it may not describe is missing from the metadata, as a missing topic is)."""
    client = producer.client
    response = await client.send(client.get_random_node(), MetadataRequest([topic], False))
    for entry in response.topics:
        if entry[0] == kerr.TopicAuthorizationFailedError.errno:
            raise kerr.TopicAuthorizationFailedError(topic)


class Publisher:
    """Publishes validated, keyed, sequenced events to a topic.

    Args:
        bootstrap: Bootstrap servers.
        topic: The pipeline's input topic.
        codec: The input schema's codec (``store.codec("com.example.Order")``).
        key_field: The value field that is the sequence key.
        batch_records: Records per flush in :meth:`publish_many`.
        writer: This publisher's identity (random by default; see :func:`writer_identity`).

    Example:
        >>> async with Publisher(bootstrap, "orders", codec, "order_id") as pub:  # doctest: +SKIP
        ...     await pub.publish({"order_id": "o-1", "total": 9.5})
    """

    def __init__(
        self,
        bootstrap: Bootstrap,
        topic: str,
        codec: Codec,
        key_field: str,
        *,
        batch_records: int = 5000,
        linger_ms: int = 5,
        writer: str | bytes | None = None,
    ) -> None:
        self.topic = topic
        self.codec = codec
        self.key_field = key_field
        self.batch_records = batch_records
        self.sent = 0
        self.rejected = 0
        self._events = Events(codec, key_field, writer=writer)
        self.writer = self._events.writer
        self._bootstrap = bootstrap
        self._linger_ms = linger_ms
        self._partitions = 0
        self._partition_of: dict[bytes, int] = {}
        # Created in __aenter__: aiokafka needs a running event loop (see SyncPublisher).
        self._producer: AIOKafkaProducer | None = None
        self._writer: BatchWriter | None = None
        self._flush_lock = asyncio.Lock()  # dispatches one at a time, in buffer order
        self._next_flush: asyncio.Future[None] | None = None
        self._in_flight: asyncio.Future[None] | None = None  # the last dispatch's durability

    async def __aenter__(self) -> Publisher:
        producer = self._producer = AIOKafkaProducer(
            **connection(self._bootstrap).client_args(),
            acks="all",
            enable_idempotence=True,
            linger_ms=self._linger_ms,
            max_batch_size=256 * 1024,
        )
        self._writer = BatchWriter(producer)
        await start_client(producer, self._bootstrap, "starting the publisher")
        try:
            # Ask once for every topic: a missing topic is an error now, not 30 s of the
            # client's retries and warnings.
            for attempt in range(10):  # a topic created a moment ago may not be known yet
                known = await asyncio.wait_for(producer.client.fetch_all_metadata(), 30)
                if known.partitions_for_topic(self.topic) is not None:
                    break
                if attempt == 0:  # missing from the list: or hidden from this principal?
                    await _refused(producer, self.topic)
                await asyncio.sleep(0.3)
            else:
                raise TopicError(
                    f"topic {self.topic} does not exist; create it with 'pipeline topics "
                    f"create MODULE:PIPELINE' (or let the pipeline's first stage create it)",
                    topic=self.topic,
                )
            parts = await asyncio.wait_for(producer.partitions_for(self.topic), 30)
        except (kerr.KafkaError, TimeoutError, TopicError) as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            if isinstance(exc, TopicError):
                raise
            if isinstance(exc, TimeoutError):
                raise PipelineError(
                    f"topic {self.topic} does not exist (or no broker answers); create it with "
                    f"'pipeline topics create'",
                    topic=self.topic,
                ) from exc
            raise translate(exc, "starting the publisher", topic=self.topic) from exc
        self._partitions = len(parts)
        self._partition_of = {}
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if et is None:
                await self.flush()
        finally:
            if self._producer is not None:
                await self._producer.stop()

    def check(self, value: Any) -> bytes:
        """Validate ``value`` and return its key bytes (see :meth:`Events.check`)."""
        return self._events.check(value)

    def buffer(
        self,
        value: Any,
        *,
        seq: int | None = None,
        event_id: bytes | str | None = None,
        traceparent: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> Stamp:
        """Validate, stamp and buffer one event without sending it; :meth:`flush` sends.

        Nothing buffered is durable before the next :meth:`flush` returns: call it regularly
        (every few thousand events) and publish the chunk again if it raises (the stamps make
        a retransmission a duplicate that the pipeline drops).

        Raises:
            EncodeError: The value breaks the schema; nothing was buffered.
        """
        return self._buffer(value, seq, event_id, traceparent, headers, trace_lookup=True)

    def _buffer(
        self,
        value: Any,
        seq: int | None,
        event_id: bytes | str | None,
        traceparent: bytes | str | None,
        headers: Sequence[tuple[str, bytes]],
        *,
        trace_lookup: bool,
    ) -> Stamp:
        stamp, data, stamped = self._events.stamped(
            value,
            seq=seq,
            event_id=event_id,
            traceparent=traceparent,
            headers=headers,
            trace_lookup=trace_lookup,
        )
        writer = self._writer
        if writer is None:
            raise PipelineError("use the publisher inside 'async with Publisher(...)'")
        key = stamp.key
        partition = self._partition_of.get(key)
        if partition is None:  # keys repeat (per-key sequences): murmur2 once per key
            if len(self._partition_of) >= _PARTITION_CACHE:
                self._partition_of.clear()
            partition = self._partition_of[key] = partition_for(key, self._partitions)
        writer.append(self.topic, partition, key, data, stamped, None)
        return stamp

    async def publish(
        self,
        value: Any,
        *,
        seq: int | None = None,
        event_id: bytes | str | None = None,
        traceparent: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> Stamp:
        """Publish one event; return once it is durable (acks=all), with its stamp.

        Args:
            value: The event; must match the input schema.
            seq: Its per-key sequence number; the publisher's clock assigns one when omitted.
                Publishing the same event again with the same ``seq`` through this publisher
                (the same writer), or with the same ``event_id``, is a retransmission that the
                pipeline's dedup table drops.
            event_id: Its unique id; a random one when omitted.
            traceparent: A W3C trace context for the event (by default the caller's
                OpenTelemetry span, when there is one; see :mod:`pipeline.ops.tracing`).
            headers: More headers, after the framework's (every stage passes them on).

        Raises:
            EncodeError: The value breaks the schema; nothing was sent.
            PipelineError: The event could not be made durable (e.g. no broker answered
                within the producer's timeout); publish it again with the same stamp.

        Example:
            >>> stamp = await pub.publish(order)                       # doctest: +SKIP
            >>> await pub.publish(order, seq=stamp.seq, event_id=stamp.event_id)  # doctest: +SKIP
        """
        stamp = self.buffer(
            value, seq=seq, event_id=event_id, traceparent=traceparent, headers=headers
        )
        await self._group_flush()
        return stamp

    async def publish_many(self, values: Iterable[Any]) -> list[Stamp]:
        """Publish several events; return once all are durable (see :meth:`buffer`).

        Every ``batch_records`` events go to the producer while the next ones are encoded;
        at most two such chunks are in flight.
        """
        stamps = []
        writer = self._writer
        if writer is None:
            raise PipelineError("use the publisher inside 'async with Publisher(...)'")
        previous: asyncio.Future[None] | None = None
        # One call, one caller's span: its trace context is looked up once, not per event.
        trace = current_traceparent() if self._events._otel else None
        for value in values:
            stamps.append(self._buffer(value, None, None, trace, (), trace_lookup=False))
            if writer.buffered >= self.batch_records:
                async with self._flush_lock:
                    sent = await self._dispatch()
                if previous is not None:
                    await asyncio.shield(previous)
                previous = sent
        await self.flush()
        return stamps

    async def flush(self) -> None:
        """Send everything buffered and wait until it is durable (acks=all), and every earlier
        flush is over."""
        if self._writer is None:  # never started: nothing can be buffered
            return
        async with self._flush_lock:
            sent = await self._dispatch()
        await asyncio.shield(sent)

    async def _dispatch(self) -> asyncio.Future[None]:
        """Hand everything buffered to the producer (the caller holds the flush lock, so
        records reach it in the order they were buffered); return a future that is done when
        these records are durable and every dispatch before them is over (each dispatch's
        waiters get its error)."""
        writer = self._writer
        if writer is None:
            raise PipelineError("use the publisher inside 'async with Publisher(...)'")
        count = writer.buffered
        batches = writer.take()  # synchronously: records buffered from here on are the next's
        futures = await writer.dispatch(batches)
        before = self._in_flight

        async def durable() -> None:
            if before is not None:  # done or failed: a failure is raised to its own waiters
                await asyncio.wait([before])
            await writer.acknowledged(batches, futures)
            self.sent += count

        sent = self._in_flight = asyncio.ensure_future(durable())
        sent.add_done_callback(_retrieve)
        return sent

    async def _group_flush(self) -> None:
        """Wait for a flush that started after this caller's record was buffered.

        The next flush is shared by every caller that buffers before it starts; it starts as
        soon as the flush in flight (if any) is durable, so records wait at most one round
        trip plus the one in flight, and overlapping callers share batches.
        """
        pending = self._next_flush
        if pending is None:
            pending = self._next_flush = asyncio.ensure_future(self._run_next_flush())
            pending.add_done_callback(_retrieve)
        await asyncio.shield(pending)

    async def _run_next_flush(self) -> None:
        async with self._flush_lock:
            if self._in_flight is not None:  # collect callers while it flies
                with contextlib.suppress(Exception):  # its callers have its error
                    await asyncio.shield(self._in_flight)
            await asyncio.sleep(0)  # callers scheduled in the same tick join this flush
            # Records buffered from here on wait for the following flush (_dispatch takes
            # the writer's buffer synchronously).
            self._next_flush = None
            sent = await self._dispatch()
        await asyncio.shield(sent)


def _retrieve(fut: asyncio.Future[None]) -> None:
    """A shared flush whose callers were all cancelled: its error is theirs, not asyncio's."""
    if not fut.cancelled():
        fut.exception()


class SyncPublisher:
    """:class:`Publisher` for code without an event loop.

    Example:
        >>> with SyncPublisher(bootstrap, "orders", codec, "order_id") as pub:  # doctest: +SKIP
        ...     pub.publish({"order_id": "o-1", "total": 9.5})
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._runner = asyncio.Runner()
        self._publisher = Publisher(*args, **kwargs)

    @property
    def sent(self) -> int:
        return self._publisher.sent

    @property
    def writer(self) -> bytes:
        return self._publisher.writer

    def __enter__(self) -> SyncPublisher:
        self._runner.run(self._publisher.__aenter__())
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._runner.run(self._publisher.__aexit__(et, e, tb))
        finally:
            self._runner.close()

    def publish(
        self,
        value: Any,
        *,
        seq: int | None = None,
        event_id: bytes | str | None = None,
        traceparent: bytes | str | None = None,
    ) -> Stamp:
        trace = traceparent or self._caller_trace()  # the caller's span, read in its context
        return self._runner.run(
            self._publisher.publish(value, seq=seq, event_id=event_id, traceparent=trace)
        )

    def _caller_trace(self) -> bytes | None:
        return current_traceparent() if self._publisher._events._otel else None

    def buffer(
        self,
        value: Any,
        *,
        seq: int | None = None,
        event_id: bytes | str | None = None,
        traceparent: bytes | str | None = None,
    ) -> Stamp:
        return self._publisher.buffer(value, seq=seq, event_id=event_id)

    def publish_many(self, values: Iterable[Any]) -> list[Stamp]:
        return self._runner.run(self._publisher.publish_many(values))

    def flush(self) -> None:
        self._runner.run(self._publisher.flush())
