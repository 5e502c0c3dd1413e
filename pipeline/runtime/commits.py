"""What a stage worker commits, and when: outputs, state changelog and offsets, never past a
record that is not finished.

At most one commit is in flight; the inline worker starts a batch's commit and lets it run
while the next batch is fetched and handled (:meth:`Commits.start`, then :meth:`Commits.settle`
before the next one starts). Offsets come from two places:

- inline: the end of each handled batch (:meth:`Commits.offsets`), capped at the first record
  the breaker holds (:mod:`pipeline.runtime.holds`); a partition whose holds ended is committed
  even when no new record of it came;
- key lanes: :class:`~pipeline.runtime.lanes.OffsetTracker`, which only passes records whose
  outputs are durable (:meth:`Commits.flush_finished`).

An exactly-once commit can be *lost* (its transaction did not commit): the partition is read
again from its committed offset, with its state restored (``on_lost``).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

from pipeline.runtime.holds import Holds
from pipeline.runtime.lanes import OffsetTracker
from pipeline.runtime.state import StateTable
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Transport


class Commits:
    """The commit bookkeeping of one worker.

    Args:
        transport: Where commits go.
        table: The state table (its changes ride along with each commit).
        stats: Counts commits.
        holds: Records held by the breaker (no commit passes them).
        on_lost: Called for a partition whose transaction was lost, after its buffers and
            bookkeeping are dropped: restore its state (it is read again from the log).
    """

    def __init__(
        self,
        transport: Transport,
        table: StateTable,
        stats: StageStats,
        holds: Holds,
        on_lost: Callable[[int], Awaitable[None]],
    ) -> None:
        self.transport = transport
        self.table = table
        self.stats = stats
        self.holds = holds
        self.tracker = OffsetTracker()
        self._on_lost = on_lost
        self._lock = asyncio.Lock()
        self._inflight: asyncio.Task[set[int] | None] | None = None
        self._began = 0.0  # when the last commit started (monotonic)
        self.passed = 0  # inline: records handled since the last commit started
        self._handled: dict[int, int] = {}  # inline: next offset per partition, handled
        self.committed: dict[int, int] = {}  # offsets last handed to a commit
        # The metadata of each partition's commit (see pipeline.runtime.crashes), if any.
        self.marker: Callable[[Mapping[int, int]], dict[int, str]] | None = None

    @property
    def running(self) -> bool:
        """Whether a commit is in flight and not done yet."""
        return self._inflight is not None and not self._inflight.done()

    def may_pass(self, records: int, most: int, longest: float, interval: float) -> bool:
        """Inline: whether a batch of ``records`` just handled may leave its offsets to a
        later commit instead of starting one now (or waiting for the one in flight: a wait
        there is a hop's latency at a trickle).

        A commit in flight: only while it is younger than ``longest`` seconds. None: only
        while the last one started less than ``interval`` seconds ago (commits cost round
        trips and the broker's work; at a trickle they were most of a stage's CPU). Never
        once more than ``most`` records wait. The bounds keep commits moving when a slow
        stage blocks the event loop for a whole batch (the commit in flight advances only
        while the worker awaits), and what a worker holds between two commits within the
        crash guard's window.
        """
        self.passed += records
        if self.passed > most:
            return False
        age = time.monotonic() - self._began
        return age < longest if self.running else age < interval

    @property
    def owed(self) -> bool:
        """Inline: whether records were handled (or state changed) since the last commit."""
        first = self.holds.first_offsets()
        committed = self.committed
        return any(
            committed.get(p) != min(o, first.get(p, o)) for p, o in self._handled.items()
        ) or any(t.pending for t in self.table.partitions.values())

    @property
    def finished_in_flight(self) -> bool:
        """Whether a commit is in flight and done (the idle loop accounts for it)."""
        return self._inflight is not None and self._inflight.done()

    def offsets(self, handled: dict[int, int]) -> dict[int, int]:
        """Inline: the offsets to commit after a batch that handled up to ``handled``: never
        past a held record, and only where they moved."""
        self._handled.update(handled)
        first = self.holds.first_offsets()
        committed = self.committed
        moved = {}
        for p, offset in self._handled.items():
            capped = min(offset, first.get(p, offset))
            if committed.get(p) != capped:
                moved[p] = capped
        return moved

    def handled(self, partition: int, offset: int) -> None:
        """Inline: ``partition`` is handled up to ``offset`` (e.g. after an offset reset)."""
        self._handled[partition] = offset

    async def start(
        self,
        offsets: dict[int, int] | Callable[[], dict[int, int] | None],
        marks: Mapping[int, str] | None = None,
    ) -> None:
        """Start committing everything handled so far; at most one commit is in flight.

        Args:
            offsets: Next offset to read, per partition; or a function that says them (or
                ``None``: nothing to commit) in the step that takes the snapshot (see below).
            marks: Metadata for some of them (others get the :attr:`marker`'s).
        """
        tables = self.table.partitions

        async def commit() -> set[int] | None:
            # The offsets, the state changes and the outputs are taken in one step (the
            # transport swaps its buffers before its first await): a record a key lane
            # finishes just before is in all three, one finishing after in none.
            moved = offsets() if callable(offsets) else offsets
            if moved is None:
                return None  # nothing committed (not counted)
            self.committed.update(moved)
            metadata = None
            if self.marker is not None and moved:
                metadata = self.marker({p: o for p, o in moved.items() if p not in (marks or {})})
                metadata.update(marks or {})
            state = {p: tbl.take_dirty() for p, tbl in tables.items() if tbl.pending}
            return await self.transport.commit(moved, state, metadata)

        self.passed, self._began = 0, time.monotonic()
        task = self._inflight = asyncio.create_task(commit())
        task.add_done_callback(functools.partial(self._timed, time.monotonic()))
        # Let the commit take its snapshot before anything else is appended: records handled
        # from now on belong to the next commit, even under exactly-once.
        await asyncio.sleep(0)

    def _timed(self, began: float, task: asyncio.Task[set[int] | None]) -> None:
        if not task.cancelled() and task.exception() is None and task.result() is not None:
            self.stats.commit_seconds.observe(time.monotonic() - began)

    async def settle(self, handled_since: dict[int, int] | None = None) -> set[int]:
        """Wait for the commit in flight; deal with partitions whose transaction was lost.

        Args:
            handled_since: Offsets of a batch handled while the commit ran; a lost
                partition's entry is dropped (its records are read again from the log).

        Returns:
            The partitions whose transaction was lost.
        """
        task, self._inflight = self._inflight, None
        if task is None:
            return set()
        lost = await task
        if lost is None:
            return set()
        self.stats.commits += 1
        for partition in lost:  # EOS: the transaction did not commit; start over from the log
            if handled_since is not None:
                handled_since.pop(partition, None)
            self.forget([partition])
            self.transport.discard(partition)  # outputs handled since then are void too
            await self._on_lost(partition)
        return lost

    def abandon(self) -> None:
        """Forget the commit in flight (it failed; its partitions are read again)."""
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
        elif task is not None and not task.cancelled():
            task.exception()  # read: it was reported by whoever saw it first
        self.tracker.clear()
        self._handled.clear()

    async def commit(
        self,
        offsets: dict[int, int] | Callable[[], dict[int, int] | None],
        marks: Mapping[int, str] | None = None,
    ) -> None:
        """Commit now and wait for it (``offsets`` as for :meth:`start`)."""
        await self.start(offsets, marks)
        await self.settle()

    async def catch_up(self) -> None:
        """Inline: commit, and wait for, what batches handled while the last commit ran left
        for the next one (before partitions are given up, or the worker stops)."""
        offsets = self.offsets({})
        await self.settle(offsets)
        if offsets or self.owed:
            await self.commit(offsets)

    def markable(self, partition: int, offset: int) -> bool:
        """Whether ``partition`` can be committed at ``offset`` now (no held record before)."""
        held = self.holds.first_offsets().get(partition)
        return held is None or held >= offset

    async def mark(
        self, offsets: dict[int, int], partition: int, offset: int, mark: str
    ) -> set[int]:
        """Commit what is handled (``offsets``) and ``partition`` at ``offset`` with metadata
        ``mark``, before the records from ``offset`` on are handled (see
        :mod:`pipeline.runtime.crashes`; check :meth:`markable` first).

        Returns:
            Partitions whose transaction in flight was lost (read again from the log); when
            ``partition`` is one of them, nothing was committed.
        """
        lost = await self.settle(offsets)
        if partition not in lost:
            await self.commit({**offsets, partition: offset}, {partition: mark})
        return lost

    async def mark_finished(self, partition: int, offset: int, mark: str) -> set[int]:
        """Key lanes: :meth:`mark`, with the records finished so far committed along."""
        async with self._lock:
            lost = await self.settle()
            if partition not in lost:
                # Nothing awaits from taking the finished records to the commit swapping out
                # the buffers (as in flush_finished): the outputs made durable are theirs.
                done = self.tracker.made_durable(self.tracker.take_finished())
                await self.commit({**done, partition: offset}, {partition: mark})
            return lost

    async def flush_finished(self, ready: Callable[[], bool] | None = None) -> bool:
        """Key lanes: commit the records finished since the last commit; return whether it
        committed (or had nothing to), ``False`` when ``ready()``, asked under the commit
        lock right before the finished records are taken, said not now."""
        async with self._lock:
            refused = False

            def offsets() -> dict[int, int] | None:
                # In the commit's snapshot step (see start): the finished records taken here
                # are exactly those whose outputs and state the commit makes durable.
                # The positions count ``done`` as durable: the transport makes outputs
                # durable before it commits offsets, and a failure there stops the worker.
                nonlocal refused
                if ready is not None and not ready():
                    refused = True
                    return None
                done = self.tracker.take_finished()
                if not done and not any(t.pending for t in self.table.partitions.values()):
                    return None  # nothing finished since the last commit
                return self.tracker.made_durable(done)

            await self.commit(offsets)
            return not refused

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions that are read again from their committed offset, or not ours any more."""
        gone = set(partitions)
        self.tracker.forget(gone)
        for p in gone:
            self._handled.pop(p, None)
            self.committed.pop(p, None)

    def rewound(self) -> None:
        """Every partition is read again from its committed offset (after a trip)."""
        self.tracker.clear()
        self._handled.clear()
