"""What happens to one record inside a stage: dedup, decode, call, retry, emit, dead-letter.

The worker (:mod:`pipeline.runtime.worker`) owns the loop, batching, rebalances and commits;
this module owns the per-record path, which decides the framework's speed: no awaits unless the
stage is async or a call fails, no per-record logging, few objects per record.

Replayed records (``dlq.replayed``) and parked keys take a slower path of their own, described
in :mod:`pipeline.runtime.parking`; with the default ``on_dead_letter`` policy (continue) the
hot path does not look at parks at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import GeneratorType
from typing import Any

from pipeline.dsl import StageNode
from pipeline.errors import CodecError, StageError
from pipeline.record import ID_HEADER, PART_HEADER, SEQ_HEADER, Record, decode_seq
from pipeline.runtime.deadletter import (
    REPLAYED,
    ClassLog,
    Parked,
    dead_letter_headers,
    error_class,
)
from pipeline.runtime.output import Output
from pipeline.runtime.parking import (
    Park,
    ReplayMark,
    admit_replayed,
    replay_identity,
    replay_of,
)
from pipeline.runtime.state import DUPLICATE, GAP, PartitionTable, now_ms, position
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Transport
from pipeline.schema import SchemaStore
from pipeline.stage import DedupMode

log = logging.getLogger(__name__)

_DEAD = object()  # the stage function failed for good; the record is dead-lettered
_GAP_LOG_EVERY = 1000


class RecordHandler:
    """Handles records of one stage; every input ends as output, filtered, duplicate or DLQ."""

    def __init__(
        self,
        node: StageNode,
        schemas: SchemaStore,
        transport: Transport,
        stats: StageStats,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
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
        mode = stage.dedup.mode
        self._by_seq = mode in (DedupMode.AUTO, DedupMode.SEQUENCE)
        self._by_id = mode in (DedupMode.AUTO, DedupMode.EVENT_ID)
        self._parks = stage.on_dead_letter.parks
        # The gate in front of each record: dedup, plus the park check only in park mode.
        self._gate = self._check_parked if self._parks else self._check
        self._class_log = ClassLog(node.name)
        # The plain path: no dedup, no parking, f(value) only, sync. No headers are read and
        # no Record is built unless a call fails.
        self._plain = not (
            self._by_seq or self._by_id or self._parks or stage.wants_record or stage.is_async
        )
        self._fn = stage.fn
        self.output = Output(transport, node.output_topic, self._encode, stats)

    # -- the two entry points: a whole batch of a sync stage, one record of an async one --

    async def handle_sync_batch(self, msgs: list[Any], table: PartitionTable) -> None:
        """Handle a partition's batch in order; awaits only when a call fails."""
        if self._plain:
            await self._plain_batch(msgs, table)
            return
        decode, invoke, stats, gate = self._decode, self._invoke, self.stats, self._gate
        for msg in msgs:
            stats.consumed += 1
            seq, part, eid, replay = _ids(msg.headers)
            mark = gate(msg, table, seq, part, eid, replay)
            if mark is None:
                continue
            try:
                value = decode(msg.value)
            except CodecError as exc:
                self._dead(msg, exc, 0, table, mark)
                continue
            record = _context(msg, value, seq, eid, table)
            try:
                result = invoke(value, record)
                if type(result) is GeneratorType:  # a returned generator: run it here
                    result = list(result)
            except Exception as exc:
                result = await self._retry_or_dead_letter(msg, record, exc, mark)
                if result is _DEAD:
                    continue
            try:
                self.output.emit(msg, result, part)
            except CodecError as exc:  # an output that breaks the output schema
                self._dead(msg, exc, 1, table, mark)
                continue
            self._remember(msg, table, mark)

    async def _plain_batch(self, msgs: list[Any], table: PartitionTable) -> None:
        """:meth:`handle_sync_batch` for the plain case, with the common result inlined."""
        decode, fn, encode, stats = self._decode, self._fn, self._encode, self.stats
        out, append, keep = self._out, self.transport.append, self.output.keep_partition
        for msg in msgs:
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
                seq, _part, eid, _replay = _ids(msg.headers)
                record = _context(msg, value, seq, eid, table)
                result = await self._retry_or_dead_letter(msg, record, exc, False)
                if result is _DEAD:
                    continue
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

    async def handle_one(self, msg: Any, table: PartitionTable) -> None:
        """Handle one record of an async stage (inline or in a key lane)."""
        self.stats.consumed += 1
        seq, part, eid, replay = _ids(msg.headers)
        mark = self._gate(msg, table, seq, part, eid, replay)
        if mark is None:
            return
        try:
            value = self._decode(msg.value)
        except CodecError as exc:
            self._dead(msg, exc, 0, table, mark)
            return
        record = _context(msg, value, seq, eid, table)
        try:
            result = await self._invoke(value, record)
            if type(result) is GeneratorType:
                result = list(result)
        except Exception as exc:
            result = await self._retry_or_dead_letter(msg, record, exc, mark)
            if result is _DEAD:
                return
        try:
            self.output.emit(msg, result, part)
        except CodecError as exc:
            self._dead(msg, exc, 1, table, mark)
            return
        self._remember(msg, table, mark)

    # -- dedup: check before handling, remember after (so state never runs ahead of output) --

    def _check(
        self,
        msg: Any,
        table: PartitionTable,
        seq: int | None,
        part: int,
        eid: bytes | None,
        replay: bytes | None,
    ) -> Any:
        """None for a duplicate; otherwise what to remember once the record is handled."""
        if replay is not None:
            return self._check_replayed(msg, table, seq, part, eid)
        if self._by_seq and seq is not None and msg.key is not None:
            pos = position(seq, part)
            status = table.check_sequence(msg.key, pos)
            if status == DUPLICATE:
                self.stats.duplicates += 1
                return None
            if status == GAP:
                self.stats.gaps += 1
                if self.stats.gaps % _GAP_LOG_EVERY == 1:
                    log.warning(
                        "stage %s: sequence gap for key %r at seq %d (%d gaps so far)",
                        self.node.name, msg.key, seq, self.stats.gaps,
                    )  # fmt: skip
            return pos
        if self._by_id and eid is not None:
            now = now_ms()
            if table.seen_id(eid, now):
                self.stats.duplicates += 1
                return None
            return (eid, now)
        return False  # no dedup for this record

    def _remember(self, msg: Any, table: PartitionTable, mark: Any) -> None:
        if mark is False:
            return
        if type(mark) is int:
            table.remember_sequence(msg.key, mark)
        elif type(mark) is ReplayMark:
            mark.done(table, msg.key, now_ms())
        else:
            table.remember_id(*mark)

    # -- replays and parked keys (see pipeline.runtime.parking) ------------------------------

    def _check_replayed(
        self, msg: Any, table: PartitionTable, seq: int | None, part: int, eid: bytes | None
    ) -> ReplayMark | None:
        """A replayed record: dedup by replay identity; then rule 3 (parking stages only)."""
        identity, pos = replay_identity(msg.key, seq, part, eid, self._by_seq, self._by_id)
        if identity is not None and table.was_replayed(identity):
            self.stats.duplicates += 1
            return None
        replay = replay_of(msg.headers, self.node.name)
        if self._parks:
            park = admit_replayed(table, msg.key, replay)
            if park is not None:
                self._park(msg, park)  # not remembered: a later replay brings it back
                return None
        return ReplayMark(identity, pos, replay)

    def _check_parked(
        self,
        msg: Any,
        table: PartitionTable,
        seq: int | None,
        part: int,
        eid: bytes | None,
        replay: bytes | None,
    ) -> Any:
        """The gate of a parking stage: dedup, then park the records of parked keys."""
        mark = self._check(msg, table, seq, part, eid, replay)
        if mark is None or replay is not None or msg.key is None:
            return mark  # replayed records took their own path through the parks
        raw = table.parked(msg.key)
        if raw is None:
            return mark
        self._park(msg, Park.decode(raw))
        self._remember(msg, table, mark)  # handled: a redelivered copy is a duplicate
        return None

    def _park(self, msg: Any, park: Park) -> None:
        self.dead_letter(msg, Parked(park.reason()), 0)

    def _dead(self, msg: Any, exc: BaseException, attempts: int, table: Any, mark: Any) -> None:
        """Dead-letter a record, park its key (park mode) and remember it as handled."""
        self.dead_letter(msg, exc, attempts)
        replay = ""
        if type(mark) is ReplayMark:
            replay = mark.replay  # not remembered: a later replay may process it
        else:
            self._remember(msg, table, mark)
        if self._parks and msg.key is not None:
            park = Park(replay, msg.topic, msg.partition, msg.offset, error_class(exc))
            table.park(msg.key, park.encode())

    # -- failures ----------------------------------------------------------------------------

    async def _retry_or_dead_letter(
        self, msg: Any, record: Record, exc: Exception, mark: Any
    ) -> Any:
        """Retry the stage function with backoff; dead-letter the record when it keeps failing.

        Each attempt gets a freshly decoded value: a failed attempt may have changed the last.
        """
        policy = self._retry
        attempt = 1
        while _retriable(exc) and attempt < policy.max_attempts:
            self.stats.retries += 1
            await self._sleep(policy.backoff(attempt))
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
        self._dead(msg, exc, attempt, record._table, mark)
        return _DEAD

    def dead_letter(self, msg: Any, exc: BaseException, attempts: int) -> None:
        """Write the original record, untouched, with ``dlq.*`` headers to the DLQ topic."""
        t, stats = self.transport, self.stats
        headers = dead_letter_headers(
            msg.headers, stage=self.node.name, exc=exc, attempts=attempts,
            topic=msg.topic, partition=msg.partition, offset=msg.offset,
        )  # fmt: skip
        part = t.partition_for(self._dlq, msg.key)
        t.append(self._dlq, part, msg.key, msg.value, headers, msg.timestamp, msg.partition)
        stats.dead_letters += 1
        stats.dead_by_error[error_class(exc)] += 1
        if stats.dead_letters <= 20 or stats.dead_letters % 1000 == 0:
            log.warning(
                "stage %s: dead-lettered %s/%d@%d after %d attempt(s): %s: %s (%d so far)",
                self.node.name, msg.topic, msg.partition, msg.offset, attempts,
                error_class(exc), exc, stats.dead_letters,
            )  # fmt: skip
        self._class_log.dead_lettered(stats.dead_by_error)


def _context(
    msg: Any, value: Any, seq: int | None, eid: bytes | None, table: PartitionTable
) -> Record:
    """The :class:`Record` a stage function (or a retry) sees for ``msg``."""
    record = Record(
        msg.key, value, seq=seq, id=eid, headers=msg.headers, timestamp=msg.timestamp,
        topic=msg.topic, partition=msg.partition, offset=msg.offset,
    )  # fmt: skip
    record._table = table
    return record


def _ids(headers: Any) -> tuple[int | None, int, bytes | None, bytes | None]:
    """The record's sequence number, flat-map part, event id and replay id, from its headers."""
    seq = eid = replay = None
    part = 0
    for k, v in headers:
        if k == SEQ_HEADER:
            seq = decode_seq(v)
        elif k == ID_HEADER:
            eid = v
        elif k == PART_HEADER:
            part = int(v)
        elif k == REPLAYED:
            replay = v
    return seq, part, eid, replay


def _retriable(exc: BaseException) -> bool:
    return exc.retriable if isinstance(exc, StageError) else not isinstance(exc, CodecError)
