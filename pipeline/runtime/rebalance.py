"""A stage worker's partitions changing hands: taken over (claimed, state restored, crash
marks read), given up (finished, committed, marked clean, state dropped), lost (an exactly-once
transaction that did not commit: state rebuilt).

These run in aiokafka's rebalance callbacks, under the worker's lock: the fetch loop waits until
every new partition's table is restored. An error here is kept by the worker and raised by its
loop (:meth:`~pipeline.runtime.worker.StageWorker.fail`): aiokafka would log and swallow it, and
the worker would go on with a half-built state.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pipeline.errors import BrokerError
from pipeline.runtime.state import now_ms

if TYPE_CHECKING:
    from pipeline.runtime.worker import StageWorker

log = logging.getLogger("pipeline.runtime.worker")

_RESTORE_LOG_EVERY = 100_000


async def assigned(worker: StageWorker, assigned: set[Any]) -> None:
    """Restore each new partition's table before any of its records is handled."""
    if worker._fatal is not None or worker._stopping:
        return  # a fenced, failed or stopping worker takes nothing new
    stats = worker.stats
    before = stats.state
    try:
        # The lock keeps the fetch loop out until every table is restored: records of a
        # partition whose table is not ready yet must not be fetched and dropped.
        async with worker._lock:
            if worker._stopping:
                return
            stats.state = "restoring"
            taken = []
            for tp in sorted(assigned):
                if tp.partition not in worker.table.partitions:
                    await worker.transport.claim(tp.partition)
                    await restore(worker, tp.partition)
                    taken.append(tp.partition)
            if worker.guard.enabled and taken:
                read_from = await worker.transport.read_from(taken)
                marks = worker.guard.taken(read_from)
                origin = {p: o for p, (o, _) in read_from.items()}
                await worker.commits.commit(origin, marks)
                worker.taken_at.update(origin)  # (not handled yet while still committed here)
            if before == "paused":
                worker.transport.pause()  # new partitions wait out the pause too
            stats.state = before if before in ("paused", "probing") else "running"
    except Exception as exc:  # aiokafka would log it and go on with a half-built state
        worker.fail(exc, "taking over partitions")
        return
    if worker.gate is not None and worker.node.lane is not None:
        worker.gate.ready(worker.node.lane)
    log.info("stage %s: partitions assigned: %s", worker.node.label, _fmt(assigned))


async def lost(worker: StageWorker, partition: int) -> None:
    """Its transaction was lost: rebuild its state; it is read again from the log."""
    worker.table.close(partition)
    await restore(worker, partition)


async def restore(worker: StageWorker, partition: int) -> None:
    table, start = worker.table.open(partition)
    began, now, n = time.monotonic(), now_ms(), 0
    async for batch in worker.transport.restore(partition, start):
        table.apply_many(batch, now)
        if (n + len(batch)) // _RESTORE_LOG_EVERY > n // _RESTORE_LOG_EVERY:
            log.info(
                "stage %s: restoring partition %d: %d records",
                worker.node.name, partition, n + len(batch),
            )  # fmt: skip
        n += len(batch)
    seconds = time.monotonic() - began
    worker.gauges()
    worker.stats.restored += n
    worker.stats.restore_seconds += seconds
    if n:
        log.info(
            "stage %s: restored partition %d from its changelog: %d records in %.2fs",
            worker.node.name, partition, n, seconds,
        )  # fmt: skip


async def revoked(worker: StageWorker, revoked: set[Any]) -> None:
    """Before partitions move: finish what we hold, make it durable, commit, drop state.

    Under exactly-once the current positions are committed once more, in a transaction
    per partition: a zombie (fenced by the instance that took its partitions while it was
    silent) finds out here, even when it had nothing new to commit, and stops.
    """
    try:
        async with worker._lock:
            gone = {tp.partition for tp in revoked}
            commits = worker.commits
            try:
                try:
                    await commits.settle()
                    if worker._lanes is not None:
                        await worker._lanes.wait_idle()
                        await commits.flush_finished()
                    elif worker._fatal is None:
                        await commits.catch_up()  # batches handled while the last ran
                    if worker._fatal is None:
                        await clean_marks(worker, gone)
                except BrokerError as exc:
                    if not exc.retriable:
                        raise
                    # The broker is down or moving: what was not committed is dropped;
                    # whoever owns the partitions next reads them from the committed offset.
                    log.warning(
                        "stage %s: the commit before giving up partitions failed (%s); "
                        "they are read again from their committed offsets",
                        worker.node.name, exc,
                    )  # fmt: skip
                    commits.abandon()
                    for partition in gone:
                        worker.transport.discard(partition)
                worker.handler.holds.drop(gone)
                worker.stats.held = len(worker.handler.holds.held)
            finally:
                commits.forget(gone)
                worker.guard.forget(gone)
                for partition in gone:
                    await close_partition(worker, partition)
    except Exception as exc:  # aiokafka would log and swallow it, and rejoin
        worker.fail(exc, "giving up partitions")
        return
    log.info("stage %s: partitions revoked: %s", worker.node.name, _fmt(revoked))


async def clean_marks(worker: StageWorker, partitions: set[int]) -> None:
    """Commit ``partitions`` once more, saying that no record of them is in hand (see
    :mod:`pipeline.runtime.crashes`). Under exactly-once this is also the commit in a
    transaction that tells a zombie it was fenced, even with nothing new to commit."""
    offsets = {p: o for p, o in worker.commits.committed.items() if p in partitions}
    marks = worker.guard.clean(offsets) if worker.guard.enabled else None
    if worker.exactly_once:
        await worker.transport.commit(offsets, {}, marks)
    elif offsets and marks is not None:
        try:
            await worker.commits.commit(offsets, marks)
        except BrokerError as exc:  # the next owner suspects a death: a few more commits
            log.warning("stage %s: could not mark a clean stop: %s", worker.node.name, exc)


async def close_partition(worker: StageWorker, partition: int) -> None:
    if partition not in worker.table.partitions:
        return
    if worker.table.stores.persistent and worker._fatal is None:
        try:
            worker.table.saved(partition, await worker.transport.state_end(partition))
        except BrokerError as exc:  # no checkpoint: the next restore reads more, that is all
            log.debug(
                "stage %s: no checkpoint for partition %d: %s", worker.node.name, partition, exc
            )
    worker.table.close(partition)
    await worker.transport.release(partition)


def _fmt(tps: set[Any]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(tps)) or "none"
