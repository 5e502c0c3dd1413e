"""The dead-letter topic on the broker: read it, count, show and replay its records."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kerr
from aiokafka.structs import TopicPartition

from pipeline.dlq.records import (
    DeadLetterRecord,
    DlqSummary,
    Replay,
    ReplayItem,
    ReplayReport,
    Where,
)
from pipeline.dsl import Pipeline, StageNode
from pipeline.errors import PipelineError, TopicError
from pipeline.jobs import JobState, JobStatus, now_ms
from pipeline.record import JOB_HEADER
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.jobs import job_of
from pipeline.runtime.kafka import BatchWriter, partition_for, translate
from pipeline.runtime.topics import DLQ_RETENTION_MS, TopicSpec, ensure_topics
from pipeline.security import Bootstrap, connection

Progress = Callable[[int, int], None]  # (dead letters read, dead letters to read)
_FLUSH_EVERY = 2000


async def read_dead_letters(
    bootstrap: Bootstrap, topic: str, progress: Progress | None = None
) -> AsyncGenerator[DeadLetterRecord, None]:
    """The dead letters in ``topic`` up to its end offsets at the start (read_committed).

    Raises:
        TopicError: The topic does not exist.
        BrokerUnavailableError: No broker answers.
    """
    consumer = AIOKafkaConsumer(
        **connection(bootstrap).client_args(),
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_poll_records=5000,
    )
    await start_client(consumer, bootstrap, "reading dead letters")
    try:
        cluster = await consumer._client.fetch_all_metadata()
        parts = cluster.partitions_for_topic(topic)
        if not parts:
            raise TopicError(
                f"dead-letter topic {topic} does not exist: the stage has not run yet, or its "
                f"topics were not created ('pipeline topics create')",
                topic=topic,
            )
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        total, read = sum(ends[tp] - starts[tp] for tp in tps), 0
        remaining = {tp for tp in tps if ends[tp] > starts[tp]}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        read += 1
                        yield DeadLetterRecord.of(record)
            for tp in list(remaining):  # past the end, or at it: transaction markers count
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
            if progress is not None:
                progress(read, total)
    except kerr.KafkaError as exc:
        raise translate(exc, f"reading dead letters from {topic}", topic=topic) from exc
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def summarize(
    bootstrap: Bootstrap, pipeline: Pipeline, stage: str, lane: str | None = None
) -> DlqSummary:
    """Count the dead letters of ``stage`` (of its ``lane``, when it reads priority lanes) by
    error class (and partition).

    Raises:
        DefinitionError: ``pipeline`` has no such stage (or lane).
        TopicError: The dead-letter topic does not exist.
        BrokerUnavailableError: No broker answers.
    """
    node = pipeline.node(stage, lane)
    summary = DlqSummary(stage, node.dlq_topic)
    async for record in read_dead_letters(bootstrap, node.dlq_topic):
        summary.add(record)
    with contextlib.suppress(TopicError):  # no replay yet: no receipts topic
        async for receipt in read_dead_letters(bootstrap, receipts_topic(node)):
            summary.add(receipt)
    return summary


async def show(
    bootstrap: Bootstrap,
    pipeline: Pipeline,
    stage: str,
    *,
    limit: int = 20,
    where: Where | None = None,
    lane: str | None = None,
) -> list[tuple[DeadLetterRecord, Any]]:
    """The first ``limit`` dead letters of ``stage`` (of its ``lane``) that match ``where``,
    each with its value decoded by the stage's input schema (or a description of the bytes)."""
    node = pipeline.node(stage, lane)
    where = where or Where()
    found: list[tuple[DeadLetterRecord, Any]] = []
    async with contextlib.aclosing(read_dead_letters(bootstrap, node.dlq_topic)) as records:
        async for record in records:
            if len(found) >= limit:
                break
            if record.receipt is None and where.matches(record):
                found.append((record, decode_value(pipeline, node, record.value)))
    return found


def decode_value(pipeline: Pipeline, node: StageNode, data: bytes | None) -> Any:
    """``data`` decoded with the stage's input schema, else a short description of the bytes."""
    if data is None:
        return "<null value>"
    try:
        return pipeline.schemas.codec(node.stage.input).decode(data)
    except PipelineError:  # the poison itself: why is in its error message
        more = "..." if len(data) > 48 else ""
        return f"<{len(data)} raw bytes, not a {node.stage.input}: {data[:48]!r}{more}>"


async def replay(
    bootstrap: Bootstrap,
    pipeline: Pipeline,
    stage: str,
    *,
    where: Where | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    replay_id: str | None = None,
    lane: str | None = None,
) -> ReplayReport:
    """Re-publish the dead letters of ``stage`` that match ``where`` to its input topic.

    Reads the dead-letter topic from its beginning to the end offsets found at the start, so
    records dead-lettered again while the replay runs wait for the next replay. Once the
    replayed records are durable, a receipt per replayed dead letter (header ``dlq.receipt``)
    goes to ``P.S.dlq.replays``, so that ``pipeline dlq list`` tells replayed ones apart; the
    dead-letter topic itself is left as it was.

    Raises:
        DefinitionError: ``pipeline`` has no such stage.
        TopicError: The dead-letter or input topic does not exist.
        BrokerUnavailableError: No broker answers.
    """
    node = pipeline.node(stage, lane)  # a lane's dead letters go back to that lane
    run = Replay(stage, node.input_topic, where or Where(), replay_id)
    run.report.dry_run = dry_run
    if dry_run:
        async for record in read_dead_letters(bootstrap, node.dlq_topic, progress):
            run.offer(record)
        return run.report
    receipts = []
    if pipeline.jobs is not None:
        # Jobs: each replayed job is marked running again *before* its record goes back, so
        # that no stage's report can come before the mark.
        items = []
        async for record in read_dead_letters(bootstrap, node.dlq_topic, progress):
            item = run.offer(record)
            if item is not None:
                items.append(item)
                receipts.append(record.receipt_of(run.report.replay_id))
        jobs = pipeline.jobs
        await _mark_replayed(bootstrap, (jobs.status, jobs.replies), node, items)
        async with _ReplayWriter(bootstrap, node.input_topic) as writer:
            for item in items:
                await writer.write(item)
    else:
        async with _ReplayWriter(bootstrap, node.input_topic) as writer:
            async for record in read_dead_letters(bootstrap, node.dlq_topic, progress):
                item = run.offer(record)
                if item is not None:
                    await writer.write(item)
                    receipts.append(record.receipt_of(run.report.replay_id))
    # Only once the replayed records are durable: a receipt never claims a replay that did
    # not happen (``pipeline dlq list`` counts replayed dead letters from them).
    if receipts:
        topic = receipts_topic(node)
        await ensure_topics(bootstrap, [_receipts_spec(node, pipeline)])
        async with _ReplayWriter(bootstrap, topic) as marks:
            for receipt in receipts:
                await marks.write(receipt)
    return run.report


async def _mark_replayed(
    bootstrap: Bootstrap, topics: tuple[str, str], node: StageNode, items: list[ReplayItem]
) -> None:
    """Write ``running`` (replayed) for the jobs among ``items`` to the status table, and to
    the reply topic (a client that saw the job fail waits for its new end)."""
    marks = []
    for item in items:
        job, callback = job_of(item.headers)
        if job is not None:
            status = JobStatus(
                job.decode(), JobState.RUNNING, stage=node.name, step=node.index + 1,
                steps=node.steps, callback=callback.decode() if callback else None,
                replayed=True, time=now_ms(),
            )  # fmt: skip
            marks.append(ReplayItem(job, status.encode(), [(JOB_HEADER, job)], None))
    for topic in topics if marks else ():
        async with _ReplayWriter(bootstrap, topic) as writer:
            for mark in marks:
                await writer.write(mark)


def receipts_topic(node: StageNode) -> str:
    """Where replays of ``node``'s dead letters leave their receipts: ``P.S.dlq.replays``."""
    return f"{node.dlq_topic}.replays"


def _receipts_spec(node: StageNode, pipeline: Pipeline) -> TopicSpec:
    return TopicSpec(
        receipts_topic(node), f"replay receipts of '{node.name}'", pipeline.topics.partitions,
        pipeline.topics.replication, {"retention.ms": DLQ_RETENTION_MS},
        pipeline.topics.min_insync,
    )  # fmt: skip


class _ReplayWriter:
    """An idempotent producer (acks=all) writing replayed records to one topic in batches."""

    def __init__(self, bootstrap: Bootstrap, topic: str) -> None:
        self.topic = topic
        self._producer = AIOKafkaProducer(
            **connection(bootstrap).client_args(),
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
        )
        self._writer = BatchWriter(self._producer)
        self._partitions = 0

    async def __aenter__(self) -> _ReplayWriter:
        try:
            await self._producer.start()
            parts = await asyncio.wait_for(self._producer.partitions_for(self.topic), 30)
        except (kerr.KafkaError, TimeoutError) as exc:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            if isinstance(exc, TimeoutError):
                raise TopicError(
                    f"input topic {self.topic} does not exist (or has no leader); replayed "
                    f"records have nowhere to go: create it with 'pipeline topics create'",
                    topic=self.topic,
                ) from exc
            raise translate(exc, "starting the replay producer", topic=self.topic) from exc
        self._partitions = len(parts)
        return self

    async def __aexit__(self, et: type[BaseException] | None, *rest: object) -> None:
        try:
            if et is None:
                await self._writer.flush()
        finally:
            with contextlib.suppress(Exception):
                await self._producer.stop()

    async def write(self, item: ReplayItem) -> None:
        part = item.partition
        if part is None or not 0 <= part < self._partitions:
            part = 0 if item.key is None else partition_for(item.key, self._partitions)
        self._writer.append(self.topic, part, item.key, item.value, item.headers, None)
        if self._writer.buffered >= _FLUSH_EVERY:
            await self._writer.flush()
