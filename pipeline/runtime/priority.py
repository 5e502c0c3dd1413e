"""Turns between the priority lanes of one stage (see :mod:`pipeline.priority`).

The lanes' workers run in one process and one event loop; each asks the :class:`LaneGate`
before it fetches. While another lane has a backlog (its last fetch brought records), the lanes
take turns in weight order, heaviest first, each turn taking up to ``weight`` units of records
(a unit is the fetch size over the sum of the weights); a turn ends when its quota is used, or
when its lane's fetch comes back empty and its partitions are not behind (or it did not fetch
for a second: paused, restoring). A lane alone with records fetches at full size, without
waiting for turns, so a low lane with no high traffic runs as a plain stage would. The lanes
start together: none fetches before every lane's worker has its partitions (or a minute passed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

_STUCK_S = 1.0  # a turn holder that does not fetch for this long (paused, restoring) is skipped
_START_S = 60.0  # lanes wait this long at most for each other to have their partitions


class LaneGate:
    """Weighted turns between the lanes of one stage.

    Args:
        weights: Lane -> weight.
        batch: Records per fetch (``Batching.max_records``).

    Example:
        >>> gate = LaneGate({"high": 8, "low": 1}, batch=900)
        >>> gate.quota
        {'high': 800, 'low': 100}
    """

    def __init__(self, weights: Mapping[str, int], batch: int) -> None:
        self.order = sorted(weights, key=lambda lane: (-weights[lane], lane))
        unit = max(1, batch // sum(weights.values()))
        self.quota = {lane: weights[lane] * unit for lane in self.order}
        top = self.order[0]  # the heaviest lane gets what rounding left over
        self.quota[top] = max(self.quota[top], batch - sum(self.quota[x] for x in self.order[1:]))
        self.batch = batch
        # Lanes whose last fetch brought records; at first every lane may have a backlog, so
        # the first round goes by turns too (the heaviest first).
        self.busy: set[str] = set(self.order)
        self.turn = top
        self.left = self.quota[top]
        self.taken = dict.fromkeys(self.order, 0)  # records per lane (for tests and logs)
        self.starting = set(self.order)  # lanes not yet given their partitions
        self._changed = asyncio.Event()

    def ready(self, lane: str) -> None:
        """``lane``'s worker has its partitions (restored): the lanes start together, so that
        a lane that joins its group first does not run ahead of a heavier one."""
        self.starting.discard(lane)
        self._changed.set()

    async def enter(self, lane: str) -> tuple[int, int | None]:
        """Wait for ``lane``'s turn to fetch; return (at most how many records, a fetch wait
        to use instead of the usual one, or None)."""
        loop = asyncio.get_running_loop()
        if self.starting:
            start_by = loop.time() + _START_S
            while self.starting and loop.time() < start_by:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.5)
            self.starting.clear()  # (a lane that never got its partitions does not hold others)
        deadline = loop.time() + _STUCK_S
        while True:
            if not self.busy - {lane}:  # nobody else has a backlog: full speed
                return self.batch, None
            if self.turn == lane:
                # A lane with a backlog waits for its records as usual; one without only looks
                # (an empty look passes the turn on at once).
                return max(1, self.left), None if lane in self.busy else 0
            remaining = deadline - loop.time()
            if remaining <= 0:  # the turn holder does not fetch (paused, restoring): go on
                self._pass(self.turn)
                continue
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue

    def leave(self, lane: str, taken: int, backlog: bool = False) -> None:
        """``lane``'s fetch brought ``taken`` records (an empty one: ``backlog`` says whether
        its partitions are behind all the same, e.g. right after it took them)."""
        self.taken[lane] += taken
        if taken or backlog:
            self.busy.add(lane)
        else:
            self.busy.discard(lane)
        if self.turn == lane:
            self.left -= taken
            # An empty fetch of a lane whose partitions are behind (its next records are on
            # their way) keeps its turn; a lane that stays so is passed over (enter()).
            if self.left <= 0 or not (taken or backlog):
                self._pass(lane)
        self._changed.set()

    def gone(self, lane: str) -> None:
        """``lane``'s worker stopped: it takes no more turns."""
        self.busy.discard(lane)
        self.starting.discard(lane)
        if self.turn == lane:
            self._pass(lane)
        self._changed.set()

    def _pass(self, lane: str) -> None:
        following = self.order[(self.order.index(lane) + 1) % len(self.order)]
        self.turn, self.left = following, self.quota[following]
        self._changed.set()
