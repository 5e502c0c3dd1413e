"""The worker's side of the breaker: after a trip, rewind, pause, wait, resume.

When the breaker trips (:mod:`pipeline.runtime.holds`), the worker commits exactly what is
finished and then :meth:`Pauses.rewind` forgets the held records and seeks every partition back
to its committed offset, so they are read again. :meth:`Pauses.wait` keeps the partitions
paused for ``BreakerPolicy.probe_wait(n)`` (the n-th pause in a row), polling all along so the
member stays in its group, then resumes them: the stage *probes* (state ``probing``, not
ready) until a call succeeds with nothing held any more, when :meth:`Pauses.check_resumed`
makes it ready again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pipeline.runtime.commits import Commits
from pipeline.runtime.holds import Holds
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Transport
from pipeline.stage import BreakerPolicy

log = logging.getLogger("pipeline.runtime.worker")


class Pauses:
    """Pauses of one worker.

    Args:
        stage: The stage's name (for the log).
        policy: The stage's breaker policy.
        transport: Its transport (seek, pause, resume).
        stats: Its counters (``state``, ``pauses``, ``held``).
        commits: Its commit bookkeeping (forgotten on a rewind).
        holds: Its held records.
        poll: Fetches without waiting (the worker's fetch, with its offset-reset policy).
        sleep, clock: Waits and monotonic seconds (virtual in tests).
    """

    def __init__(
        self,
        stage: str,
        policy: BreakerPolicy,
        transport: Transport,
        stats: StageStats,
        commits: Commits,
        holds: Holds,
        poll: Callable[[int], Awaitable[Mapping[Any, list[Any]]]],
        sleep: Callable[[float], Awaitable[None]],
        clock: Callable[[], float],
    ) -> None:
        self.stage = stage
        self.policy = policy
        self.transport = transport
        self.stats = stats
        self.commits = commits
        self.holds = holds
        self._poll = poll
        self._sleep = sleep
        self._clock = clock
        self.in_a_row = 0  # pauses without a call that succeeded in between
        self._done_at_resume = 0  # records processed or filtered when the last pause ended

    async def rewind(self) -> None:
        """After a trip (and a commit of what is finished): forget the holds, read every
        partition again from its committed offset, pause."""
        t = self.transport
        self.holds.take()
        self.stats.held = 0
        self.commits.rewound()
        for tp in t.assignment():
            await t.rewind(tp.partition)
        t.pause()
        self.stats.state = "paused"
        self.stats.pauses += 1
        self.in_a_row += 1

    async def wait(self, stop: asyncio.Event, check: Callable[[], None]) -> None:
        """Wait with paused partitions (polling, so the member stays in its group); resume.

        Args:
            stop: Ends the wait early.
            check: Raises when the worker must stop (an error from a rebalance callback).
        """
        wait = self.policy.probe_wait(self.in_a_row)
        log.log(
            logging.ERROR if self.in_a_row == 1 else logging.WARNING,
            "stage %s: records of %d different keys failed in a row with the same error and "
            "no call succeeded: its dependency looks down. Paused its partitions (pause %d): "
            "nothing is dead-lettered or committed past them; trying again in %.1fs",
            self.stage, self.policy.keys, self.in_a_row, wait,
        )  # fmt: skip
        t, clock = self.transport, self._clock
        deadline = clock() + wait
        while not stop.is_set():
            check()
            left = deadline - clock()
            if left <= 0:
                break
            batches = await self._poll(0)  # a poll keeps the member in its group
            for tp, msgs in batches.items():  # assigned during the pause: read them later
                t.seek(tp.partition, msgs[0].offset)
            if batches:
                t.pause()
            await self._sleep(min(left, 0.5))
        t.resume()
        self.stats.state = "probing"
        self._done_at_resume = self.stats.processed + self.stats.filtered

    def check_resumed(self) -> None:
        """While probing: a call succeeded and nothing is held, so the dependency is back."""
        stats = self.stats
        if self.holds.held or stats.processed + stats.filtered == self._done_at_resume:
            return
        log.info(
            "stage %s: calls succeed again after %d pause(s); consuming", self.stage,
            self.in_a_row,
        )  # fmt: skip
        self.stats.state = "running"
        self.in_a_row = 0
