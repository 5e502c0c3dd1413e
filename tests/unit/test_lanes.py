"""OffsetTracker (commits never pass an unfinished record) and KeyLanes (order per key)."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import pytest

from pipeline.runtime.lanes import KeyLanes, OffsetTracker

TP = ("in", 0)
OTHER = ("in", 1)


def _durable(tracker: OffsetTracker) -> dict[Any, int]:
    return tracker.made_durable(tracker.take_finished())


# -- OffsetTracker -------------------------------------------------------------------------


def test_in_order_finishing_advances_past_each_record() -> None:
    t = OffsetTracker()
    for o in (10, 11, 12):
        t.started(TP, o)
    t.finished(TP, 10)
    assert _durable(t) == {TP: 11}
    t.finished(TP, 11)
    t.finished(TP, 12)
    assert _durable(t) == {TP: 13}
    assert t.in_flight() == 0


def test_out_of_order_finishing_never_passes_the_lowest_unfinished_record() -> None:
    t = OffsetTracker()
    for o in range(5):
        t.started(TP, o)
    t.finished(TP, 3)
    t.finished(TP, 1)
    t.finished(TP, 4)
    assert _durable(t) == {}  # 0 is still running: nothing may be committed
    t.finished(TP, 0)
    assert _durable(t) == {TP: 2}  # 0 and 1 done; 2 still running
    t.finished(TP, 2)
    assert _durable(t) == {TP: 5}
    assert _durable(t) == {}  # nothing new: no position to commit


def test_finished_is_not_committable_until_made_durable() -> None:
    t = OffsetTracker()
    t.started(TP, 0)
    t.started(TP, 1)
    t.finished(TP, 0)
    taken = t.take_finished()
    t.finished(TP, 1)  # finishes while the flush of ``taken`` is in progress
    assert t.made_durable(taken) == {TP: 1}  # 1's outputs were not in that flush
    assert t.made_durable(t.take_finished()) == {TP: 2}


def test_partitions_are_independent() -> None:
    t = OffsetTracker()
    for o in (0, 1):
        t.started(TP, o)
        t.started(OTHER, o)
    t.finished(OTHER, 0)
    t.finished(TP, 1)
    assert _durable(t) == {OTHER: 1}
    t.finished(TP, 0)
    assert _durable(t) == {TP: 2}


def test_gaps_in_offsets_are_fine() -> None:
    # Compacted topics and transaction markers leave holes in the offsets.
    t = OffsetTracker()
    for o in (3, 7, 20):
        t.started(TP, o)
    t.finished(TP, 20)
    t.finished(TP, 3)
    assert _durable(t) == {TP: 4}
    t.finished(TP, 7)
    assert _durable(t) == {TP: 21}


def test_forget_drops_a_revoked_partition() -> None:
    t = OffsetTracker()
    for o in (0, 1):
        t.started(TP, o)
        t.started(OTHER, o)
    t.finished(TP, 0)
    t.finished(OTHER, 1)
    t.forget({OTHER})
    assert t.in_flight() == 2
    assert _durable(t) == {TP: 1}  # nothing of OTHER, even though 1 finished before forget
    t.started(OTHER, 5)  # assigned again later, from the committed offset
    t.finished(OTHER, 5)
    assert _durable(t) == {OTHER: 6}


@pytest.mark.parametrize("seed", range(20))
def test_random_finishing_order_commits_exactly_the_finished_prefix(seed: int) -> None:
    rng = random.Random(seed)
    offsets = list(range(50))
    t = OffsetTracker()
    for o in offsets:
        t.started(TP, o)
    order = offsets[:]
    rng.shuffle(order)
    done: set[int] = set()
    committed = 0
    for o in order:
        t.finished(TP, o)
        done.add(o)
        if rng.random() < 0.3:
            continue  # not flushed yet
        position = _durable(t).get(TP)
        prefix = next((i for i in offsets if i not in done), 50)
        if position is not None:
            assert position > committed
            committed = position
        assert committed == prefix
    assert _durable(t).get(TP, committed) == 50


# -- KeyLanes --------------------------------------------------------------------------------


async def test_lanes_keep_order_per_key_and_bound_concurrency() -> None:
    active: set[str] = set()
    peak = 0
    handled: dict[str, list[int]] = defaultdict(list)

    async def handle(item: tuple[str, int]) -> None:
        nonlocal peak
        key, n = item
        assert key not in active
        active.add(key)
        peak = max(peak, len(active))
        await asyncio.sleep(0.001 * (hash(key) % 3))
        handled[key].append(n)
        active.discard(key)

    lanes = KeyLanes(3, handle, max_buffered=1000)
    try:
        for n in range(6):
            for key in "abcdefg":
                lanes.submit(key, (key, n))
        async with asyncio.timeout(5):
            await lanes.wait_idle()
    finally:
        await lanes.close()
    assert handled == {k: list(range(6)) for k in "abcdefg"}
    assert 1 < peak <= 3


async def test_one_slow_key_does_not_block_the_others() -> None:
    release = asyncio.Event()
    done: list[str] = []

    async def handle(key: str) -> None:
        if key == "slow":
            await release.wait()
        done.append(key)

    lanes = KeyLanes(2, handle, max_buffered=100)
    try:
        lanes.submit("slow", "slow")
        for key in ("a", "b", "c"):
            lanes.submit(key, key)
        for _ in range(10):  # a few turns of the loop are plenty for three instant keys
            await asyncio.sleep(0)
        assert done == ["a", "b", "c"]
        release.set()
        await lanes.wait_idle()
    finally:
        await lanes.close()
    assert done[-1] == "slow"


async def test_room_closes_at_max_buffered_and_reopens() -> None:
    gate = asyncio.Event()

    async def handle(_: int) -> None:
        await gate.wait()

    lanes = KeyLanes(2, handle, max_buffered=3)
    try:
        for i in range(3):
            lanes.submit(i, i)
        waiter = asyncio.create_task(lanes.wait_for_room())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        gate.set()
        async with asyncio.timeout(5):
            await waiter
            await lanes.wait_idle()
    finally:
        await lanes.close()


async def test_a_handler_error_surfaces_in_wait_idle_and_wait_for_room() -> None:
    async def handle(item: int) -> None:
        if item == 2:
            raise RuntimeError("broker gone")

    lanes = KeyLanes(2, handle, max_buffered=10)
    try:
        for i in range(4):
            lanes.submit("k", i)
        async with asyncio.timeout(5):
            with pytest.raises(RuntimeError, match="broker gone"):
                await lanes.wait_idle()
            with pytest.raises(RuntimeError, match="broker gone"):
                await lanes.wait_for_room()
    finally:
        await lanes.close()
