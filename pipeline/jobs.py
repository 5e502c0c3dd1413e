"""Jobs: an event published to a pipeline whose progress and result the caller can see.

A pipeline built with :meth:`~pipeline.dsl.Pipeline.with_jobs` tracks every event that carries
a ``job-id`` header. Four ways back to the caller:

- the **status table**, a compacted topic (``P.jobs``, key = job id, JSON values): the client
  writes ``accepted`` before it publishes the event; each stage then writes what it did with the
  job's record, in the same commit as its outputs (``running`` after stage N of M, ``completed``
  with the last stage's result, ``failed`` with the stage and error class when a stage
  dead-lettered it, and ``running`` again when ``pipeline dlq replay`` sends it through again);
- the **reply topic** (``P.replies``): a job's end (completed or failed) with its job id as
  the correlation id (and a replay's ``running`` mark); :meth:`JobClient.result` waits there,
  many callers at once, each only for its own jobs;
- ``pipeline jobs status P ID`` and ``GET /jobs/ID`` on a worker's HTTP surface read the table;
- a **callback URL** per job (``submit(..., callback=url)``): ``pipeline jobs callbacks``
  POSTs the job's end there, retried, with an ``Idempotency-Key`` header.

Example:
    >>> async with JobClient(bootstrap, orders) as jobs:          # doctest: +SKIP
    ...     job = await jobs.submit({"order_id": "o-1", "total": 9.5})
    ...     result = await jobs.result(job, timeout=30)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka import errors as kerr

from pipeline.dsl import Pipeline
from pipeline.errors import DefinitionError, JobFailedError, PipelineError, TopicError
from pipeline.publish import Publisher
from pipeline.record import CALLBACK_HEADER, JOB_HEADER
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import partition_for, translate
from pipeline.security import Bootstrap, connection


def now_ms() -> int:
    """Milliseconds since the epoch (the time of a status)."""
    return time.time_ns() // 1_000_000


class JobState(enum.Enum):
    """Where a job is."""

    ACCEPTED = "accepted"  # the client wrote it down; the event is (being) published
    RUNNING = "running"  # a stage passed it on (or a replay sent it through again)
    COMPLETED = "completed"  # the last stage handled it (or a stage filtered it out)
    FAILED = "failed"  # a stage dead-lettered it


@dataclass(frozen=True, slots=True)
class JobStatus:
    """One entry of the status table (its latest per job is the job's status).

    Example:
        >>> s = JobStatus("j1", JobState.RUNNING, stage="price", step=1, steps=3)
        >>> JobStatus.decode(s.encode()) == s
        True
    """

    job: str
    state: JobState
    stage: str | None = None  # the stage that wrote it (None: the client, on submit)
    step: int = 0  # that stage's place, 1-based
    steps: int = 0  # stages in the pipeline
    result: Any = None  # completed: the last stage's result (JSON)
    error_class: str | None = None  # failed: why
    error: str | None = None
    callback: str | None = None  # where the job's end is POSTed
    replayed: bool = False  # a dead letter of it was replayed
    time: int = 0  # ms since the epoch

    @property
    def done(self) -> bool:
        """Whether the job ended (completed or failed; a replay may start it again)."""
        return self.state in (JobState.COMPLETED, JobState.FAILED)

    def encode(self) -> bytes:
        """The JSON value written to the status table and the reply topic."""
        doc = asdict(self)
        doc["state"] = self.state.value
        return json.dumps({k: v for k, v in doc.items() if v not in (None, False)}).encode()

    @classmethod
    def decode(cls, data: bytes) -> JobStatus:
        """Read a status written by :meth:`encode`.

        Raises:
            PipelineError: Not a job status.
        """
        try:
            doc = json.loads(data)
            doc["state"] = JobState(doc["state"])
            return cls(**doc)
        except (ValueError, TypeError, KeyError) as exc:
            raise PipelineError(f"not a job status: {data[:200]!r} ({exc})") from exc

    def as_dict(self) -> dict[str, Any]:
        """For ``--json`` and ``GET /jobs/ID``."""
        return {**asdict(self), "state": self.state.value}


async def read_status(bootstrap: Bootstrap, topic: str, job: str) -> JobStatus | None:
    """The latest status of ``job`` in the status table ``topic`` (``None``: unknown job).

    Reads the one partition the job id hashes to, from its start to its end now: the table
    is compacted, so that is about one entry per job in the partition, but it is a scan; a
    :class:`JobClient` answers its own jobs from the replies it has seen instead.

    Raises:
        TopicError: The status table does not exist.
    """
    history = await read_history(bootstrap, topic, job)
    return history[-1] if history else None


async def read_history(bootstrap: Bootstrap, topic: str, job: str) -> list[JobStatus]:
    """Every entry of ``job`` still in the status table ``topic``, oldest first: its path
    through the stages (compaction keeps only the latest of older entries; ``[]``: unknown).

    Raises:
        TopicError: The status table does not exist.
    """
    consumer = AIOKafkaConsumer(
        **connection(bootstrap).client_args(), enable_auto_commit=False,
        isolation_level="read_committed",
    )  # fmt: skip
    await start_client(consumer, bootstrap, "reading job statuses")
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise TopicError(
                f"the job status table {topic} does not exist (is the pipeline built with "
                f".with_jobs(), and its topics created?)",
                topic=topic,
            )
        key = job.encode()
        tp = TopicPartition(topic, partition_for(key, len(parts)))
        consumer.assign([tp])
        start = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, start)
        found: list[JobStatus] = []
        while start < end and await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                if record.key == key and record.value is not None:
                    found.append(JobStatus.decode(record.value))
        return found
    except kerr.KafkaError as exc:
        raise translate(exc, "reading job statuses", topic=topic) from exc
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


class JobClient:
    """Submits jobs to a pipeline and gets their status and results back.

    Opened with ``async with``; it then follows the reply topic from its end, so the ends of
    the jobs it submits reach :meth:`result` without a read of the status table.

    Args:
        bootstrap: Bootstrap servers (or a :class:`~pipeline.security.Connection`).
        pipeline: The pipeline, built with :meth:`~pipeline.dsl.Pipeline.with_jobs`.
        writer: The publisher's writer identity (see :class:`~pipeline.publish.Publisher`).
        remember: How many ended jobs of this client are kept for :meth:`result` calls made
            after the end arrived.
        lane: For a pipeline with priority lanes: the lane (topic) jobs go to (default: the
            heaviest).

    Example:
        >>> async with JobClient(bootstrap, orders) as jobs:          # doctest: +SKIP
        ...     job = await jobs.submit({"order_id": "o-1", "total": 9.5})
        ...     (await jobs.status(job)).state
        <JobState.ACCEPTED: 'accepted'>
    """

    def __init__(
        self,
        bootstrap: Bootstrap,
        pipeline: Pipeline,
        *,
        writer: str | bytes | None = None,
        remember: int = 100_000,
        lane: str | None = None,
    ) -> None:
        if pipeline.jobs is None or not pipeline.stages:
            raise DefinitionError(
                f"pipeline '{pipeline.name}' does not track jobs: build it with "
                f".with_jobs() (and at least one stage)"
            )
        self.pipeline = pipeline
        self.topics = pipeline.jobs
        self._bootstrap = bootstrap
        codec = pipeline.schemas.codec(pipeline.stages[0].input)
        topic = (
            pipeline.node(pipeline.stages[0].name, lane).input_topic if lane else pipeline.source
        )
        self._publisher = Publisher(bootstrap, topic, codec, pipeline.key, writer=writer)
        args = connection(bootstrap).client_args()
        self._producer = AIOKafkaProducer(**args, acks="all", enable_idempotence=True)
        self._replies = AIOKafkaConsumer(
            **args, enable_auto_commit=False, isolation_level="read_committed"
        )
        self._remember = remember
        self._mine: OrderedDict[str, None] = OrderedDict()  # submitted here, most recent last
        self._ended: OrderedDict[str, JobStatus] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[JobStatus]]] = {}
        self._status_parts = 0
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JobClient:
        await self._publisher.__aenter__()
        try:
            await start_client(self._producer, self._bootstrap, "starting the job client")
            await start_client(self._replies, self._bootstrap, "starting the job client")
            self._status_parts = len(await self._partitions(self.topics.status))
            tps = [
                TopicPartition(self.topics.replies, p)
                for p in await self._partitions(self.topics.replies)
            ]
            self._replies.assign(tps)
            await self._replies.seek_to_end(*tps)
            for tp in tps:  # resolve the positions now: replies from here on are ours to see
                await self._replies.position(tp)
        except BaseException:
            await self._close()
            raise
        self._reader = asyncio.create_task(self._read_replies())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        for client in (self._replies, self._producer):
            with contextlib.suppress(Exception):
                await client.stop()
        with contextlib.suppress(Exception):
            await self._publisher.__aexit__(None, None, None)

    async def _partitions(self, topic: str) -> set[int]:
        try:
            parts = await asyncio.wait_for(self._producer.partitions_for(topic), 30)
        except (TimeoutError, kerr.KafkaError) as exc:
            raise TopicError(
                f"topic {topic} of the pipeline's jobs does not exist; create the pipeline's "
                f"topics ('pipeline topics create MODULE:PIPELINE')",
                topic=topic,
            ) from exc
        return set(parts)

    async def submit(
        self,
        value: Any,
        *,
        job_id: str | None = None,
        callback: str | None = None,
        seq: int | None = None,
    ) -> str:
        """Publish ``value`` as a new job; return its id once the event is durable.

        The status ``accepted`` is durable before the event is published, so no stage's
        report can come before it. The job id is also the event's id: submitting again with
        the same ``job_id`` is a retransmission that the pipeline's dedup drops.

        Args:
            value: The event (the pipeline's input schema).
            job_id: The job's id (a random one by default).
            callback: A URL the job's end is POSTed to (by ``pipeline jobs callbacks``).
            seq: The event's sequence number (the publisher's clock by default).

        Raises:
            EncodeError: ``value`` breaks the input schema; nothing was written.
        """
        job = job_id or uuid.uuid4().hex
        self._publisher.check(value)  # a bad value writes nothing, not even "accepted"
        key = job.encode()
        accepted = JobStatus(job, JobState.ACCEPTED, callback=callback, time=now_ms())
        self._mine[job] = None
        while len(self._mine) > self._remember:
            self._mine.popitem(last=False)
        try:
            await self._producer.send_and_wait(
                self.topics.status, accepted.encode(), key=key,
                partition=partition_for(key, self._status_parts), headers=[(JOB_HEADER, key)],
            )  # fmt: skip
        except kerr.KafkaError as exc:
            raise translate(exc, "writing a job's status", topic=self.topics.status) from exc
        headers = [(JOB_HEADER, key)]
        if callback:
            headers.append((CALLBACK_HEADER, callback.encode()))
        await self._publisher.publish(value, seq=seq, event_id=key, headers=headers)
        return job

    async def status(self, job: str) -> JobStatus | None:
        """The job's status now (``None``: no such job)."""
        ended = self._ended.get(job)
        if ended is not None:
            return ended
        return await read_status(self._bootstrap, self.topics.status, job)

    async def result(self, job: str, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Wait for the job's end; return the last stage's result.

        Raises:
            JobFailedError: A stage dead-lettered the job's record (names the stage and the
                error class); after a fixed replay the job may still complete.
            TimeoutError: No end within ``timeout`` seconds.
        """
        status = self._ended.get(job)
        if status is None:
            future: asyncio.Future[JobStatus] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(job, []).append(future)  # listening from now on
            try:
                if job not in self._mine:
                    # Not submitted here (or long ago): it may have ended before this client
                    # listened; the table says.
                    found = await read_status(self._bootstrap, self.topics.status, job)
                    if found is not None and found.done and not future.done():
                        future.set_result(found)
                async with asyncio.timeout(timeout):
                    status = await future
            finally:
                waiting = self._waiters.get(job, [])
                if future in waiting:
                    waiting.remove(future)
                if not waiting:
                    self._waiters.pop(job, None)
        if status.state is JobState.FAILED:
            stage, error = status.stage or "?", status.error or ""
            raise JobFailedError(job, stage, status.error_class or "?", error)
        return status.result

    async def _read_replies(self) -> None:
        consumer = self._replies
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except kerr.KafkaError:  # the client retries on its own; keep listening
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    if record.key is None or record.value is None:
                        continue
                    job = record.key.decode()
                    if job not in self._mine and job not in self._waiters:
                        continue  # another client's job
                    try:
                        status = JobStatus.decode(record.value)
                    except PipelineError:
                        continue
                    if not status.done:  # replayed: it runs again; wait for its new end
                        self._ended.pop(job, None)
                        continue
                    self._ended[job] = status
                    self._ended.move_to_end(job)
                    while len(self._ended) > self._remember:
                        self._ended.popitem(last=False)
                    for future in self._waiters.pop(job, []):
                        if not future.done():
                            future.set_result(status)
