"""Priority lanes without a broker: the DSL's lane nodes, the gate's turns, a whole pipeline on
the memory broker with dedup and dead letters per lane."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline import DefinitionError, Pipeline, SchemaStore, stage
from pipeline.deploy import kubernetes
from pipeline.priority import Priority
from pipeline.runtime.priority import LaneGate
from pipeline.runtime.topics import topic_specs
from pipeline.testing import TestDriver

SCHEMA = {
    "type": "record",
    "name": "t.Order",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
}
LANES = Priority({"orders.low": 1, "orders.high": 8})


def build() -> Pipeline:
    store = SchemaStore()
    store.add(SCHEMA)

    @stage(input="t.Order", output="t.Order")
    def price(order: dict[str, Any]) -> dict[str, Any]:
        if order["n"] < 0:
            raise ValueError("negative")
        return {**order, "n": order["n"] * 10}

    @stage(input="t.Order", output="t.Order")
    def pack(order: dict[str, Any]) -> dict[str, Any]:
        return order

    return Pipeline("p", source=LANES, key="id", schemas=store) | price | pack


def test_the_first_stage_gets_a_worker_per_lane_with_its_own_group_dlq_and_state() -> None:
    p = build()
    assert p.source == "orders.high" and p.priority == LANES
    lanes = p.lanes_of("price")
    seen = [(n.lane, n.weight, n.group, n.dlq_topic, n.state_topic, n.output_topic) for n in lanes]
    assert seen == [
        ("orders.high", 8, "p.price.orders-high", "p.price.orders-high.dlq",
         "p.price.orders-high.state", "p.price"),
        ("orders.low", 1, "p.price.orders-low", "p.price.orders-low.dlq",
         "p.price.orders-low.state", "p.price"),
    ]  # fmt: skip
    assert [n.label for n in lanes] == ["price[orders.high]", "price[orders.low]"]
    assert p.node("pack").input_topic == "p.price"
    with pytest.raises(DefinitionError, match="reads priority lanes: say which"):
        p.node("price")
    assert p.node("price", "orders.low").lane == "orders.low"
    names = [s.name for s in topic_specs(p)]
    assert len(names) == len(set(names))  # the shared output once
    assert {"orders.high", "orders.low", "p.price"} <= set(names)
    deployments = [d for d in kubernetes(p, "m:p") if d["kind"] == "Deployment"]
    assert len(deployments) == 2  # one process per stage: its lanes take turns in it


@pytest.mark.parametrize(
    "lanes", [{"a": 1}, {"a": 0, "b": 1}, {"a": 1.5, "b": 1}, {"bad topic": 1, "b": 1}]
)
def test_bad_lanes_are_refused(lanes: dict[str, Any]) -> None:
    with pytest.raises(DefinitionError):
        Priority(lanes)


async def test_with_both_lanes_backlogged_the_heavy_lane_takes_8_of_9_records() -> None:
    gate = LaneGate({"high": 8, "low": 1}, batch=900)
    gate.ready("high")
    gate.ready("low")
    order: list[tuple[str, int]] = []

    async def lane(name: str, backlog: int) -> None:
        while backlog:
            most, _ = await gate.enter(name)
            took = min(most, backlog)
            backlog -= took
            order.append((name, took))
            gate.leave(name, took)
            await asyncio.sleep(0)
        gate.leave(name, 0)
        gate.gone(name)

    await asyncio.gather(lane("high", 20_000), lane("low", 20_000))
    first = []
    for name, took in order:  # the first 20,000 records taken
        first += [name] * took
    first = first[:20_000]
    assert first.count("high") / len(first) >= 8 / 9
    assert gate.taken == {"high": 20_000, "low": 20_000}


async def test_a_lane_alone_with_records_fetches_at_full_size_without_turns() -> None:
    gate = LaneGate({"high": 8, "low": 1}, batch=900)
    waiting = asyncio.ensure_future(gate.enter("low"))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the lanes start together
    gate.ready("low")
    gate.ready("high")
    assert await gate.enter("high") == (800, None)  # at first: turns, the heaviest first
    waiting.cancel()
    gate.leave("high", 0)  # high is idle
    for _ in range(5):
        most, wait = await asyncio.wait_for(gate.enter("low"), 0.1)
        assert (most, wait) == (900, None)
        gate.leave("low", 900)


def test_lanes_run_end_to_end_with_dedup_and_dead_letters_per_lane() -> None:
    p = build()
    driver = TestDriver(p)
    driver.send({"id": "a", "n": 1}, lane="orders.high", seq=1)
    driver.send({"id": "a", "n": 1}, lane="orders.high", seq=1)  # a duplicate in its lane
    # Another application publishes the low lane (another writer): its seq 1 is its own.
    driver.send({"id": "a", "n": 2}, lane="orders.low", seq=1, writer="batch-app")
    driver.send({"id": "b", "n": -1}, lane="orders.low", writer="batch-app")  # dead-lettered
    stats = driver.run()
    assert sorted(v["n"] for v in driver.outputs()) == [10, 20]
    assert stats["price[orders.high]"].duplicates == 1
    assert [d.value for d in driver.dead_letters("price")] == []  # (the high lane's)
    assert len(driver.broker.records("p.price.orders-low.dlq")) == 1
