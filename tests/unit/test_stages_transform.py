"""stages.transform on the TestDriver: map, filter and flat-map, sync and async."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import DefinitionError, Emit, Pipeline, Record, SchemaStore
from pipeline.testing import TestDriver
from stages import ResultError, filter_stage, flat_map_stage, map_stage

SCHEMAS = SchemaStore.from_directory(Path(__file__).parent / "schemas_stages")
ORDER, LINE = "stages.test.Order", "stages.test.Line"


def order(oid: str, total: float, skus: list[str]) -> dict[str, Any]:
    return {"id": oid, "total": total, "skus": skus}


def pipeline(*stages: Any) -> Pipeline:
    p = Pipeline("t", source="t.in", key="id", schemas=SCHEMAS)
    for s in stages:
        p = p | s
    return p


def lines(o: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for sku in o["skus"]:
        yield {"id": o["id"], "sku": sku, "share": o["total"] / len(o["skus"])}


def test_filter_map_flat_map_chain() -> None:
    big = filter_stage("big", lambda o: o["total"] >= 10, schema=ORDER)
    tax = map_stage("tax", lambda o: {**o, "total": o["total"] * 1.5}, input=ORDER, output=ORDER)
    split = flat_map_stage("split", lines, input=ORDER, output=LINE)
    driver = TestDriver(pipeline(big, tax, split))
    driver.send(order("a", 20, ["x", "y"]))
    driver.send(order("b", 5, ["z"]))  # filtered by big
    driver.send(order("c", 10, []))  # no lines: filtered by split
    stats = driver.run()
    assert driver.outputs() == [
        {"id": "a", "sku": "x", "share": 15.0},
        {"id": "a", "sku": "y", "share": 15.0},
    ]
    assert (stats["big"].filtered, stats["big"].produced) == (1, 2)
    assert [o["total"] for o in driver.outputs("tax")] == [30.0, 15.0]
    assert (stats["split"].produced, stats["split"].filtered) == (2, 1)
    # Flat-map outputs share the input's sequence number and are numbered apart.
    parts = [r.header("seq-part") for r in driver.records("t.split")]
    assert parts == [b"0", b"1"]


def test_async_functions_and_record_context() -> None:
    async def slow_tax(o: dict[str, Any], record: Record) -> dict[str, Any]:
        await asyncio.sleep(0)
        assert record.key == o["id"].encode()
        return {**o, "total": o["total"] + len(record.key)}

    async def keep(o: dict[str, Any]) -> bool:
        await asyncio.sleep(0)
        return o["id"] != "drop"

    async def agen_lines(o: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for line in lines(o):
            await asyncio.sleep(0)
            yield line

    stages = (
        filter_stage("keep", keep, schema=ORDER, concurrency=4),
        map_stage("tax", slow_tax, input=ORDER, output=ORDER, concurrency=4),
        flat_map_stage("split", agen_lines, input=ORDER, output=LINE, concurrency=4),
    )
    assert all(s.is_async and s.concurrency == 4 for s in stages)
    driver = TestDriver(pipeline(*stages))
    driver.send(order("ab", 4, ["x", "y"]))
    driver.send(order("drop", 4, ["z"]))
    driver.run()
    assert driver.outputs() == [
        {"id": "ab", "sku": "x", "share": 3.0},
        {"id": "ab", "sku": "y", "share": 3.0},
    ]


def test_map_may_rekey_with_emit() -> None:
    rekey = map_stage("rekey", lambda o: Emit(o, key=o["skus"][0]), input=ORDER, output=ORDER)
    driver = TestDriver(pipeline(rekey))
    driver.send(order("a", 1, ["sku-9"]))
    driver.run()
    [out] = driver.records("t.rekey")
    assert out.key == b"sku-9"


@pytest.mark.parametrize(
    ("result", "message"),
    [(None, "returned None"), ([], "returned a list"), (({},), "returned a tuple")],
)
def test_map_results_that_are_not_one_value_are_dead_lettered(result: Any, message: str) -> None:
    driver = TestDriver(pipeline(map_stage("m", lambda o: result, input=ORDER, output=ORDER)))
    driver.send(order("a", 1, []))
    stats = driver.run()["m"]
    [dead] = driver.dead_letters()
    assert (dead.error_class, dead.attempts) == ("ResultError", 1)
    assert message in dead.error_message
    assert stats.filtered == 0  # a broken map is never a silent filter


@pytest.mark.parametrize("result", [None, {"id": "a"}, 7])
def test_flat_map_results_that_are_not_iterables_are_dead_lettered(result: Any) -> None:
    stage = flat_map_stage("f", lambda o: result, input=ORDER, output=LINE)
    driver = TestDriver(pipeline(stage))
    driver.send(order("a", 1, []))
    driver.run()
    [dead] = driver.dead_letters()
    assert dead.error_class == "ResultError"
    with pytest.raises(ResultError):
        stage(order("a", 1, []))


def test_failing_functions_are_retried_then_dead_lettered() -> None:
    calls = []

    def flaky(o: dict[str, Any]) -> dict[str, Any]:
        calls.append(o["id"])
        if len(calls) < 3:
            raise ConnectionError("try again")
        return o

    driver = TestDriver(pipeline(map_stage("m", flaky, input=ORDER, output=ORDER)))
    driver.send(order("a", 1, []))
    stats = driver.run()["m"]
    assert calls == ["a", "a", "a"] and stats.retries == 2 and stats.produced == 1


def test_bad_definitions_are_refused() -> None:
    with pytest.raises(DefinitionError, match="map function must be callable"):
        map_stage("m", "nope", input=ORDER, output=ORDER)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="needs an async function"):
        map_stage("m", lambda o: o, input=ORDER, output=ORDER, concurrency=2)
    with pytest.raises(DefinitionError, match="not valid"):
        filter_stage("bad name", bool, schema=ORDER)
    with pytest.raises(DefinitionError, match=r"stages\.test\.Nope"):
        pipeline(map_stage("m", lambda o: o, input=ORDER, output="stages.test.Nope"))
