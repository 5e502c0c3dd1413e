"""What happens to one record inside a stage: dedup, decode, call, retry, emit, dead-letter.

The worker (:mod:`pipeline.runtime.worker`) owns the loop, batching, rebalances and commits;
this module owns the per-record path, which decides the framework's speed: no awaits unless the
stage is async or a call fails, no per-record logging, few objects per record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import GeneratorType
from typing import Any

from pipeline.dsl import StageNode
from pipeline.errors import CodecError, StageError
from pipeline.record import ID_HEADER, PART_HEADER, SEQ_HEADER, Emit, Record, decode_seq
from pipeline.runtime.deadletter import dead_letter_headers, error_class
from pipeline.runtime.state import DUPLICATE, GAP, PartitionTable, now_ms, position
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Transport
from pipeline.schema import SchemaStore
from pipeline.stage import DedupMode

log = logging.getLogger(__name__)

PART_SHIFT = 16  # each flat-map level may emit up to 65,536 values per input
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

    # -- the two entry points: a whole batch of a sync stage, one record of an async one --

    async def handle_sync_batch(self, msgs: list[Any], table: PartitionTable) -> None:
        """Handle a partition's batch in order; awaits only when a call fails."""
        decode, invoke, stats = self._decode, self._invoke, self.stats
        for msg in msgs:
            stats.consumed += 1
            seq, part, eid = _ids(msg.headers)
            mark = self._check(msg, table, seq, part, eid)
            if mark is None:
                continue
            try:
                value = decode(msg.value)
            except CodecError as exc:
                self.dead_letter(msg, exc, 0)
                self._remember(msg, table, mark)
                continue
            record = Record(
                msg.key, value, seq=seq, id=eid, headers=msg.headers, timestamp=msg.timestamp,
                topic=msg.topic, partition=msg.partition, offset=msg.offset,
            )  # fmt: skip
            record._table = table
            try:
                result = invoke(value, record)
                if type(result) is GeneratorType:  # a returned generator: run it here
                    result = list(result)
            except Exception as exc:
                result = await self._retry_or_dead_letter(msg, record, exc)
                if result is _DEAD:
                    self._remember(msg, table, mark)
                    continue
            self._emit(msg, result, part)
            self._remember(msg, table, mark)

    async def handle_one(self, msg: Any, table: PartitionTable) -> None:
        """Handle one record of an async stage (inline or in a key lane)."""
        self.stats.consumed += 1
        seq, part, eid = _ids(msg.headers)
        mark = self._check(msg, table, seq, part, eid)
        if mark is None:
            return
        try:
            value = self._decode(msg.value)
        except CodecError as exc:
            self.dead_letter(msg, exc, 0)
            self._remember(msg, table, mark)
            return
        record = Record(
            msg.key, value, seq=seq, id=eid, headers=msg.headers, timestamp=msg.timestamp,
            topic=msg.topic, partition=msg.partition, offset=msg.offset,
        )  # fmt: skip
        record._table = table
        try:
            result = await self._invoke(value, record)
            if type(result) is GeneratorType:
                result = list(result)
        except Exception as exc:
            result = await self._retry_or_dead_letter(msg, record, exc)
            if result is _DEAD:
                self._remember(msg, table, mark)
                return
        self._emit(msg, result, part)
        self._remember(msg, table, mark)

    # -- dedup: check before handling, remember after (so state never runs ahead of output) --

    def _check(
        self, msg: Any, table: PartitionTable, seq: int | None, part: int, eid: bytes | None
    ) -> Any:
        """None for a duplicate; otherwise what to remember once the record is handled."""
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
        else:
            table.remember_id(*mark)

    # -- failures ----------------------------------------------------------------------------

    async def _retry_or_dead_letter(self, msg: Any, record: Record, exc: Exception) -> Any:
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
        self.dead_letter(msg, exc, attempt)
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

    # -- output ------------------------------------------------------------------------------

    def _emit(self, msg: Any, result: Any, part: int) -> None:
        stats = self.stats
        if result is None:
            stats.filtered += 1
            return
        if self._out is None:  # a sink: the call was the work
            stats.processed += 1
            return
        encode, t, out, src = self._encode, self.transport, self._out, msg.partition
        assert encode is not None
        try:
            if type(result) is dict:  # the common case first: one value, same key
                data = encode(result)
                dest = t.partition_for(out, msg.key)
                t.append(out, dest, msg.key, data, msg.headers, msg.timestamp, src)
                stats.produced += 1
            elif isinstance(result, list | tuple):
                if not result:
                    stats.filtered += 1
                    return
                # All or nothing: encode every value before writing any.
                outputs = [self._output(msg, item, part, i) for i, item in enumerate(result)]
                for key, data, headers in outputs:
                    dest = t.partition_for(out, key)
                    t.append(out, dest, key, data, headers, msg.timestamp, src)
                stats.produced += len(outputs)
            else:
                key, data, headers = self._output(msg, result, part, None)
                t.append(out, t.partition_for(out, key), key, data, headers, msg.timestamp, src)
                stats.produced += 1
        except CodecError as exc:
            self.dead_letter(msg, exc, 1)
            return
        stats.processed += 1

    def _output(
        self, msg: Any, item: Any, part: int, index: int | None
    ) -> tuple[bytes | None, bytes, Any]:
        """Key, encoded value and headers of one output; ``index`` numbers flat-map outputs."""
        assert self._encode is not None
        if not isinstance(item, Emit):
            if index is None:
                return msg.key, self._encode(item), msg.headers
            return (
                msg.key,
                self._encode(item),
                _with_part(msg.headers, (part << PART_SHIFT) | index),
            )
        data = self._encode(item.value)
        if item.key is None or item.key == msg.key:
            headers = (
                msg.headers
                if index is None
                else _with_part(msg.headers, (part << PART_SHIFT) | index)
            )
            return msg.key, data, [*headers, *item.headers]
        # Re-keyed: the input's sequence belongs to another key; give the output an event id
        # of its own (derived, so a replay derives the same one) and no sequence.
        kept = [h for h in msg.headers if h[0] not in (SEQ_HEADER, PART_HEADER, ID_HEADER)]
        eid = next((v for k, v in msg.headers if k == ID_HEADER), b"") + b"/" + item.key
        return item.key, data, [*kept, (ID_HEADER, eid), *item.headers]


def _with_part(headers: Any, part: int) -> list[tuple[str, bytes]]:
    return [*(h for h in headers if h[0] != PART_HEADER), (PART_HEADER, str(part).encode())]


def _ids(headers: Any) -> tuple[int | None, int, bytes | None]:
    """The record's sequence number, flat-map part and event id, from its headers."""
    seq = eid = None
    part = 0
    for k, v in headers:
        if k == SEQ_HEADER:
            seq = decode_seq(v)
        elif k == ID_HEADER:
            eid = v
        elif k == PART_HEADER:
            part = int(v)
    return seq, part, eid


def _retriable(exc: BaseException) -> bool:
    return exc.retriable if isinstance(exc, StageError) else not isinstance(exc, CodecError)
