"""The stage worker: runs exactly one stage over a transport.

Per fetched batch: dedup -> decode -> stage function -> encode -> buffer outputs (see
:mod:`pipeline.runtime.handler`); then one commit that makes outputs, state changelog and
offsets durable in that order (or atomically, in exactly-once mode). Per partition, records
are handled in offset order; with ``concurrency > 1`` records of different keys overlap (see
:mod:`pipeline.runtime.lanes`) and commits advance only past records whose outputs are durable.

State tables are restored from the changelog when a partition is assigned, before any of its
records is handled, and dropped when it is revoked.

What stops a worker, and what does not:

- an error raised inside a rebalance callback (a fence found while committing on revocation,
  a restore that fails) is kept and raised by the loop: aiokafka would log and swallow it, and
  the worker would rejoin with stale state. Under exactly-once, every revocation first commits
  the current positions in a transaction, so a zombie learns it was fenced and stops;
- a position that is gone from the log stops the worker unless its
  :class:`~pipeline.runtime.offsets.OffsetReset` says otherwise;
- a dependency that is down does not: the stage's setup is retried before it consumes (see
  :mod:`pipeline.runtime.setup`), and the breaker (:mod:`pipeline.runtime.holds`) pauses the
  partitions instead of dead-lettering the stream;
- nor does a broker that is down or moving (a retriable :class:`~pipeline.errors.BrokerError`
  out of a commit, longer than the client's own retries): the worker drops what it had not
  committed (outputs, state changes, holds), waits for a broker with backoff, and reads every
  partition again from its committed offset with its state restored
  (:func:`~pipeline.runtime.recovery.recover`), as if
  the partitions had been handed to it anew. Outputs already written are duplicates the next
  stage drops (at-least-once) or belong to aborted transactions (exactly-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pipeline.dsl import StageNode
from pipeline.errors import BrokerError, OffsetOutOfRangeError
from pipeline.runtime import rebalance
from pipeline.runtime.commits import Commits
from pipeline.runtime.crashes import CrashGuard, handle_in_lanes, handle_inline
from pipeline.runtime.handler import RecordHandler
from pipeline.runtime.holds import Tripped
from pipeline.runtime.lanes import KeyLanes
from pipeline.runtime.offsets import OffsetReset, ResetMode, combined
from pipeline.runtime.pauses import Pauses
from pipeline.runtime.priority import LaneGate
from pipeline.runtime.recovery import recover
from pipeline.runtime.setup import enter_setup
from pipeline.runtime.state import StateTable, StoreFactory
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Batching, Transport
from pipeline.schema import SchemaStore

log = logging.getLogger(__name__)


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
        offset_reset: What to do when a position is gone from the log (stop, by default).
        clock: Seconds, monotonic: when held records are overdue and pauses end (virtual in
            tests, with ``sleep``).
        tracing: A span per call of the stage function (see :mod:`pipeline.ops.tracing`).
        gate: Turns between the priority lanes of the stage (``node.lane`` is this one's).
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
        offset_reset: OffsetReset = OffsetReset(),
        clock: Callable[[], float] = time.monotonic,
        tracing: bool = False,
        gate: LaneGate | None = None,
    ) -> None:
        self.node = node
        self.gate = gate
        self.transport = transport
        self.batching = batching
        self.exactly_once = exactly_once
        self.offset_reset = offset_reset
        self.stats = stats or StageStats(node.label)
        self.table = StateTable(node.state_topic, node.stage.dedup, stores, self.stats)
        self.handler = RecordHandler(
            node, schemas, transport, self.stats, sleep, clock, tracing=tracing
        )
        self.commits = Commits(transport, self.table, self.stats, self.handler.holds, self._lost)
        # Deliveries across restarts (see pipeline.runtime.crashes): the window holds what a
        # worker may have in hand between two commits (records, and as many transaction
        # markers at most between them).
        concurrency = node.stage.concurrency
        # Inline: the commit in flight and the batches handled since (Commits.may_pass),
        # each up to max_records and a batch.
        in_hand = batching.max_records + (
            _lane_room(concurrency) if concurrency > 1 else batching.max_records
        )
        self.guard = CrashGuard(node.stage.crash, 2 * in_hand, node.name)
        if self.guard.enabled:
            self.commits.marker = self.guard.marks
        self._lock = asyncio.Lock()  # held while a batch is between fetch and commit
        self._lanes: KeyLanes | None = None
        self.pauses = Pauses(
            node.name, node.stage.breaker, transport, self.stats, self.commits,
            self.handler.holds, self._fetch, sleep, clock,
        )  # fmt: skip
        self._fatal: BaseException | None = None  # raised in a rebalance callback
        self.recovery_streak, self.last_recovery = 0, 0.0  # see pipeline.runtime.recovery
        self._in_batch = 0  # inline: records of the batch being handled
        self._stopping = False
        self.taken_at: dict[int, int] = {}  # where each partition was read from when taken

    async def run(self, stop: asyncio.Event) -> StageStats:
        """Process until ``stop`` is set, then finish in-flight records, commit and leave."""
        t, stats = self.transport, self.stats
        async with contextlib.AsyncExitStack() as setup:
            self.handler.resource = await enter_setup(self.node.stage, setup, stop, stats)
            if stop.is_set():
                stats.state = "stopped"
                return stats
            stats.state = "starting"
            await t.start(self._on_revoked, self._on_assigned)
            failed = True
            try:
                await self._prepare_topics()
                while True:
                    try:
                        if self.node.stage.concurrency > 1:
                            await self._run_lanes(stop)
                        else:
                            await self._run_inline(stop)
                        break
                    except BrokerError as exc:
                        if not exc.retriable or self._fatal is not None or stop.is_set():
                            raise
                        await recover(self, exc, stop)
                failed = False
            finally:
                self._stopping = True  # a rebalance callback after this takes nothing
                if self.gate is not None and self.node.lane is not None:
                    self.gate.gone(self.node.lane)
                stats.state = "failed" if failed else "stopped"
                try:
                    if self._fatal is None:
                        await self.commits.settle()
                        if not failed:
                            await rebalance.clean_marks(self, set(self.commits.committed))
                except Exception:
                    if not failed:
                        raise
                    log.debug("stage %s: commit while failing", self.node.name, exc_info=True)
                finally:
                    for partition in list(self.table.partitions):
                        await rebalance.close_partition(self, partition)
                    await t.stop()
        return stats

    async def _prepare_topics(self) -> None:
        counts = {}
        jobs = self.handler.jobs
        for topic in (
            self.node.input_topic, self.node.output_topic, self.node.dlq_topic,
            self.node.state_topic, self.node.undo_topic,
            *(jobs.topics() if jobs is not None else ()),
        ):  # fmt: skip
            if topic:
                counts[topic] = await self.transport.prepare_topic(topic)
        out = self.node.output_topic
        self.handler.output.keep_partition = (
            out is not None and counts[out] == counts[self.node.input_topic]
        )

    def gauges(self) -> StageStats:
        """The stats, with the gauges that are read off the state (not counted) brought up to
        date; call it before reporting them."""
        self.stats.ids_held = sum(len(t.ids) for t in self.table.partitions.values())
        lanes = self._lanes
        self.stats.in_flight = lanes.buffered if lanes is not None else self._in_batch
        return self.stats

    @property
    def failed(self) -> bool:
        """Whether the worker stopped on an error (or holds one it will stop on)."""
        return self._fatal is not None or self.stats.state == "failed"

    @property
    def idle(self) -> bool:
        """Whether no batch is being handled now (for test drivers that move virtual time)."""
        lanes = self._lanes
        return not self._lock.locked() and (lanes is None or lanes.idle)

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def _fetch(self, wait_ms: int | None = None) -> Mapping[Any, list[Any]]:
        """Fetch; a position gone from the log goes to the :class:`OffsetReset` policy."""
        b = self.batching
        wait = b.fetch_wait_ms if wait_ms is None else wait_ms
        gate, lane = self.gate, self.node.lane
        if gate is None or lane is None:
            return await self._fetch_some(wait, b.max_records)
        most, instead = await gate.enter(lane)  # priority lanes: take turns by weight
        got: Mapping[Any, list[Any]] = {}
        try:
            got = await self._fetch_some(wait if instead is None else instead, most)
        finally:
            taken = sum(len(msgs) for msgs in got.values())
            gate.leave(lane, taken, not taken and await self._behind())
        return got

    async def _behind(self) -> bool:
        """Whether an owned partition has records left to read (or its end is not known yet:
        an empty fetch right after taking a partition says nothing); a paused stage has none
        to take now."""
        owned = self.transport.assignment()
        if not owned or self.stats.state in ("paused", "probing"):
            return False
        try:
            behind = await self.transport.lag()
        except BrokerError:
            return False
        return any(behind.get(tp.partition, 1) > 0 for tp in owned)

    async def _fetch_some(self, wait_ms: int, most: int) -> Mapping[Any, list[Any]]:
        try:
            return await self.transport.fetch(wait_ms, most)
        except OffsetOutOfRangeError as gone:
            # Under the lock: not while partitions are being taken over (the error may come
            # while a rebalance callback restores them), and nothing handled meanwhile.
            async with self._lock:
                await self._out_of_range(gone)
            return {}

    async def _out_of_range(self, gone: OffsetOutOfRangeError) -> None:
        """Stop with every partition that is out of range, or skip on by the policy."""
        if self.offset_reset.mode is ResetMode.FAIL:
            # A restarted stage has the same gap in its other partitions, most likely: name
            # them all (those it has not handled since it took them; their commit is its
            # position).
            committed, taken_at = self.commits.committed, self.taken_at
            others = [
                tp.partition for tp in self.transport.assignment()
                if tp.partition != gone.partition
                and committed.get(tp.partition, -1) == taken_at.get(tp.partition, -1)
            ]  # fmt: skip
            raise combined([gone, *await self.transport.out_of_range(others)])
        offset, skipped = self.offset_reset.seek_to(gone)
        if self._lanes is not None:
            await self._lanes.wait_idle()
            await self.commits.flush_finished()
        commits = self.commits
        await commits.settle()
        commits.forget([gone.partition])
        self.transport.seek(gone.partition, offset)
        commits.handled(gone.partition, offset)
        await commits.commit({gone.partition: offset})  # a restart must not meet it again
        self.stats.skipped += skipped
        log.error(
            "stage %s: %s/%d: position %d is out of range (log %d..%d); by the offset reset "
            "policy '%s' it goes on at %d, skipping %d records",
            self.node.name, gone.topic, gone.partition, gone.position, gone.start, gone.end,
            self.offset_reset.mode.value, offset, skipped,
        )  # fmt: skip

    # -- concurrency = 1: the hot path, no task per record -------------------------------

    async def _run_inline(self, stop: asyncio.Event) -> None:
        t, handler, tables, stats = self.transport, self.handler, self.table.partitions, self.stats
        holds, commits, suspects = handler.holds, self.commits, self.guard.suspects
        while not stop.is_set():
            self._check_fatal()
            if holds.held and holds.overdue():
                await self._verdict_timeout()
            batches = await self._fetch()
            if not batches:
                await self._idle_commit()
                continue
            tripped = False
            async with self._lock:
                self._check_fatal()
                owned = t.assignment()
                handled = {}
                began = time.monotonic()
                self._in_batch = sum(len(msgs) for msgs in batches.values())
                try:
                    for tp, msgs in batches.items():
                        table = tables.get(tp.partition)
                        if table is None or tp not in owned:
                            await self._skip(tp, owned)
                            continue
                        # Set first: after a trip mid-batch, the commit is capped at the
                        # first held record anyway, and the partition is read again from it.
                        handled[tp.partition] = msgs[-1].offset + 1
                        todo = msgs
                        if tp.partition in suspects:  # a worker died with these in hand
                            todo = await handle_inline(
                                self.guard, handler, commits, tp.partition, msgs, table, handled
                            )
                        if handler.is_async:
                            for msg in todo:
                                await handler.handle_one(msg, table)
                        elif todo:
                            await handler.handle_sync_batch(todo, table)
                except Tripped:
                    tripped = True
                _observe(stats, batches, began)
                count, self._in_batch = self._in_batch, 0
                await t.send_ahead()  # outputs leave now, not after the commit in flight
                # The previous commit ran while this batch was handled. Still running and
                # young: no wait; this batch joins a later commit (its outputs have left
                # already). Running too long: wait for it, as a full batch does. Done: start
                # this batch's (at-least-once: once commit_interval_ms passed since the last),
                # which runs while the next batch is fetched and handled.
                offsets = commits.offsets(handled)
                b = self.batching
                if tripped or not commits.may_pass(
                    count, b.max_records, b.commit_overlap_ms / 1000,
                    0.0 if self.exactly_once else b.commit_interval_ms / 1000,
                ):  # fmt: skip
                    await commits.settle(offsets)
                    await commits.start(offsets)
                if tripped:
                    await commits.settle()
                    await self.pauses.rewind()
                elif stats.state == "probing":
                    self.pauses.check_resumed()
            if tripped:
                await self.pauses.wait(stop, self._check_fatal)
        if self._fatal is None:
            async with self._lock:
                await commits.catch_up()  # what ran while the last commit was in flight

    async def _idle_commit(self) -> None:
        """Nothing fetched: account for the last commit now, and commit what batches handled
        while it ran left for the next one."""
        commits = self.commits
        if commits.finished_in_flight or (not commits.running and commits.owed):
            async with self._lock:
                offsets = commits.offsets({})
                await commits.settle(offsets)
                if offsets or commits.owed:
                    await commits.start(offsets)

    # -- concurrency > 1: key lanes ------------------------------------------------------

    async def _run_lanes(self, stop: asyncio.Event) -> None:
        tables, commits = self.table.partitions, self.commits
        tracker, handler, stats = commits.tracker, self.handler, self.stats
        holds = handler.holds
        concurrency = self.node.stage.concurrency
        handler.inline = False  # a trip is seen by this loop, not raised out of a lane
        handler.on_finished = lambda msg: tracker.finished(msg.partition, msg.offset)

        async def handle(msg: Any) -> None:
            table = tables.get(msg.partition)
            if table is None:  # revoked: its next owner handles it
                return
            if await handler.handle_one(msg, table):
                tracker.finished(msg.partition, msg.offset)

        lanes = self._lanes = KeyLanes(concurrency, handle, _lane_room(concurrency))
        flusher = asyncio.create_task(self._flush_loop(stop))
        try:
            while not stop.is_set():
                self._check_fatal()
                if flusher.done():
                    flusher.result()  # the flusher failed: stop with its error, loudly
                if holds.tripped:
                    await self._trip_lanes(lanes, stop)
                    continue
                if holds.held and holds.overdue():
                    await self._verdict_timeout()
                await lanes.wait_for_room()
                batches = await self._fetch()
                async with self._lock:
                    self._check_fatal()
                    await self._submit(lanes, batches)
                    if stats.state == "probing":
                        self.pauses.check_resumed()
            async with self._lock:
                await lanes.wait_idle()
                await commits.flush_finished()
        finally:
            await lanes.close()
            self._lanes = None
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher  # re-raises what made the flusher fail

    async def _submit(self, lanes: KeyLanes, batches: Mapping[Any, list[Any]]) -> None:
        """Hand a fetched batch to the key lanes (a suspect range first, one chunk at a time)."""
        owned, tables = self.transport.assignment(), self.table.partitions
        tracker = self.commits.tracker
        for tp, msgs in batches.items():
            if tp not in owned or tp.partition not in tables:
                await self._skip(tp, owned)
                continue
            todo = msgs
            if tp.partition in self.guard.suspects:  # a worker died with these in hand
                todo = await handle_in_lanes(
                    self.guard, self.handler, self.commits, lanes, tp.partition, msgs,
                    tables[tp.partition],
                )  # fmt: skip
            for msg in todo:
                tracker.started(tp.partition, msg.offset)
                lanes.submit(msg.key, msg)

    async def _trip_lanes(self, lanes: KeyLanes, stop: asyncio.Event) -> None:
        """The breaker tripped in a lane: let the others finish, commit, rewind, pause."""
        holds = self.handler.holds
        async with self._lock:
            await lanes.wait_idle()  # in-flight records finish, fail or succeed
            if holds.tripped:  # (a success meanwhile ended the outage)
                await self.commits.flush_finished()
                await self.pauses.rewind()
        if self.stats.state == "paused":
            await self.pauses.wait(stop, self._check_fatal)

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        """Key lanes: commit what finished every ``flush_interval_ms``, record by record (the
        offsets up to the first unfinished record, the outputs and state of all finished).

        Under exactly-once, outputs of a record past an unfinished one then commit before its
        offset does: after a crash it is read again, and its second delivery is a duplicate
        that the state table (committed in the same transaction) drops. A record without
        dedup (:attr:`Gate.unprotected`) would be handled twice: then the lanes first finish
        everything in hand, so the offsets cover every output of the transaction.
        """
        interval = self.batching.flush_interval_ms / 1000
        gate = self.handler.gate

        def protected() -> bool:
            return not gate.unprotected

        while not stop.is_set():
            await asyncio.sleep(interval)
            if not self.exactly_once:
                await self.commits.flush_finished()
                continue
            if gate.active and await self.commits.flush_finished(protected):
                continue
            async with self._lock:  # no records handed to the lanes meanwhile
                if self._lanes is not None:
                    await self._lanes.wait_idle()
                gate.unprotected = False
                await self.commits.flush_finished()

    # -- the breaker: held records, pauses (see pipeline.runtime.holds) -------------------

    async def _verdict_timeout(self) -> None:
        """Held records waited too long for a verdict: dead-letter them as poison."""
        async with self._lock:
            held = len(self.handler.holds.held)
            log.warning(
                "stage %s: %d held record(s) got no verdict within %.0fs (no other key was "
                "handled): dead-lettering the failed ones",
                self.node.name, held, self.node.stage.breaker.verdict_timeout,
            )  # fmt: skip
            await self.handler.release(overdue=True)
            if self._lanes is None:
                await self.commits.settle()
                await self.commits.start(self.commits.offsets({}))

    # -- rebalance -------------------------------------------------------------------------

    def fail(self, exc: BaseException, what: str) -> None:
        """Keep an error raised in a rebalance callback for the loop to raise."""
        if self._fatal is None:
            self._fatal = exc
            log.error("stage %s: %s failed: %s", self.node.name, what, exc)

    async def _skip(self, tp: Any, owned: set[Any]) -> None:
        """A batch fetched before a rebalance: never let its records go unhandled."""
        if tp in owned:
            await self.commits.settle()
            # Still ours (handed back by the rebalance): read it again from the committed
            # offset, or the next commit would pass records nobody handled.
            await self.transport.rewind(tp.partition)
        # Not ours any more: its new owner starts from the committed offset.

    async def _on_assigned(self, partitions: set[Any]) -> None:
        await rebalance.assigned(self, partitions)

    async def _on_revoked(self, partitions: set[Any]) -> None:
        await rebalance.revoked(self, partitions)

    async def _lost(self, partition: int) -> None:
        await rebalance.lost(self, partition)

    async def restore(self, partition: int) -> None:
        """Rebuild ``partition``'s state table from its changelog."""
        await rebalance.restore(self, partition)


def _lane_room(concurrency: int) -> int:
    """Records the key lanes buffer before the fetch loop waits."""
    return max(1000, 16 * concurrency)


def _observe(stats: StageStats, batches: Mapping[Any, list[Any]], began: float) -> None:
    """Per batch, not per record: the mean handling time of its records, and the end-to-end
    latency (from the record's timestamp) of each partition's last record, weighted by the
    number of records it stands for."""
    n = sum(len(msgs) for msgs in batches.values())
    if not n:
        return
    stats.handle_seconds.observe((time.monotonic() - began) / n, n)
    now = time.time() * 1000
    for msgs in batches.values():
        stamp = msgs[-1].timestamp
        if stamp and stamp > 0:
            stats.latency_seconds.observe(max(0.0, now - stamp) / 1000, len(msgs))
