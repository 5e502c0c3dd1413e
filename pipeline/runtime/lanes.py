"""Key-ordered concurrency: up to N records of different keys at once, each key in order.

Records are queued per key (a *lane*). N workers take the next ready key, process the head of
its lane, and put the key back at the end of the ready queue while its lane is not empty, so a
key never has two records in flight and keys share the workers fairly.

:class:`OffsetTracker` keeps, per partition, the offsets handed out in order; a partition's
commit position advances only past records whose outputs are durable, so it never passes the
lowest unfinished record.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any


class OffsetTracker:
    """Commit positions that never pass a record whose outputs are not durable yet."""

    __slots__ = ("_durable", "_finished", "_pending")

    def __init__(self) -> None:
        self._pending: dict[Any, deque[int]] = {}
        self._finished: list[tuple[Any, int]] = []
        self._durable: dict[Any, set[int]] = {}

    def started(self, tp: Any, offset: int) -> None:
        """Record ``offset`` of ``tp`` as handed out (call in offset order per partition)."""
        lane = self._pending.get(tp)
        if lane is None:
            lane = self._pending[tp] = deque()
        lane.append(offset)

    def finished(self, tp: Any, offset: int) -> None:
        """The record is done; its outputs are buffered but not yet durable."""
        self._finished.append((tp, offset))

    def take_finished(self) -> list[tuple[Any, int]]:
        """Finished records whose outputs the caller is about to flush."""
        taken, self._finished = self._finished, []
        return taken

    def made_durable(self, records: list[tuple[Any, int]]) -> dict[Any, int]:
        """Mark flushed records durable; return the new commit position per partition."""
        for tp, offset in records:
            self._durable.setdefault(tp, set()).add(offset)
        positions: dict[Any, int] = {}
        for tp, durable in self._durable.items():
            pending = self._pending.get(tp)
            while pending and pending[0] in durable:
                offset = pending.popleft()
                durable.discard(offset)
                positions[tp] = offset + 1
        return positions

    def forget(self, tps: set[Any]) -> None:
        """Drop the state of partitions that are no longer ours."""
        for tp in tps:
            self._pending.pop(tp, None)
            self._durable.pop(tp, None)
        self._finished = [(tp, o) for tp, o in self._finished if tp not in tps]

    def clear(self) -> None:
        """Drop everything (every partition is read again from its committed offset)."""
        self._pending, self._durable, self._finished = {}, {}, []

    def in_flight(self) -> int:
        return sum(len(p) for p in self._pending.values())


class KeyLanes:
    """Runs ``handle(item)`` for up to ``concurrency`` items at once, one per key at a time."""

    def __init__(
        self, concurrency: int, handle: Callable[[Any], Awaitable[None]], max_buffered: int
    ) -> None:
        self._handle = handle
        self._lanes: dict[Hashable, deque[Any]] = {}
        self._ready: asyncio.Queue[Hashable] = asyncio.Queue()
        self._buffered = 0
        self._max_buffered = max_buffered
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._error: BaseException | None = None
        self._workers = [asyncio.create_task(self._work()) for _ in range(concurrency)]

    def submit(self, key: Hashable, item: Any) -> None:
        """Queue ``item`` behind the earlier items of ``key``."""
        lane = self._lanes.get(key)
        if lane is None:
            self._lanes[key] = deque((item,))
            self._ready.put_nowait(key)
        else:
            lane.append(item)
        self._buffered += 1
        self._idle.clear()
        if self._buffered >= self._max_buffered:
            self._room.clear()

    @property
    def idle(self) -> bool:
        """Whether every submitted item is handled."""
        return self._idle.is_set()

    @property
    def buffered(self) -> int:
        """Items queued or running now."""
        return self._buffered

    async def wait_for_room(self) -> None:
        """Wait until fewer than ``max_buffered`` items are queued or running."""
        await self._room.wait()
        self._raise_if_failed()

    async def wait_idle(self) -> None:
        """Wait until every submitted item is handled."""
        await self._idle.wait()
        self._raise_if_failed()

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    async def _work(self) -> None:
        while True:
            key = await self._ready.get()
            lane = self._lanes[key]
            try:
                await self._handle(lane[0])
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # a bug, a broker failure, a SystemExit: stop loudly
                # (a BaseException too: swallowed here, it would leave the worker hanging)
                self._error = exc
                self._idle.set()
                self._room.set()
                return
            lane.popleft()
            if lane:
                self._ready.put_nowait(key)
            else:
                del self._lanes[key]
            self._buffered -= 1
            if self._buffered < self._max_buffered:
                self._room.set()
            if self._buffered == 0:
                self._idle.set()
