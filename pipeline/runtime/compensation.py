"""Compensation: a stage undoes its part of a multi-step job that a later stage dead-lettered.

A stage declared with ``compensate=fn`` gets a compensation topic ``P.S.compensate``. When a
later stage dead-letters a record, it writes the record (original bytes, the ``dlq.*`` headers
saying where and why) to the compensation topic of the nearest earlier stage that compensates,
in the same commit as the dead letter. That stage's process runs a :class:`Compensator` beside
its worker (group ``P.S.compensate``): for each request it calls ``fn(value, record)`` with the
value decoded as the failing stage read it, then passes the request on to the next earlier
stage that compensates, so the steps are undone in reverse order, each once.

*Once*: a request is identified by the record's event id (and flat-map part), which a replayed
dead letter keeps; the compensator remembers the ids it ran in a compacted topic
(``P.S.compensate.done``, read back when it starts), so a replay that fails again does not undo
anything twice. Within a run, a compensation whose process dies between the call and that
record runs again (at least once): make ``fn`` idempotent where that matters.

A compensation that keeps failing (``fn`` raises after the stage's retries) is dead-lettered to
the stage's own dead-letter topic (error class of ``fn``'s exception) and the request is still
passed on: the earlier steps are undone anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as kerr

from pipeline.dsl import Pipeline, StageNode
from pipeline.errors import DecodeError, PipelineError
from pipeline.record import ID_HEADER, PART_HEADER, Record
from pipeline.runtime.deadletter import dead_letter_headers
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import BatchWriter, partition_for, translate
from pipeline.runtime.topics import done_topic
from pipeline.security import Bootstrap, connection
from pipeline.stage import positional_arity

log = logging.getLogger(__name__)


def request_id(headers: Any) -> bytes | None:
    """What identifies a compensation request: the record's event id (and flat-map part)."""
    eid: bytes | None = None
    part: bytes | None = None
    for k, v in headers:
        if k == ID_HEADER:
            eid = v
        elif k == PART_HEADER:
            part = v
    if eid is None:
        return None
    return eid if part is None else eid + b"/" + part


class Compensator:
    """Runs one stage's compensations (see the module docstring).

    Args:
        pipeline: The pipeline (its schemas decode the failing records).
        node: The stage; ``node.stage.compensate`` is set.
        bootstrap: Where and how to connect.
    """

    def __init__(self, pipeline: Pipeline, node: StageNode, bootstrap: Bootstrap) -> None:
        if node.stage.compensate is None or node.compensate_topic is None:
            raise PipelineError(f"stage {node.name} has no compensate=")
        self.node = node
        self.schemas = pipeline.schemas
        self.topic = node.compensate_topic
        self.done_topic = done_topic(node.compensate_topic)
        self.connection = connection(bootstrap)
        fn = node.stage.compensate
        self.fn: Callable[[Any, Record], Any] = (
            fn if positional_arity(fn) >= 2 else (lambda value, _record: fn(value))
        )
        self.is_async = inspect.iscoroutinefunction(fn)
        self.done: set[bytes] = set()
        self.ran = self.skipped = self.failed = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Compensate until ``stop`` is set."""
        args = self.connection.client_args()
        consumer = AIOKafkaConsumer(
            self.topic, **args, group_id=self.topic, enable_auto_commit=False,
            auto_offset_reset="earliest", isolation_level="read_committed",
        )  # fmt: skip
        producer = AIOKafkaProducer(**args, acks="all", enable_idempotence=True)
        what = f"compensations of stage {self.node.name}"
        await start_client(producer, self.connection, f"starting the {what}")
        try:
            self.done = await self._remembered()
            await start_client(consumer, self.connection, f"starting the {what}")
            writer = BatchWriter(producer)
            parts = {
                t: len(await producer.partitions_for(t))
                for t in (self.done_topic, self.node.dlq_topic, self.node.undo_topic)
                if t is not None
            }
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        await self._one(record, writer, parts)
                if batches:
                    await writer.flush()  # passed on, remembered, dead-lettered: then commit
                    await consumer.commit()
        except kerr.KafkaError as exc:
            raise translate(exc, f"running the {what}", topic=self.topic) from exc
        finally:
            for client in (consumer, producer):
                with contextlib.suppress(Exception):
                    await client.stop()
            log.info(
                "stage %s: compensations: %d run, %d already done, %d failed",
                self.node.name, self.ran, self.skipped, self.failed,
            )  # fmt: skip

    async def _remembered(self) -> set[bytes]:
        """The ids of the compensations run so far (the compacted done topic, to its end)."""
        reader = AIOKafkaConsumer(
            **self.connection.client_args(), enable_auto_commit=False,
            auto_offset_reset="earliest",
        )  # fmt: skip
        await start_client(reader, self.connection, "reading compensations done")
        done: set[bytes] = set()
        try:
            parts = reader.partitions_for_topic(self.done_topic) or set()
            if not parts:
                await reader._client.force_metadata_update()
                parts = reader.partitions_for_topic(self.done_topic) or set()
            tps = [TopicPartition(self.done_topic, p) for p in parts]
            if not tps:
                return done
            reader.assign(tps)
            ends = await reader.end_offsets(tps)
            starts = await reader.beginning_offsets(tps)
            for tp in tps:
                reader.seek(tp, starts[tp])
            behind = set(tps)
            while behind:
                for records in (await reader.getmany(timeout_ms=500)).values():
                    done.update(r.key for r in records if r.key is not None)
                behind = {tp for tp in behind if await reader.position(tp) < ends[tp]}
        finally:
            await reader.stop()
        return done

    async def _one(self, record: Any, writer: BatchWriter, parts: dict[str, int]) -> None:
        def append(topic: str, value: bytes | None, headers: Any, key: bytes | None) -> None:
            part = 0 if key is None else partition_for(key, parts[topic])
            writer.append(topic, part, key, value, headers, record.timestamp)

        rid = request_id(record.headers)
        if rid is not None and rid in self.done:
            self.skipped += 1  # compensated before (a replay that failed again)
            return
        error = await self._call(record)
        if error is not None:
            self.failed += 1
            headers = dead_letter_headers(
                record.headers, stage=self.node.name, exc=error,
                attempts=self.node.stage.retry.max_attempts, topic=record.topic,
                partition=record.partition, offset=record.offset,
            )  # fmt: skip
            append(self.node.dlq_topic, record.value, headers, record.key)
        else:
            self.ran += 1
        if self.node.undo_topic is not None:  # the step before this one, next
            append(self.node.undo_topic, record.value, record.headers, record.key)
        if rid is not None:
            self.done.add(rid)
            append(self.done_topic, b"1", (), rid)

    async def _call(self, record: Any) -> BaseException | None:
        """Call ``fn`` with the retries of the stage's policy; the last error, or None."""
        try:
            value = self._decode(record.value)
        except DecodeError as exc:
            return exc
        context = Record(
            record.key, value, headers=record.headers, timestamp=record.timestamp,
            topic=record.topic, partition=record.partition, offset=record.offset,
        )  # fmt: skip
        retry = self.node.stage.retry
        error: BaseException | None = None
        for attempt in range(1, retry.max_attempts + 1):
            try:
                result = self.fn(value, context)
                if self.is_async:
                    await result
                return None
            except Exception as exc:
                error = exc
                log.warning(
                    "stage %s: compensation of %r failed (attempt %d): %s",
                    self.node.name, record.key, attempt, exc,
                )  # fmt: skip
                if attempt < retry.max_attempts:
                    await asyncio.sleep(retry.backoff(attempt))
        return error

    def _decode(self, data: bytes | None) -> Any:
        """The value as the failing stage read it: decoded with the schema it was written in."""
        if data is None or len(data) < 10:
            raise DecodeError("a compensation request without an Avro value")
        schema = self.schemas.by_fingerprint(bytes(data[2:10]))
        if schema is None:
            raise DecodeError(f"unknown schema fingerprint {bytes(data[2:10]).hex()}")
        return self.schemas.codec(schema.name).decode(data)
