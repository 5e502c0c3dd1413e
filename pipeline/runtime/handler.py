"""What happens to one record inside a stage: dedup, decode, call, retry, emit, dead-letter.

The worker (:mod:`pipeline.runtime.worker`) owns the loop, batching, rebalances and commits;
this module owns the per-record path, which decides the framework's speed: no awaits unless the
stage is async or a call fails, no per-record logging, few objects per record.

Dedup and parks are the :class:`~pipeline.runtime.gate.Gate`'s; replayed records
(``dlq.replayed``) and parked keys take a slower path of their own, described in
:mod:`pipeline.runtime.parking`. A record whose retries run out with a retriable error is held
for the breaker's verdict (:mod:`pipeline.runtime.holds`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from types import GeneratorType
from typing import Any

from pipeline.dsl import StageNode
from pipeline.errors import CodecError, StageError
from pipeline.record import ID_HEADER, PART_HEADER, SEQ_HEADER, WRITER_HEADER, Record, decode_seq
from pipeline.runtime.deadletter import (
    REPLAYED,
    ClassLog,
    Parked,
    dead_letter_headers,
    error_class,
)
from pipeline.runtime.gate import Gate
from pipeline.runtime.holds import Held, Holds, Tripped
from pipeline.runtime.jobs import JobReports
from pipeline.runtime.output import Output
from pipeline.runtime.state import PartitionTable, now_ms
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Transport
from pipeline.runtime.writers import writer_id
from pipeline.schema import SchemaStore

log = logging.getLogger(__name__)

_DEAD = object()  # the stage function failed for good; the record is dead-lettered
_HELD = object()  # it failed after its retries and waits for the breaker's verdict


class RecordHandler:
    """Handles records of one stage; every input ends as output, filtered, duplicate or DLQ.

    A record whose retries run out with a retriable error is *held* instead (see
    :mod:`pipeline.runtime.holds`) until a verdict: poison (dead-lettered) or an outage (the
    breaker trips; inline, :class:`~pipeline.runtime.holds.Tripped` is raised out of the batch).
    """

    def __init__(
        self,
        node: StageNode,
        schemas: SchemaStore,
        transport: Transport,
        stats: StageStats,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        tracing: bool = False,
    ) -> None:
        stage = node.stage
        self.node = node
        self.transport = transport
        self.stats = stats
        self._sleep = sleep
        self._decode = schemas.codec(stage.input).decode
        self._encode = schemas.codec(stage.output).encode if stage.output else None
        self._invoke: Any = stage.invoker()
        self.is_async = self._is_async = stage.is_async
        self._retry = stage.retry
        self._out = node.output_topic
        self._dlq = node.dlq_topic
        self._gate = Gate(node, stats, self.dead_letter)
        self._class_log = ClassLog(node.name)
        # The plain path: no dedup, no parking, f(value) only, sync. No headers are read and
        # no Record is built unless a call fails.
        if tracing:  # a span per call, joined to the record's traceparent
            from pipeline.ops.tracing import spans_recorded, traced

            if spans_recorded():
                name = f"{node.pipeline}.{stage.name}"
                self._invoke = traced(self._invoke, name, is_async=stage.is_async)
            else:
                tracing = False
                log.warning(
                    "stage %s: tracing asked for, but no OpenTelemetry SDK is configured in "
                    "this process, so no spans are made (the traceparent header is passed on); "
                    "configure one (a TracerProvider and an exporter) before the stages start",
                    node.name,
                )
        # Jobs (pipeline.jobs): each record of a job is reported as it passes or dies here.
        self.jobs = JobReports(node, transport) if node.jobs is not None else None
        self._plain = not (
            self._gate.active or stage.wants_record or stage.is_async or tracing or self.jobs
        )
        # f(value) without spans: no Record is built for a sync batch unless a call fails.
        self._lean = not (stage.wants_record or tracing)
        self._fn = stage.fn
        self.output = Output(transport, node.output_topic, self._encode, stats)
        self.holds = Holds(stage.breaker, clock)
        self.inline = True  # a trip raises Tripped; the key-lane worker sets False and polls
        self.on_finished: Callable[[Any], None] | None = None  # lanes: a held record is done
        self.resource: Any = None  # what the stage's setup yielded (record.resource)
        self._now = 0  # ms, once per batch: when writers were last seen
        self._releasing = asyncio.Lock()
        self._success_again = False
        self._last_chance: dict[int, int] = {}  # id(msg) -> attempts made before its hold
        self._judged: set[tuple[int, bytes]] = set()  # keys judged poison in this release

    # -- the two entry points: a whole batch of a sync stage, one record of an async one --

    async def handle_sync_batch(self, msgs: list[Any], table: PartitionTable) -> None:
        """Handle a partition's batch in order; awaits only when a call fails."""
        self._now = now_ms()
        if self._plain:
            await self._plain_batch(msgs, table)
            return
        decode, invoke, stats, holds, now = (
            self._decode, self._invoke, self.stats, self.holds, self._now,
        )  # fmt: skip
        check, remember, jobs = self._gate.check, self._gate.remember, self.jobs
        fn = self._fn if self._lean else None
        # Holds change only when a call fails or a release runs (a sync stage has no lanes):
        # read their state once, and again after those.
        active = holds.active
        for msg in msgs:
            if active and holds.blocks(msg):
                holds.behind(msg, table)  # its key waits for a verdict on an earlier record
                continue
            stats.consumed += 1
            seq, part, eid, replay, writer = _ids(msg.headers)
            mark = check(msg, table, seq, part, eid, replay, writer)
            if mark is None:
                continue
            try:
                value = decode(msg.value)
            except CodecError as exc:
                self._dead(msg, exc, 0, table, mark, writer)
                continue
            record = None if fn is not None else self._context(msg, value, seq, eid, table)
            try:
                result = fn(value) if record is None else invoke(value, record)  # type: ignore[misc]
                if type(result) is GeneratorType:  # a returned generator: run it here
                    result = list(result)
            except Exception as exc:
                if record is None:
                    record = self._context(msg, value, seq, eid, table)
                result = await self._retry_or_dead_letter(msg, record, exc, mark)
                active = holds.active
                if result is _DEAD or result is _HELD:
                    continue
            if active and holds.held:
                await self.release()  # a call succeeded: the held records get their verdict
                active = holds.active
            try:
                self.output.emit(msg, result, part)
            except CodecError as exc:  # an output that breaks the output schema
                self._dead(msg, exc, 1, table, mark, writer)
                continue
            if jobs is not None:
                jobs.passed(msg, result)
            remember(msg, table, mark, writer, now)

    async def _plain_batch(self, msgs: list[Any], table: PartitionTable) -> None:
        """:meth:`handle_sync_batch` for the plain case, with the common result inlined."""
        decode, fn, encode, stats = self._decode, self._fn, self._encode, self.stats
        out, append, keep = self._out, self.transport.append, self.output.keep_partition
        holds = self.holds
        active = holds.active  # as in handle_sync_batch: refreshed after failures, releases
        for msg in msgs:
            if active and holds.blocks(msg):
                holds.behind(msg, table)
                continue
            stats.consumed += 1
            try:
                value = decode(msg.value)
            except CodecError as exc:
                self._dead(msg, exc, 0, table, False)
                continue
            try:
                result = fn(value)
                if type(result) is GeneratorType:
                    result = list(result)
            except Exception as exc:
                seq, _part, eid, _replay, _writer = _ids(msg.headers)
                record = self._context(msg, value, seq, eid, table)
                result = await self._retry_or_dead_letter(msg, record, exc, False)
                active = holds.active
                if result is _DEAD or result is _HELD:
                    continue
            if active and holds.held:
                await self.release()
                active = holds.active
            try:
                if type(result) is dict and keep and encode is not None and out is not None:
                    data = encode(result)
                    src = msg.partition
                    append(out, src, msg.key, data, msg.headers, msg.timestamp, src)
                    stats.produced += 1
                    stats.processed += 1
                else:
                    self.output.emit(msg, result, _ids(msg.headers)[1])
            except CodecError as exc:
                self._dead(msg, exc, 1, table, False)

    @property
    def gate(self) -> Gate:
        """Dedup and parks in front of the stage function."""
        return self._gate

    async def handle_one(self, msg: Any, table: PartitionTable) -> bool:
        """Handle one record (an async stage's, inline or in a key lane, or a released one).

        Returns:
            Whether the record is finished; ``False`` when it is held (or waits behind a held
            record of its key): :attr:`on_finished` is called once it is.
        """
        holds = self.holds
        if holds.active and (holds.blocks(msg) or (holds.tripped and not self.inline)):
            # Behind a held record of its key; or the breaker tripped and the worker is about
            # to pause: no new calls to a dependency that is down (read again after the pause,
            # or handled when a call in flight succeeds after all).
            holds.behind(msg, table)
            return False
        return await self._handle(msg, table)

    async def _handle(self, msg: Any, table: PartitionTable) -> bool:
        """:meth:`handle_one` past the check for a held record of the key."""
        holds = self.holds
        self._now = now = now_ms()
        self.stats.consumed += 1
        seq, part, eid, replay, writer = _ids(msg.headers)
        mark = self._gate.check(msg, table, seq, part, eid, replay, writer)
        if mark is None:
            return True
        try:
            value = self._decode(msg.value)
        except CodecError as exc:
            self._dead(msg, exc, 0, table, mark, writer)
            return True
        record = self._context(msg, value, seq, eid, table)
        try:
            result = self._invoke(value, record)
            if self._is_async:
                result = await result
            if type(result) is GeneratorType:
                result = list(result)
        except Exception as exc:
            result = await self._retry_or_dead_letter(msg, record, exc, mark)
            if result is _HELD:
                return False
            if result is _DEAD:
                return True
        if holds.held:
            await self.release()
        try:
            self.output.emit(msg, result, part)
        except CodecError as exc:
            self._dead(msg, exc, 1, table, mark, writer)
            return True
        if self.jobs is not None:
            self.jobs.passed(msg, result)
        self._gate.remember(msg, table, mark, writer, now)
        return True

    # -- dead letters ------------------------------------------------------------------------

    def _dead(
        self,
        msg: Any,
        exc: BaseException,
        attempts: int,
        table: Any,
        mark: Any,
        writer: bytes | None = None,
    ) -> None:
        """Dead-letter a record, park its key (park mode) and remember it as handled."""
        self.dead_letter(msg, exc, attempts)
        if writer is None:
            writer = _ids(msg.headers)[4]
        self._gate.dead(msg, exc, table, mark, writer, self._now)

    def condemn(self, msg: Any, table: PartitionTable, exc: BaseException, deliveries: int) -> None:
        """Dead-letter a record without calling the stage (workers died with it in hand; see
        :mod:`pipeline.runtime.crashes`): dedup and parking see it as any dead letter."""
        self._now = now_ms()
        self.stats.consumed += 1
        seq, part, eid, replay, writer = _ids(msg.headers)
        mark = self._gate.check(msg, table, seq, part, eid, replay, writer)
        if mark is not None:  # (a duplicate is dropped and counted as one)
            self._dead(msg, exc, deliveries, table, mark, writer)

    # -- failures ----------------------------------------------------------------------------

    async def _retry_or_dead_letter(
        self, msg: Any, record: Record, exc: Exception, mark: Any
    ) -> Any:
        """Retry the stage function with backoff; when it keeps failing, dead-letter it, or
        hold it for the breaker's verdict (see :mod:`pipeline.runtime.holds`).

        A record whose error is retriable is held, unless calls of other records succeeded
        while it was being retried (key lanes run them meanwhile): the dependency works, so
        it is poison and goes to the dead-letter topic at once. Successes during the first
        attempt do not count: they may be calls that were answered just before an outage.
        Each attempt gets a freshly decoded value: a failed attempt may have changed the last.
        """
        policy, stats = self._retry, self.stats
        attempt = 1
        earlier = self._last_chance.pop(id(msg), None)  # a held record's one more attempt
        max_attempts = policy.max_attempts if earlier is None else 1
        watch = -1  # successes of other calls when the second attempt began
        while _retriable(exc) and attempt < max_attempts:
            stats.retries += 1
            await self._sleep(policy.backoff(attempt))
            if watch < 0:
                watch = stats.processed + stats.filtered
            attempt += 1
            record.value = self._decode(msg.value)
            try:
                result = self._invoke(record.value, record)
                if self._is_async:
                    result = await result
                if type(result) is GeneratorType:
                    result = list(result)
            except Exception as again:
                exc = again
                continue
            return result
        holds = self.holds
        if earlier is not None:  # its one more attempt failed while other calls succeed
            self._dead(msg, exc, attempt + earlier, record._table, mark)
            return _DEAD
        if holds.enabled and _retriable(exc) and (msg.partition, msg.key) not in self._judged:
            # Right after an outage (probing, or failing the way the outage did), a record
            # may have failed just before the dependency came back: one more attempt before
            # the poison verdict.
            outage_like = stats.state == "probing" or error_class(exc) in holds.tripped_on
            if 0 <= watch < stats.processed + stats.filtered:  # others passed meanwhile
                if outage_like:
                    attempt += 1
                    record.value = self._decode(msg.value)
                    try:
                        result = self._invoke(record.value, record)
                        if self._is_async:
                            result = await result
                        return list(result) if type(result) is GeneratorType else result
                    except Exception as again:
                        exc = again
            else:
                stats.consumed -= 1  # counted again when it is handled for good
                tripped = holds.hold(
                    msg, record._table, exc, attempt, mark, record, last_chance=outage_like
                )
                stats.held = len(holds.held)
                if tripped and self.inline:
                    raise Tripped
                return _HELD
        self._dead(msg, exc, attempt, record._table, mark)
        return _DEAD

    async def release(self, *, overdue: bool = False) -> None:
        """End the holds and handle the records that waited behind them.

        After a call succeeded (the dependency works), the held records are poison: they are
        dead-lettered, except that one held while the stage probes after a pause gets one more
        attempt first (dead-lettered if it fails again); when ``overdue`` (no verdict came),
        the held records are dead-lettered at once; after the breaker tripped (the outage is
        over), every held record is handled again as new. One release runs at a time (key
        lanes); a success during it is remembered and answered when it ends.
        """
        if self._releasing.locked():
            self._success_again = True
            return
        holds = self.holds
        async with self._releasing:
            while True:
                self._success_again = False
                mode = "again" if holds.tripped else ("poison" if overdue else "last-chance")
                items = holds.take()
                if items:
                    await self._release(items, mode)
                if self._success_again and holds.held:
                    overdue = False
                    continue  # a call succeeded meanwhile: what was held again gets its verdict
                orphans = holds.take_orphans()
                while orphans:
                    await self._release(orphans, "again")
                    orphans = holds.take_orphans()
                break
        self.stats.held = len(holds.held)

    async def _release(self, items: list[Held], mode: str) -> None:
        holds = self.holds
        holds.block({(h.msg.partition, h.msg.key) for h in items if h.msg.key is not None})
        judged = self._judged
        try:
            for i, h in enumerate(items):
                try:
                    if h.failed and (
                        mode == "poison" or (mode == "last-chance" and not h.last_chance)
                    ):
                        assert h.exc is not None
                        self.stats.consumed += 1
                        self._dead(h.msg, h.exc, h.attempts, h.table, h.mark)
                        if h.msg.key is not None:
                            # Its key was judged poison: its records behind it that fail too
                            # in this release go to the dead-letter topic without a new wait.
                            judged.add((h.msg.partition, h.msg.key))
                        done = True
                    else:
                        if h.failed and mode == "last-chance":
                            self._last_chance[id(h.msg)] = h.attempts
                        done = await self._again(h.msg, h.table)
                except Tripped:
                    for rest in items[i + 1 :]:  # unhandled: no commit may pass them
                        holds.behind(rest.msg, rest.table)
                    raise
                finally:
                    self._last_chance.pop(id(h.msg), None)
                if done and self.on_finished is not None:
                    self.on_finished(h.msg)
        finally:
            holds.block(set())
            judged.clear()
        self.stats.held = len(holds.held)

    async def _again(self, msg: Any, table: PartitionTable) -> bool:
        """Handle a released record as if it had just arrived (it may be held again)."""
        if self.holds.blocks_held(msg):
            self.holds.behind(msg, table)  # its key's head failed again during this release
            return False
        return await self._handle(msg, table)

    def dead_letter(self, msg: Any, exc: BaseException, attempts: int) -> None:
        """Write the original record, untouched, with ``dlq.*`` headers to the DLQ topic."""
        t, stats = self.transport, self.stats
        headers = dead_letter_headers(
            msg.headers, stage=self.node.name, exc=exc, attempts=attempts,
            topic=msg.topic, partition=msg.partition, offset=msg.offset,
        )  # fmt: skip
        part = t.partition_for(self._dlq, msg.key)
        t.append(self._dlq, part, msg.key, msg.value, headers, msg.timestamp, msg.partition)
        undo = self.node.undo_topic
        if undo is not None and not isinstance(exc, Parked):
            # An earlier stage undoes its part (pipeline.runtime.compensation); a parked
            # record did not fail, it waits for its key's replay.
            part = t.partition_for(undo, msg.key)
            t.append(undo, part, msg.key, msg.value, headers, msg.timestamp, msg.partition)
        stats.dead_letters += 1
        stats.dead_by_error[error_class(exc)] += 1
        if self.jobs is not None:
            self.jobs.failed(msg, exc)
        if stats.dead_letters <= 20 or stats.dead_letters % 1000 == 0:
            log.warning(
                "stage %s: dead-lettered %s/%d@%d after %d attempt(s): %s: %s (%d so far)",
                self.node.name, msg.topic, msg.partition, msg.offset, attempts,
                error_class(exc), exc, stats.dead_letters,
            )  # fmt: skip
        self._class_log.dead_lettered(stats.dead_by_error)

    def _context(
        self, msg: Any, value: Any, seq: int | None, eid: bytes | None, table: PartitionTable
    ) -> Record:
        """The :class:`Record` a stage function (or a retry) sees for ``msg``."""
        record = Record(
            msg.key, value, seq=seq, id=eid, headers=msg.headers, timestamp=msg.timestamp,
            topic=msg.topic, partition=msg.partition, offset=msg.offset,
        )  # fmt: skip
        record._table = table
        record.resource = self.resource
        return record


def _ids(headers: Any) -> tuple[int | None, int, bytes | None, bytes | None, bytes]:
    """The record's sequence number, flat-map part, event id, replay id and writer."""
    seq = eid = replay = None
    part = 0
    writer = b""  # records from outside the framework: one anonymous writer
    for k, v in headers:
        if k == SEQ_HEADER:
            seq = decode_seq(v)
        elif k == WRITER_HEADER:
            writer = v if len(v) <= 64 else writer_id(v)
        elif k == ID_HEADER:
            eid = v
        elif k == PART_HEADER:
            part = int(v)
        elif k == REPLAYED:
            replay = v
    return seq, part, eid, replay, writer


def _retriable(exc: BaseException) -> bool:
    return exc.retriable if isinstance(exc, StageError) else not isinstance(exc, CodecError)
