"""TestDriver: run a pipeline (or one stage) in-process on the in-memory log, no broker.

The same :class:`~pipeline.runtime.worker.StageWorker` that runs on Kafka runs here, on
:class:`~pipeline.testing.memory.MemoryTransport`: dedup tables, retries, dead letters and
commits behave as they do on a broker. Retries wait on a virtual clock, so a test never sleeps.

Example:
    >>> driver = TestDriver(pipeline)                      # doctest: +SKIP
    >>> driver.send({"order_id": "o-1", "total": 10.0})    # doctest: +SKIP
    >>> driver.run()                                       # doctest: +SKIP
    >>> driver.outputs()                                   # doctest: +SKIP
    [{'order_id': 'o-1', 'total': 10.0, 'tax': 2.0}]
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.dsl import Pipeline, StageNode
from pipeline.errors import ConfigError, DefinitionError
from pipeline.jobs import JobStatus
from pipeline.publish import Events, SequenceClock, writer_identity
from pipeline.record import JOB_HEADER
from pipeline.runtime import deadletter
from pipeline.runtime.offsets import OffsetReset
from pipeline.runtime.state import USER_PREFIX
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Batching
from pipeline.runtime.worker import StageWorker
from pipeline.testing.memory import MemoryBroker, MemoryRecord, MemoryTransport

_FAST = Batching(fetch_wait_ms=1, flush_interval_ms=1)


class VirtualClock:
    """Waits that pass at once; :attr:`waits` records what was asked for.

    :meth:`now` is the virtual time: what the waits added up to, plus :meth:`advance`.
    """

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._now = 0.0

    @property
    def elapsed(self) -> float:
        return sum(self.waits)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass (e.g. a held record's verdict timeout)."""
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self._now += seconds
        await asyncio.sleep(0)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record in a stage's dead-letter topic, with its error headers read out."""

    key: bytes | None
    raw: bytes | None
    value: Any  # decoded when the bytes are a valid record, else None
    stage: str
    error_class: str
    error_message: str
    attempts: int
    headers: dict[str, bytes]


class TestDriver:
    """Pipes records through a pipeline's stages in memory, deterministically.

    Args:
        pipeline: The pipeline to run.
        stages: Names of the stages to run (default: all, in order).
        offset_reset: What a stage does when its position is gone from the log (records
            deleted with ``driver.broker.delete_records``): stop, by default.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        pipeline: Pipeline,
        stages: Iterable[str] | None = None,
        *,
        offset_reset: OffsetReset = OffsetReset(),
    ) -> None:
        self.pipeline = pipeline
        self.offset_reset = offset_reset
        self.nodes = [pipeline.node(n) for n in stages] if stages else pipeline.nodes()
        self.broker = MemoryBroker()
        self.clock = VirtualClock()
        self.stats: dict[str, StageStats] = {n.label: StageStats(n.label) for n in self.nodes}
        self._writer = writer_identity()
        self._clocks: dict[bytes, SequenceClock] = {}  # per writer, as each publisher has one
        parts = pipeline.topics.partitions
        topics = {pipeline.source}
        for node in self.nodes:
            topics |= {node.input_topic, node.dlq_topic, node.state_topic}
            if node.output_topic:
                topics.add(node.output_topic)
            # Compensation requests are written here; the driver runs no compensations.
            topics |= {t for t in (node.compensate_topic, node.undo_topic) if t}
        if pipeline.jobs is not None:
            topics |= {pipeline.jobs.status, pipeline.jobs.replies}
        for topic in sorted(topics):
            self.broker.create_topic(topic, parts)

    # -- input --------------------------------------------------------------------------------

    def send(
        self,
        value: dict[str, Any],
        *,
        seq: int | None = None,
        event_id: bytes | str | None = None,
        writer: str | bytes | None = None,
        stage: str | None = None,
        job: str | None = None,
        lane: str | None = None,
    ) -> MemoryRecord:
        """Publish a value as the :class:`~pipeline.publish.Publisher` would (validated,
        keyed by the sequence key, with a sequence number, a writer identity and an event id).

        Args:
            writer: Publish as this writer (a second publisher of the same keys, say); by
                default every send comes from one writer, the driver's own.
            stage: Send to this stage's input instead of the pipeline's source.
            job: Send it as this job (the pipeline tracks jobs; see :meth:`job`); the job id
                is its event id too, as :class:`~pipeline.jobs.JobClient` sends it.
            lane: Send it to this priority lane (its topic) of the first stage (default: the
                heaviest lane).

        Raises:
            EncodeError: The value breaks the input schema or lacks the key field.
        """
        if lane is not None:
            node = self.pipeline.node(stage or self.nodes[0].name, lane)
        else:
            node = self._node(stage) if stage else self.nodes[0]
        codec = self.pipeline.schemas.codec(node.stage.input)
        who = self._writer if writer is None else writer_identity(writer)
        clock = self._clocks.setdefault(who, SequenceClock())
        events = Events(codec, self.pipeline.key, clock, writer=who)
        extra = [] if job is None else [(JOB_HEADER, job.encode())]
        key, data, headers = events.record(value, seq=seq, event_id=event_id or job, headers=extra)
        return self.broker.produce(node.input_topic, key, data, headers)

    def send_raw(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes]] = (),
        *,
        stage: str | None = None,
    ) -> MemoryRecord:
        """Publish raw bytes (for poison records: truncated, foreign, corrupt)."""
        node = self._node(stage) if stage else self.nodes[0]
        return self.broker.produce(node.input_topic, key, value, headers)

    # -- running ------------------------------------------------------------------------------

    def run(self, timeout: float = 30.0) -> dict[str, StageStats]:
        """Run every stage until all input is handled (synchronous; see :meth:`drain`)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.drain(timeout))
        raise ConfigError("TestDriver.run() is synchronous; in async tests use 'await drain()'")

    async def drain(self, within: float = 30.0) -> dict[str, StageStats]:
        """Run the stages in order, each until its input is committed to the end."""
        deadline = time.monotonic() + within
        for node in self.nodes:
            await self._drain_stage(node, deadline)
        return self.stats

    async def _drain_stage(self, node: StageNode, deadline: float) -> None:
        transport = MemoryTransport(
            self.broker, group=node.group, input_topic=node.input_topic,
            state_topic=node.state_topic, max_wait_ms=1,
        )  # fmt: skip
        worker = StageWorker(
            node, self.pipeline.schemas, transport, batching=_FAST, sleep=self.clock.sleep,
            stats=self.stats[node.label], clock=self.clock.now, offset_reset=self.offset_reset,
        )  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        holds = worker.handler.holds
        try:
            while self.broker.lag(node.group, node.input_topic) and not task.done():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stage '{node.name}' did not drain its input in time")
                if holds.held and not holds.tripped and transport.caught_up() and worker.idle:
                    # Held records wait for a verdict no later record can bring: let the
                    # breaker's verdict timeout pass (they are dead-lettered as poison).
                    self.clock.advance(node.stage.breaker.verdict_timeout)
                await asyncio.sleep(0.001)
        finally:
            stop.set()
            await task  # re-raises what stopped the worker

    # -- output -------------------------------------------------------------------------------

    def outputs(self, stage: str | None = None) -> list[Any]:
        """Decoded output values of ``stage`` (default: the last stage), partition by partition."""
        node = self._node(stage) if stage else self.nodes[-1]
        if node.output_topic is None or node.stage.output is None:
            raise ConfigError(f"stage '{node.name}' is a sink: it has no output topic")
        codec = self.pipeline.schemas.codec(node.stage.output)
        return [codec.decode(r.value) for r in self.broker.records(node.output_topic) if r.value]

    def records(self, topic: str) -> list[MemoryRecord]:
        """Raw records of any topic."""
        return self.broker.records(topic)

    def dead_letters(self, stage: str | None = None) -> list[DeadLetter]:
        """The dead letters of ``stage`` (default: all stages), with their error headers."""
        nodes = [self._node(stage)] if stage else self.nodes
        found = []
        for node in nodes:
            codec = self.pipeline.schemas.codec(node.stage.input)
            for r in self.broker.records(node.dlq_topic):
                headers = dict(r.headers)
                try:
                    value = codec.decode(r.value) if r.value else None
                except Exception:  # the poison itself: keep the raw bytes only
                    value = None
                found.append(
                    DeadLetter(
                        key=r.key, raw=r.value, value=value,
                        stage=headers.get(deadletter.STAGE, b"").decode(),
                        error_class=headers.get(deadletter.ERROR_CLASS, b"").decode(),
                        error_message=headers.get(deadletter.ERROR_MESSAGE, b"").decode(),
                        attempts=int(headers.get(deadletter.ATTEMPTS, b"0")),
                        headers=headers,
                    )
                )  # fmt: skip
        return found

    def state(self, stage: str, key: bytes | str) -> Any:
        """The stage's own state value for ``key`` (``record.state``), as its changelog holds it."""
        raw = key.encode() if isinstance(key, str) else key
        wanted = USER_PREFIX + raw
        value = None
        for r in self.broker.records(self._node(stage).state_topic):
            if r.key == wanted:
                value = None if r.value is None else json.loads(r.value)
        return value

    def job(self, job: str) -> JobStatus | None:
        """The job's latest status in the pipeline's status table (``None``: no report yet).

        Raises:
            DefinitionError: The pipeline does not track jobs (``.with_jobs()``).
        """
        jobs = self.pipeline.jobs
        if jobs is None:
            raise DefinitionError(f"pipeline '{self.pipeline.name}' does not track jobs")
        found = [r for r in self.broker.records(jobs.status) if r.key == job.encode()]
        return JobStatus.decode(found[-1].value) if found and found[-1].value else None

    def _node(self, name: str) -> StageNode:
        for node in self.nodes:
            if node.name == name:
                return node
        return self.pipeline.node(name)  # raises with the list of stages
