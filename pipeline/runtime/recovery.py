"""Start a stage's partitions over after a commit failed because of the broker.

A retriable :class:`~pipeline.errors.BrokerError` out of a commit (no broker answered within
the client's own retries, a leader or coordinator moved, a transaction's outcome could not be
learned) must not stop the stage: the worker drops everything it had not committed (buffered
outputs, state changes, records held by the breaker), waits for a broker with backoff, and
takes every partition again as if it had just been assigned: its producer (exactly-once), its
committed offset, its state restored from the changelog. What was written but not committed
is a duplicate the next stage drops (at-least-once) or part of an aborted transaction
(exactly-once): nothing is lost and nothing is doubled in a ``read_committed`` output.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pipeline.errors import BrokerError, FencedError

if TYPE_CHECKING:
    from pipeline.runtime.worker import StageWorker

log = logging.getLogger("pipeline.runtime.worker")


async def recover(worker: StageWorker, exc: BrokerError, stop: asyncio.Event) -> None:
    """A commit failed for a reason that passes (no broker, a leader moving): start every
    partition over from its committed offset once a broker answers."""
    log.warning(
        "stage %s: a commit failed (%s); the stage drops what it had not committed and "
        "reads its partitions again from their committed offsets once a broker answers",
        worker.node.name, exc,
    )  # fmt: skip
    worker.stats.recoveries += 1
    # Back off across recoveries too: a broker that answers but cannot take writes yet (it is
    # still loading its logs) fails the next commit as well.
    now = time.monotonic()
    streak = worker.recovery_streak + 1 if now - worker.last_recovery < 60 else 1
    worker.recovery_streak, worker.last_recovery = streak, now
    if streak > 1:
        await asyncio.sleep(min(0.5 * 2 ** (streak - 2), 30.0))
    async with worker._lock:
        parts = sorted(worker.table.partitions)
        worker.commits.abandon()
        worker.commits.forget(parts)
        worker.handler.holds.drop(set(parts))
        worker.stats.held = len(worker.handler.holds.held)
        for partition in parts:
            worker.transport.discard(partition)
            worker.table.close(partition)  # its state is rebuilt from the changelog
        if worker.exactly_once and not worker.transport.member():
            # Forgotten by its group (a session that expired while the broker was away): a
            # new transactional producer would fence the instance that owns the partitions.
            raise FencedError(
                f"stage {worker.node.name}: a commit failed ({exc}) and the group no longer "
                f"knows this instance; it stops rather than fence the instance that took over",
            ) from exc
        delay = 0.5
        while not stop.is_set():
            try:
                owned = {tp.partition for tp in worker.transport.assignment()}
                for partition in parts:
                    if partition in worker.table.partitions or partition not in owned:
                        continue  # done, or not ours any more (a rebalance meanwhile)
                    await worker.transport.release(partition)
                    await worker.transport.claim(partition)
                    await worker.transport.rewind(partition)
                    await worker.restore(partition)
                return
            except BrokerError as again:
                if not again.retriable:
                    raise
                log.debug("stage %s: recovery: %s", worker.node.name, again)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
