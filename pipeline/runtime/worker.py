"""The stage worker: runs exactly one stage over a transport.

Per fetched batch: decode (Avro) -> stage function -> encode -> buffer outputs; then one flush
(outputs and dead letters durable) and one commit. Per partition, records are handled in
offset order; with ``concurrency > 1`` records of different keys overlap (see
:mod:`pipeline.runtime.lanes`) and commits advance only past records whose outputs are durable.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.dsl import StageNode
from pipeline.errors import CodecError, DecodeError, StageError
from pipeline.record import ID_HEADER, PART_HEADER, SEQ_HEADER, Emit, Record, decode_seq
from pipeline.runtime.deadletter import dead_letter_headers, error_class
from pipeline.runtime.lanes import KeyLanes, OffsetTracker
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Batching, Transport
from pipeline.schema import SchemaStore

log = logging.getLogger(__name__)

_PARTS = tuple(str(i).encode() for i in range(256))
_DEAD = object()  # the stage function failed for good; the record is dead-lettered


class StageWorker:
    """Consumes one stage's input, calls the stage, produces its output.

    Args:
        node: The compiled stage (topics, group, function, policies).
        schemas: Where the input and output schemas come from.
        transport: The log (Kafka, or in memory in tests).
        batching: Fetch and flush sizes.
        sleep: Waits between retries (a virtual clock in tests).
    """

    def __init__(
        self,
        node: StageNode,
        schemas: SchemaStore,
        transport: Transport,
        *,
        batching: Batching = Batching(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        stage = node.stage
        self.node = node
        self.transport = transport
        self.batching = batching
        self.stats = StageStats(stage.name)
        self._sleep = sleep
        self._decode = schemas.codec(stage.input).decode
        self._encode = schemas.codec(stage.output).encode if stage.output else None
        self._invoke: Any = stage.invoker()
        self._is_async = stage.is_async
        self._retry = stage.retry
        self._out = node.output_topic
        self._dlq = node.dlq_topic
        self._lock = asyncio.Lock()  # held while a batch is between fetch and commit
        self._lanes: KeyLanes | None = None
        self._tracker = OffsetTracker()
        self._flush_lock = asyncio.Lock()

    async def run(self, stop: asyncio.Event) -> StageStats:
        """Process until ``stop`` is set, then finish in-flight records, commit and leave."""
        t = self.transport
        await t.start(self._on_revoked, self._on_assigned)
        try:
            for topic in (self._out, self._dlq):
                if topic:
                    await t.prepare_topic(topic)
            if self.node.stage.concurrency > 1:
                await self._run_lanes(stop)
            else:
                await self._run_inline(stop)
        finally:
            await t.stop()
        return self.stats

    # -- concurrency = 1: the hot path, no task per record -------------------------------

    async def _run_inline(self, stop: asyncio.Event) -> None:
        t, b = self.transport, self.batching
        handle = self._handle_async if self._is_async else None
        while not stop.is_set():
            batches = await t.fetch(b.fetch_wait_ms, b.max_records)
            if not batches:
                continue
            async with self._lock:
                owned = t.assignment()
                offsets = {}
                for tp, msgs in batches.items():
                    if tp not in owned:  # revoked while we waited for the lock
                        continue
                    if handle is None:
                        await self._handle_sync_batch(msgs)
                    else:
                        for msg in msgs:
                            await handle(msg)
                    offsets[tp] = msgs[-1].offset + 1
                await t.flush()
                await t.commit(offsets)
                self.stats.commits += 1

    async def _handle_sync_batch(self, msgs: list[Any]) -> None:
        decode, invoke, stats = self._decode, self._invoke, self.stats
        for msg in msgs:
            stats.consumed += 1
            try:
                value = decode(msg.value)
            except CodecError as exc:
                self._dead_letter(msg, exc, 0)
                continue
            record = _record(msg, value)
            try:
                result = invoke(value, record)
            except Exception as exc:
                result = await self._retry_or_dead_letter(msg, record, exc)
                if result is _DEAD:
                    continue
            self._emit(msg, record, result)

    async def _handle_async(self, msg: Any) -> None:
        self.stats.consumed += 1
        try:
            value = self._decode(msg.value)
        except CodecError as exc:
            self._dead_letter(msg, exc, 0)
            return
        record = _record(msg, value)
        try:
            result = await self._invoke(value, record)
        except Exception as exc:
            result = await self._retry_or_dead_letter(msg, record, exc)
            if result is _DEAD:
                return
        self._emit(msg, record, result)

    async def _retry_or_dead_letter(self, msg: Any, record: Record, exc: Exception) -> Any:
        """Retry the stage function with backoff; dead-letter the record when it keeps failing."""
        policy = self._retry
        attempt = 1
        while _retriable(exc) and attempt < policy.max_attempts:
            self.stats.retries += 1
            await self._sleep(policy.backoff(attempt))
            attempt += 1
            try:
                result = self._invoke(record.value, record)
                if self._is_async:
                    result = await result
            except Exception as again:
                exc = again
                continue
            return result
        self._dead_letter(msg, exc, attempt)
        return _DEAD

    # -- concurrency > 1: key lanes ------------------------------------------------------

    async def _run_lanes(self, stop: asyncio.Event) -> None:
        t, b = self.transport, self.batching
        concurrency = self.node.stage.concurrency
        tracker = self._tracker

        async def handle(msg: Any) -> None:
            await self._handle_async(msg)
            tracker.finished((msg.topic, msg.partition), msg.offset)

        lanes = self._lanes = KeyLanes(concurrency, handle, max(1000, 16 * concurrency))
        flusher = asyncio.create_task(self._flush_loop(stop))
        try:
            while not stop.is_set():
                await lanes.wait_for_room()
                batches = await t.fetch(b.fetch_wait_ms, b.max_records)
                async with self._lock:
                    owned = t.assignment()
                    for tp, msgs in batches.items():
                        if tp not in owned:
                            continue
                        key = (tp.topic, tp.partition)
                        for msg in msgs:
                            tracker.started(key, msg.offset)
                            lanes.submit(msg.key, msg)
            async with self._lock:
                await lanes.wait_idle()
                await self._flush_and_commit()
        finally:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            await lanes.close()
            self._lanes = None

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        interval = self.batching.flush_interval_ms / 1000
        while not stop.is_set():
            await asyncio.sleep(interval)
            await self._flush_and_commit()

    async def _flush_and_commit(self) -> None:
        async with self._flush_lock:
            # No await between taking the finished records and flush() swapping out the
            # transport's buffers: the flushed outputs are exactly those of ``done``.
            done = self._tracker.take_finished()
            await self.transport.flush()
            positions = self._tracker.made_durable(done)
            if positions:
                await self.transport.commit(_as_tps(positions, self.transport.assignment()))
                self.stats.commits += 1

    # -- rebalance -------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[Any]) -> None:
        """Before partitions move: finish what we hold, make it durable, commit."""
        async with self._lock:
            if self._lanes is not None:
                await self._lanes.wait_idle()
                await self._flush_and_commit()
                self._tracker.forget({(tp.topic, tp.partition) for tp in revoked})
        log.info("stage %s: partitions revoked: %s", self.node.name, _fmt(revoked))

    async def _on_assigned(self, assigned: set[Any]) -> None:
        log.info("stage %s: partitions assigned: %s", self.node.name, _fmt(assigned))

    # -- output ----------------------------------------------------------------------------

    def _emit(self, msg: Any, record: Record, result: Any) -> None:
        stats = self.stats
        if result is None:
            stats.filtered += 1
            return
        if self._out is None:  # a sink: the call was the work
            stats.processed += 1
            return
        assert self._encode is not None
        encode, t, out = self._encode, self.transport, self._out
        try:
            if type(result) is dict or not isinstance(
                result, list | tuple | types.GeneratorType | Emit
            ):
                t.append(
                    out,
                    t.partition_for(out, msg.key),
                    msg.key,
                    encode(result),
                    msg.headers,
                    msg.timestamp,
                )
                stats.produced += 1
            elif isinstance(result, Emit):
                key = msg.key if result.key is None else result.key
                headers = [*msg.headers, *result.headers]
                t.append(
                    out,
                    t.partition_for(out, key),
                    key,
                    encode(result.value),
                    headers,
                    msg.timestamp,
                )
                stats.produced += 1
            else:
                encoded = [encode(v) for v in result]  # all or nothing: encode before writing
                if not encoded:
                    stats.filtered += 1
                    return
                part = t.partition_for(out, msg.key)
                for i, data in enumerate(encoded):
                    headers = [*msg.headers, (PART_HEADER, _part(i))]
                    t.append(out, part, msg.key, data, headers, msg.timestamp)
                stats.produced += len(encoded)
        except CodecError as exc:
            self._dead_letter(msg, exc, 1)
            return
        stats.processed += 1

    def _dead_letter(self, msg: Any, exc: BaseException, attempts: int) -> None:
        t, stats = self.transport, self.stats
        headers = dead_letter_headers(
            msg.headers,
            stage=self.node.name,
            exc=exc,
            attempts=attempts,
            topic=msg.topic,
            partition=msg.partition,
            offset=msg.offset,
        )
        t.append(
            self._dlq,
            t.partition_for(self._dlq, msg.key),
            msg.key,
            msg.value,
            headers,
            msg.timestamp,
        )
        stats.dead_letters += 1
        stats.dead_by_error[error_class(exc)] += 1
        if not isinstance(exc, DecodeError) or stats.dead_letters <= 10:
            log.warning(
                "stage %s: dead-lettered %s/%d@%d after %d attempt(s): %s: %s",
                self.node.name,
                msg.topic,
                msg.partition,
                msg.offset,
                attempts,
                error_class(exc),
                exc,
            )


def _record(msg: Any, value: Any) -> Record:
    seq = event_id = None
    for k, v in msg.headers:
        if k == SEQ_HEADER:
            seq = decode_seq(v)
        elif k == ID_HEADER:
            event_id = v
    return Record(
        msg.key,
        value,
        seq=seq,
        id=event_id,
        headers=msg.headers,
        timestamp=msg.timestamp,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
    )


def _retriable(exc: BaseException) -> bool:
    return exc.retriable if isinstance(exc, StageError) else not isinstance(exc, CodecError)


def _part(i: int) -> bytes:
    return _PARTS[i] if i < len(_PARTS) else str(i).encode()


def _as_tps(positions: dict[Any, int], owned: set[Any]) -> dict[Any, int]:
    by_key = {(tp.topic, tp.partition): tp for tp in owned}
    return {by_key[k]: o for k, o in positions.items() if k in by_key}


def _fmt(tps: set[Any]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(tps)) or "none"
