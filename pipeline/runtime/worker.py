"""The stage worker: runs exactly one stage over a transport.

Per fetched batch: dedup -> decode -> stage function -> encode -> buffer outputs (see
:mod:`pipeline.runtime.handler`); then one commit that makes outputs, state changelog and
offsets durable in that order (or atomically, in exactly-once mode). Per partition, records
are handled in offset order; with ``concurrency > 1`` records of different keys overlap (see
:mod:`pipeline.runtime.lanes`) and commits advance only past records whose outputs are durable.

State tables are restored from the changelog when a partition is assigned, before any of its
records is handled, and dropped when it is revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.dsl import StageNode
from pipeline.runtime.handler import RecordHandler
from pipeline.runtime.lanes import KeyLanes, OffsetTracker
from pipeline.runtime.state import StateTable, StoreFactory, now_ms
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Batching, Transport
from pipeline.schema import SchemaStore

log = logging.getLogger(__name__)

_RESTORE_LOG_EVERY = 100_000


class StageWorker:
    """Consumes one stage's input, calls the stage, produces its output.

    Args:
        node: The compiled stage (topics, group, function, policies).
        schemas: Where the input and output schemas come from.
        transport: The log (Kafka, or in memory in tests).
        batching: Fetch and flush sizes.
        stores: Local stores of the state table (in memory by default).
        exactly_once: Whether the transport commits transactions; the concurrent path then
            commits a batch only once all of it is handled.
        sleep: Waits between retries (a virtual clock in tests).
        stats: Counters to add to (a fresh set by default).
    """

    def __init__(
        self,
        node: StageNode,
        schemas: SchemaStore,
        transport: Transport,
        *,
        batching: Batching = Batching(),
        stores: StoreFactory | None = None,
        exactly_once: bool = False,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        stats: StageStats | None = None,
    ) -> None:
        self.node = node
        self.transport = transport
        self.batching = batching
        self.exactly_once = exactly_once
        self.stats = stats or StageStats(node.stage.name)
        self.table = StateTable(node.state_topic, node.stage.dedup, stores)
        self.handler = RecordHandler(node, schemas, transport, self.stats, sleep)
        self._lock = asyncio.Lock()  # held while a batch is between fetch and commit
        self._lanes: KeyLanes | None = None
        self._tracker = OffsetTracker()
        self._commit_lock = asyncio.Lock()
        self._inflight: asyncio.Task[set[int]] | None = None  # the commit in flight

    async def run(self, stop: asyncio.Event) -> StageStats:
        """Process until ``stop`` is set, then finish in-flight records, commit and leave."""
        t = self.transport
        await t.start(self._on_revoked, self._on_assigned)
        try:
            counts = {}
            for topic in (
                self.node.input_topic, self.node.output_topic, self.node.dlq_topic,
                self.node.state_topic,
            ):  # fmt: skip
                if topic:
                    counts[topic] = await t.prepare_topic(topic)
            out = self.node.output_topic
            self.handler.output.keep_partition = (
                out is not None and counts[out] == counts[self.node.input_topic]
            )
            if self.node.stage.concurrency > 1:
                await self._run_lanes(stop)
            else:
                await self._run_inline(stop)
        finally:
            try:
                await self._settle()
            finally:
                for partition in list(self.table.partitions):
                    await self._close_partition(partition)
                await t.stop()
        return self.stats

    # -- concurrency = 1: the hot path, no task per record -------------------------------

    async def _run_inline(self, stop: asyncio.Event) -> None:
        t, b, handler, tables = self.transport, self.batching, self.handler, self.table.partitions
        while not stop.is_set():
            batches = await t.fetch(b.fetch_wait_ms, b.max_records)
            if not batches:
                if self._inflight is not None and self._inflight.done():
                    async with self._lock:
                        await self._settle()  # idle: account for the last commit now
                continue
            async with self._lock:
                owned = t.assignment()
                offsets = {}
                for tp, msgs in batches.items():
                    table = tables.get(tp.partition)
                    if table is None or tp not in owned:
                        await self._skip(tp, owned)
                        continue
                    if handler.is_async:
                        for msg in msgs:
                            await handler.handle_one(msg, table)
                    else:
                        await handler.handle_sync_batch(msgs, table)
                    offsets[tp.partition] = msgs[-1].offset + 1
                # The previous batch's commit ran while this one was handled; finish it, then
                # start this one's, which runs while the next batch is fetched and handled.
                await self._settle(offsets)
                await self._start_commit(offsets)

    # -- concurrency > 1: key lanes ------------------------------------------------------

    async def _run_lanes(self, stop: asyncio.Event) -> None:
        t, b, tracker, tables = self.transport, self.batching, self._tracker, self.table.partitions
        concurrency = self.node.stage.concurrency

        async def handle(msg: Any) -> None:
            table = tables.get(msg.partition)
            if table is None:  # revoked: its next owner handles it
                return
            await self.handler.handle_one(msg, table)
            tracker.finished(msg.partition, msg.offset)

        lanes = self._lanes = KeyLanes(concurrency, handle, max(1000, 16 * concurrency))
        flusher = None if self.exactly_once else asyncio.create_task(self._flush_loop(stop))
        try:
            while not stop.is_set():
                if flusher is not None and flusher.done():
                    flusher.result()  # the flusher failed: stop with its error, loudly
                await lanes.wait_for_room()
                batches = await t.fetch(b.fetch_wait_ms, b.max_records)
                async with self._lock:
                    owned = t.assignment()
                    for tp, msgs in batches.items():
                        if tp not in owned or tp.partition not in tables:
                            await self._skip(tp, owned)
                            continue
                        for msg in msgs:
                            tracker.started(tp.partition, msg.offset)
                            lanes.submit(msg.key, msg)
                    if self.exactly_once and batches:
                        # A transaction holds whole batches: outputs of a record past an
                        # unfinished one must not commit before that one's offset does.
                        await lanes.wait_idle()
                        await self._flush_and_commit()
            async with self._lock:
                await lanes.wait_idle()
                await self._flush_and_commit()
        finally:
            await lanes.close()
            self._lanes = None
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher  # re-raises what made the flusher fail

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        interval = self.batching.flush_interval_ms / 1000
        while not stop.is_set():
            await asyncio.sleep(interval)
            await self._flush_and_commit()

    async def _flush_and_commit(self) -> None:
        async with self._commit_lock:
            # Nothing awaits between taking the finished records and the transport's commit
            # swapping out its buffers, so the outputs made durable are exactly those of
            # ``done``; records finishing meanwhile go to the next commit.
            # The positions count ``done`` as durable: the transport makes outputs durable
            # before it commits offsets, and a failure there stops the worker.
            done = self._tracker.take_finished()
            if not done and not any(t.dirty for t in self.table.partitions.values()):
                return  # nothing finished since the last commit
            await self._commit(self._tracker.made_durable(done))

    async def _commit(self, offsets: dict[int, int]) -> None:
        await self._start_commit(offsets)
        await self._settle()

    async def _start_commit(self, offsets: dict[int, int]) -> None:
        """Start committing everything handled so far; at most one commit is in flight."""
        state = {p: tbl.take_dirty() for p, tbl in self.table.partitions.items() if tbl.dirty}
        self._inflight = asyncio.create_task(self.transport.commit(offsets, state))
        # Let the commit take its snapshot (the transport swaps its buffers before its first
        # await) before anything else is appended: records handled from now on belong to the
        # next commit, even under exactly-once.
        await asyncio.sleep(0)

    async def _settle(self, handled_since: dict[int, int] | None = None) -> None:
        """Wait for the commit in flight; deal with partitions whose transaction was lost.

        Args:
            handled_since: Offsets of a batch handled while the commit ran; a lost
                partition's entry is dropped (its records are read again from the log).
        """
        task, self._inflight = self._inflight, None
        if task is None:
            return
        lost = await task
        self.stats.commits += 1
        for partition in lost:  # EOS: the transaction did not commit; start over from the log
            if handled_since is not None:
                handled_since.pop(partition, None)
            self.transport.discard(partition)  # outputs handled since then are void too
            self._tracker.forget({partition})
            self.table.close(partition)
            await self._restore(partition)

    # -- rebalance -------------------------------------------------------------------------

    async def _skip(self, tp: Any, owned: set[Any]) -> None:
        """A batch fetched before a rebalance: never let its records go unhandled."""
        if tp in owned:
            await self._settle()
            # Still ours (handed back by the rebalance): read it again from the committed
            # offset, or the next commit would pass records nobody handled.
            await self.transport.rewind(tp.partition)
        # Not ours any more: its new owner starts from the committed offset.

    async def _on_assigned(self, assigned: set[Any]) -> None:
        """Restore each new partition's table before any of its records is handled."""
        # The lock keeps the fetch loop out until every table is restored: records of a
        # partition whose table is not ready yet must not be fetched and dropped.
        async with self._lock:
            for tp in sorted(assigned):
                if tp.partition not in self.table.partitions:
                    await self.transport.claim(tp.partition)
                    await self._restore(tp.partition)
        log.info("stage %s: partitions assigned: %s", self.node.name, _fmt(assigned))

    async def _restore(self, partition: int) -> None:
        table, start = self.table.open(partition)
        began, now, n = time.monotonic(), now_ms(), 0
        async for key, value in self.transport.restore(partition, start):
            table.apply(key, value, now)
            n += 1
            if n % _RESTORE_LOG_EVERY == 0:
                log.info(
                    "stage %s: restoring partition %d: %d records", self.node.name, partition, n
                )
        seconds = time.monotonic() - began
        self.stats.restored += n
        self.stats.restore_seconds += seconds
        if n:
            log.info(
                "stage %s: restored partition %d from its changelog: %d records in %.2fs",
                self.node.name, partition, n, seconds,
            )  # fmt: skip

    async def _on_revoked(self, revoked: set[Any]) -> None:
        """Before partitions move: finish what we hold, make it durable, commit, drop state."""
        async with self._lock:
            await self._settle()
            if self._lanes is not None:
                await self._lanes.wait_idle()
                await self._flush_and_commit()
            for tp in revoked:
                self._tracker.forget({tp.partition})
                await self._close_partition(tp.partition)
        log.info("stage %s: partitions revoked: %s", self.node.name, _fmt(revoked))

    async def _close_partition(self, partition: int) -> None:
        if partition not in self.table.partitions:
            return
        if self.table.stores.persistent:
            self.table.saved(partition, await self.transport.state_end(partition))
        self.table.close(partition)
        await self.transport.release(partition)


def _fmt(tps: set[Any]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(tps)) or "none"
