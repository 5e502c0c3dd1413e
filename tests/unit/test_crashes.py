"""Crash-loop protection on the in-memory broker: deliveries counted across worker deaths.

A "death" here is a ``BaseException`` out of the stage function: nothing in the worker catches
it, the run ends failed, and a new worker of the group takes over from the committed offsets,
as a restarted process would (the real-process version, with ``os._exit``, is in
tests/integration/test_crash_loop.py).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from pipeline import CrashPolicy, DefinitionError, stage
from pipeline.record import ID_HEADER
from pipeline.runtime import deadletter as dlq
from pipeline.runtime.crashes import CrashGuard, Mark
from pipeline.testing.memory import MemoryBroker
from tests.unit.test_worker import LINE, ORDER, PRICED, Harness, order


class Died(BaseException):
    """Stands for a worker process killed while a record was in hand."""


def _price(o: dict[str, Any]) -> dict[str, Any]:
    return {"order_id": o["order_id"], "n": o["n"], "total": o["amount"] * o["n"]}


async def run_until_drained(
    make: Any, broker: MemoryBroker, lives: int = 12
) -> tuple[int, list[Harness]]:
    """Start worker after worker (each a new 'process') until one drains the input."""
    deaths, runs = 0, []
    for _ in range(lives):
        h = Harness(make(), broker=broker)
        runs.append(h)
        try:
            await h.drain()
        except Died:
            deaths += 1
            continue
        return deaths, runs
    pytest.fail(f"still dying after {lives} starts")


def published(h: Harness, n: int, poison: set[str]) -> list[str]:
    ids = [f"o-{i}" for i in range(n)]
    for oid in ids:
        h.publish(order(oid, n=1))
    assert poison <= set(ids)
    return ids


def outputs(runs: list[Harness]) -> Counter[str]:
    return Counter(v["order_id"] for v in runs[-1].values())


def dead_letters(runs: list[Harness]) -> list[tuple[str, bytes | None, bytes | None]]:
    return [
        (r.key.decode() if r.key else "", r.header(dlq.ERROR_CLASS), r.header(dlq.ATTEMPTS))
        for r in runs[-1].dead()
    ]


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_record_that_kills_its_worker_is_dead_lettered_as_crash_loop(
    concurrency: int,
) -> None:
    calls: Counter[str] = Counter()

    def make() -> Any:
        if concurrency == 1:

            @stage(input=ORDER, output=PRICED, name="price")
            def price(o: dict[str, Any]) -> dict[str, Any]:
                calls[o["order_id"]] += 1
                if o["order_id"] == "o-17":
                    raise Died()
                return _price(o)

            return price

        @stage(input=ORDER, output=PRICED, name="price", concurrency=concurrency)
        async def aprice(o: dict[str, Any]) -> dict[str, Any]:
            calls[o["order_id"]] += 1
            await asyncio.sleep(0)
            if o["order_id"] == "o-17":
                raise Died()
            return _price(o)

        return aprice

    broker = MemoryBroker()
    ids = published(Harness(make(), broker=broker), 60, {"o-17"})
    deaths, runs = await run_until_drained(make, broker)

    # max_deliveries (3) deaths or one more, two of them with it alone in hand. Inline, the
    # first death is in a range, the second in a chunk of several records, the third and fourth
    # with it alone: 4. In key lanes, where the lanes are when a worker dies decides whether
    # its second death is already with it alone: 3 or 4.
    assert deaths == 4 if concurrency == 1 else deaths in (3, 4)
    assert calls["o-17"] == deaths  # and no call after the verdict
    assert dead_letters(runs) == [("o-17", b"CrashLoop", str(deaths).encode())]
    out = outputs(runs)
    assert set(out) == set(ids) - {"o-17"}  # every other record
    if concurrency == 1:
        assert max(out.values()) == 1  # once
    else:
        # At least once: a lane's death can cut a commit in flight between the outputs and
        # the offsets; each repeat carries its original's event id, for the next stage's dedup.
        ids_by_order: dict[str, set[bytes | None]] = {}
        for r in runs[-1].outputs():
            ids_by_order.setdefault(str(r.key), set()).add(r.header(ID_HEADER))
        assert all(len(v) == 1 for v in ids_by_order.values())
    stats = runs[-1].worker.stats
    assert stats.dead_by_error["CrashLoop"] == 1


async def test_an_unrelated_death_costs_a_few_commits_and_dead_letters_nothing() -> None:
    calls: Counter[str] = Counter()
    killed: list[int] = []

    def make() -> Any:
        @stage(input=ORDER, output=PRICED, name="price")
        def price(o: dict[str, Any]) -> dict[str, Any]:
            calls[o["order_id"]] += 1
            if o["order_id"] == "o-30" and not killed:
                killed.append(1)  # e.g. a deployment's SIGKILL, once
                raise Died()
            return _price(o)

        return price

    broker = MemoryBroker()
    ids = published(Harness(make(), broker=broker), 90, {"o-30"})
    deaths, runs = await run_until_drained(make, broker)
    assert deaths == 1
    assert runs[-1].dead() == []
    assert outputs(runs) == Counter(ids)
    # The survivor handled the dead worker's range in chunks 1, 2, 4, ...: a mark each (30
    # records per partition: 5 or 6 each), not a commit per record (90).
    marks = [c for c in runs[-1].transport.commits if len(c) == 1]
    assert 3 <= len(marks) <= 3 * 6


async def test_a_clean_stop_leaves_nothing_suspect() -> None:
    broker = MemoryBroker()

    def make() -> Any:
        return stage(input=ORDER, output=PRICED, name="price")(_price)

    h = Harness(make(), broker=broker)
    published(h, 20, set())
    await h.drain()
    group, topic = h.node.group, h.node.input_topic
    assert {p: broker._metadata[(group, topic, p)] for p in range(3)} == dict.fromkeys(range(3), "")
    again = Harness(make(), broker=broker)
    h.publish(order("o-late"))
    await again.drain()
    assert again.worker.guard.suspects == {}
    assert again.worker.stats.consumed == 1


async def test_crash_policy_off_lets_the_worker_die_every_time() -> None:
    def make() -> Any:
        @stage(input=ORDER, output=LINE, name="split", crash=CrashPolicy.off())
        def split(o: dict[str, Any]) -> list[dict[str, Any]]:
            raise Died()

        return split

    broker = MemoryBroker()
    published(Harness(make(), broker=broker), 3, set())
    for _ in range(5):
        with pytest.raises(Died):
            await Harness(make(), broker=broker).drain()


def test_marks_read_back_and_foreign_metadata_is_ignored() -> None:
    assert Mark.decode(Mark(500, 2, False).encode()) == Mark(500, 2, False)
    assert Mark.decode("pipeline.crash/1 500 2 live") == Mark(500, 2, True)  # an older mark
    for foreign in ("", "some tool's note", "pipeline.crash/2 x 1 0 live", "pipeline.crash/2 5 1"):
        assert Mark.decode(foreign) is None


def test_a_new_owner_reads_live_marks_as_one_more_death() -> None:
    guard = CrashGuard(CrashPolicy(max_deliveries=3), window=100, stage="s")
    guard.taken(
        {
            0: (10, Mark(110, 0, True).encode()),  # died with a batch in hand: suspect, 1
            1: (20, Mark(21, 2, True, alone=1).encode()),  # third death, second alone: doomed
            5: (60, Mark(61, 2, True).encode()),  # third death, the first alone: not yet
            2: (30, Mark(130, 1, False).encode()),  # stopped cleanly inside a range: keeps 1
            3: (40, ""),  # someone else's commit
            4: (50, Mark(50, 3, True).encode()),  # a range that ends where it starts
        }
    )
    s = guard.suspects
    assert sorted(s) == [0, 1, 2, 5]
    assert (s[0].end, s[0].deaths, s[0].doomed) == (110, 1, None)
    assert (s[1].end, s[1].deaths, s[1].alone, s[1].doomed) == (21, 3, 2, 20)
    # Two deaths in ranges, the third with it alone: an unrelated kill may have landed on it
    # while the range was narrowed down; run it alone once more before any verdict.
    assert (s[5].end, s[5].deaths, s[5].alone, s[5].doomed) == (61, 3, 1, None)
    assert (s[2].end, s[2].deaths, s[2].doomed) == (130, 1, None)
    # What commits write: ordinary ones cover the window; a clean stop keeps a count.
    assert Mark.decode(guard.mark(3, 45)) == Mark(145, 0, True)
    assert Mark.decode(guard.mark(0, 12)) == Mark(110, 1, False)  # at a chunk boundary
    assert guard.clean({0: 12, 3: 45}) == {0: Mark(110, 1, False).encode(), 3: ""}


def test_max_deliveries_below_two_is_refused() -> None:
    with pytest.raises(DefinitionError, match="at least 2"):
        CrashPolicy(max_deliveries=1)
