"""Run a pipeline's :class:`~pipeline.schedule.Schedule`: one emitter however many replicas.

Leadership comes from Kafka: every replica joins the consumer group
``<pipeline>.schedule.<name>`` on the one-partition compacted topic of the same name; the
member the group assigns its partition to leads, the others wait (a member that dies is
replaced within the group's session timeout). The leader

1. reads the last tick emitted from that topic (key = the schedule's name, value = the tick's
   ISO time), which is how a new leader knows where the previous one stopped;
2. at each tick, publishes ``make(tick)`` to the pipeline's source with the framework's
   :class:`~pipeline.publish.Publisher` (durable before it goes on: acks=all), as writer
   ``schedule:<name>`` with the tick's epoch second as its sequence number and
   ``<name>@<time>`` as its event id;
3. then records the tick in the schedule topic.

When the pipeline tracks jobs (:meth:`~pipeline.dsl.Pipeline.with_jobs`), each tick is a job
(its id is the tick's event id) submitted through a :class:`~pipeline.jobs.JobClient`; unless the
schedule allows ``overlap``, a tick whose predecessor's job has not ended yet is *held*: the
leader looks again every second, and the ticks that came due meanwhile follow ``catch_up``.

A leader that dies between 2 and 3 leaves a tick its successor emits again with the same
writer and sequence: the first stage's dedup table (the default policy) drops it. A leader that
loses its partition stops emitting before the group hands it over (the revocation callback
runs first).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka import errors as kerr

from pipeline.dsl import Pipeline
from pipeline.errors import DefinitionError
from pipeline.jobs import JobClient
from pipeline.publish import Publisher
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import translate
from pipeline.runtime.topics import TopicSpec, ensure_topics
from pipeline.schedule import Schedule
from pipeline.security import Bootstrap, connection

log = logging.getLogger(__name__)

__all__ = ["ScheduleRunner", "run_schedules", "schedule_topic"]


def schedule_topic(pipeline: Pipeline, schedule: Schedule) -> str:
    """The schedule's own topic (and its leadership group)."""
    return f"{pipeline.name}.schedule.{schedule.name}"


@dataclass(slots=True)
class ScheduleStats:
    """What ``pipeline run --schedule`` reports."""

    name: str
    leader: bool = False
    emitted: int = 0
    leaderships: int = 0
    last_tick: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"schedule": self.name, "leader": self.leader, "emitted": self.emitted,
                "leaderships": self.leaderships, "last_tick": self.last_tick}  # fmt: skip


class _Leadership(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, changed: asyncio.Event) -> None:
        self.leading = False
        self._changed = changed

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.leading = False
        self._changed.set()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.leading = bool(assigned)
        self._changed.set()


class ScheduleRunner:
    """One replica of one schedule (see the module docstring).

    Args:
        pipeline: The pipeline whose source the ticks feed.
        schedule: One of ``pipeline.schedules``.
        bootstrap: Where and how to connect.
        session_timeout_ms: How soon the group replaces a replica that went silent.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        schedule: Schedule,
        bootstrap: Bootstrap,
        *,
        session_timeout_ms: int = 10_000,
    ) -> None:
        self.pipeline = pipeline
        self.schedule = schedule
        self.connection = connection(bootstrap)
        self.topic = schedule_topic(pipeline, schedule)
        self.session_timeout_ms = session_timeout_ms
        self.stats = ScheduleStats(schedule.name)
        self._changed = asyncio.Event()
        self._leadership = _Leadership(self._changed)

    async def run(self, stop: asyncio.Event) -> ScheduleStats:
        """Take part in the election; emit the ticks while leading; return when ``stop``.

        Raises:
            DefinitionError: The schedule holds overlapping ticks, but the pipeline does not
                track jobs (nothing would tell when a tick's run ended).
        """
        if not self.schedule.overlap and self.pipeline.jobs is None:
            raise DefinitionError(
                f"schedule '{self.schedule.name}' holds a tick while the previous tick's run is "
                f"in flight (overlap=False), which needs the job status of the pipeline: build "
                f"'{self.pipeline.name}' with .with_jobs(), or let ticks overlap with "
                f"Schedule(..., overlap=True)"
            )
        spec = TopicSpec(
            self.topic, f"schedule '{self.schedule.name}'", 1, None,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
        )  # fmt: skip
        await ensure_topics(self.connection, [spec])
        args = self.connection.client_args()
        member = AIOKafkaConsumer(
            **args, group_id=self.topic, enable_auto_commit=False,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(1000, self.session_timeout_ms // 4),
            client_id=f"schedule-{self.schedule.name}",
        )  # fmt: skip
        marks = AIOKafkaProducer(**args, acks="all", enable_idempotence=True)
        await start_client(member, self.connection, f"joining schedule {self.topic}")
        try:
            await start_client(marks, self.connection, f"starting schedule {self.topic}")
            member.subscribe([self.topic], listener=self._leadership)
            writer = f"schedule:{self.schedule.name}"
            async with contextlib.AsyncExitStack() as clients:
                if self.pipeline.jobs is not None:
                    jobs = JobClient(self.connection, self.pipeline, writer=writer)
                    emit = _Emitter(self.schedule, jobs=await clients.enter_async_context(jobs))
                else:
                    codec = self.pipeline.schemas.codec(self.pipeline.stages[0].input)
                    publisher = Publisher(
                        self.connection, self.pipeline.source, codec, self.pipeline.key,
                        writer=writer, linger_ms=0,
                    )  # fmt: skip
                    emit = _Emitter(self.schedule, await clients.enter_async_context(publisher))
                await self._loop(stop, member, marks, emit)
        except kerr.KafkaError as exc:
            raise translate(exc, f"running schedule {self.schedule.name}") from exc
        finally:
            with contextlib.suppress(Exception):
                await marks.stop()
            with contextlib.suppress(Exception):
                await member.stop()
        return self.stats

    async def _loop(
        self,
        stop: asyncio.Event,
        member: AIOKafkaConsumer,
        marks: AIOKafkaProducer,
        emit: _Emitter,
    ) -> None:
        last: dt.datetime | None = None
        was_leading = False
        while not stop.is_set():
            # Polling keeps the membership alive (and runs the rebalance callbacks); the
            # records are this topic's own marks, read again below when leadership starts.
            await member.getmany(timeout_ms=50)
            leading = self._leadership.leading
            if leading and not was_leading:
                last = await self._last_mark() or _now()
                self.stats.leaderships += 1
                log.info("schedule %s: leading from %s", self.schedule.name, last.isoformat())
            if not leading and was_leading:
                log.info("schedule %s: no longer leading", self.schedule.name)
            was_leading = self.stats.leader = leading
            if not leading:
                await self._pause(stop, 0.2)
                continue
            assert last is not None
            for tick in self.schedule.due(after=last, now=_now()):
                if not self._leadership.leading or stop.is_set():
                    break
                if await emit.held(last, tick):
                    break  # looked at again in a moment; ticks due meanwhile: catch_up
                await emit(tick)
                mark = tick.isoformat().encode()
                await (await marks.send(self.topic, mark, key=self.schedule.name.encode()))
                last = tick
                self.stats.emitted += 1
                self.stats.last_tick = tick.isoformat()
            wait = (self.schedule.after(last) - _now()).total_seconds()
            await self._pause(stop, 1.0 if emit.holding else min(max(wait, 0.0), 0.5))

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_first(stop.wait(), self._changed.wait()), seconds)

    async def _last_mark(self) -> dt.datetime | None:
        """The last tick a leader recorded (the compacted topic's newest value)."""
        # earliest, and an explicit seek: right after assign(), seek_to_beginning() can lose
        # to the reset of the default policy (latest) and read nothing.
        reader = AIOKafkaConsumer(
            **self.connection.client_args(), enable_auto_commit=False,
            auto_offset_reset="earliest",
        )  # fmt: skip
        tp = TopicPartition(self.topic, 0)
        await start_client(reader, self.connection, f"reading schedule {self.topic}")
        found: dt.datetime | None = None
        try:
            reader.assign([tp])
            end = (await reader.end_offsets([tp]))[tp]
            reader.seek(tp, (await reader.beginning_offsets([tp]))[tp])
            while await reader.position(tp) < end:
                batch = await reader.getmany(tp, timeout_ms=500)
                for record in batch.get(tp, ()):
                    if record.key == self.schedule.name.encode() and record.value:
                        found = dt.datetime.fromisoformat(record.value.decode())
        finally:
            await reader.stop()
        return found


class _Emitter:
    """Publishes a schedule's ticks: as jobs (and held while the previous one runs) when the
    pipeline tracks jobs, else as plain events."""

    def __init__(
        self,
        schedule: Schedule,
        publisher: Publisher | None = None,
        *,
        jobs: JobClient | None = None,
    ) -> None:
        self.schedule = schedule
        self.publisher = publisher
        self.jobs = jobs
        self.holding: dt.datetime | None = None  # the tick held now

    async def __call__(self, tick: dt.datetime) -> None:
        s = self.schedule
        value, seq, ident = s.make(tick), s.sequence(tick), s.event_id(tick)
        if self.jobs is not None:
            await self.jobs.submit(value, job_id=ident, seq=seq)
        else:
            assert self.publisher is not None
            await self.publisher.publish(value, seq=seq, event_id=ident)

    async def held(self, last: dt.datetime, tick: dt.datetime) -> bool:
        """Whether ``tick`` waits for the run of the tick before it (``last``) to end."""
        if self.schedule.overlap or self.jobs is None:
            return False
        previous = self.schedule.event_id(last)
        status = await self.jobs.status(previous)
        if status is None or status.done:  # never ran (a first tick), or ended
            self.holding = None
            return False
        if self.holding != tick:
            log.info(
                "schedule %s: tick %s held: the run of %s is still %s",
                self.schedule.name, tick.isoformat(), previous, status.state.value,
            )  # fmt: skip
        self.holding = tick
        return True


async def run_schedules(
    pipeline: Pipeline,
    schedules: list[Schedule],
    bootstrap: Bootstrap,
    *,
    session_timeout_ms: int = 10_000,
    stop: asyncio.Event | None = None,
) -> list[ScheduleStats]:
    """Run a replica of each of ``schedules`` until ``stop`` is set (or SIGTERM/SIGINT)."""
    from pipeline.runtime.runner import signals

    stop = stop or asyncio.Event()
    runners = [
        ScheduleRunner(pipeline, s, bootstrap, session_timeout_ms=session_timeout_ms)
        for s in schedules
    ]
    with signals(stop):
        tasks = [asyncio.create_task(r.run(stop)) for r in runners]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r.stats for r in runners]


async def _first(*waits: Any) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
