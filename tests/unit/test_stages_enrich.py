"""stages.enrich and stages.table on the TestDriver: merges, missing rows, table lifecycle."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import (
    BrokerUnavailableError,
    ConfigError,
    DefinitionError,
    Pipeline,
    RetryPolicy,
    SchemaStore,
)
from pipeline.testing import TestDriver
from stages import (
    KafkaTable,
    MemoryTable,
    Merge,
    Missing,
    Table,
    TableUnavailable,
    enrich,
)

SCHEMAS = SchemaStore.from_directory(Path(__file__).parent / "schemas_stages")
ORDER = "stages.test.Order"
ENRICHED, NESTED = "stages.test.CustomerOrder", "stages.test.NestedOrder"

CUSTOMERS = {
    "c1": {"id": "c1", "name": "Ada", "tier": "gold"},
    "c2": {"id": "c2", "name": "Bob", "tier": "basic"},
}


def order(oid: str, customer: str | None) -> dict[str, Any]:
    return {"id": oid, "customer_id": customer, "total": 1.0}


def run(stage: Any, *orders: dict[str, Any]) -> TestDriver:
    driver = TestDriver(Pipeline("shop", source="shop.in", key="id", schemas=SCHEMAS) | stage)
    for o in orders:
        driver.send(o)
    driver.run()
    return driver


def by_id(values: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["id"]: v for v in values}


def test_fields_are_merged_and_missing_rows_dead_lettered() -> None:
    counts: Counter[str] = Counter()
    stage = enrich(
        "customer", MemoryTable(CUSTOMERS), on="customer_id", input=ORDER, output=ENRICHED,
        merge=Merge.fields("tier", customer_name="name"), counts=counts,
    )  # fmt: skip
    driver = run(stage, order("o1", "c1"), order("o2", "c9"), order("o3", "c2"), order("o4", None))
    out = by_id(driver.outputs())
    assert set(out) == {"o1", "o3"}
    assert (out["o1"]["customer_name"], out["o1"]["tier"]) == ("Ada", "gold")
    assert (out["o3"]["customer_name"], out["o3"]["tier"]) == ("Bob", "basic")
    dead = sorted(driver.dead_letters(), key=lambda d: d.value["id"])
    assert [(d.value["id"], d.error_class, d.attempts) for d in dead] == [
        ("o2", "MissingEntry", 1),
        ("o4", "MissingEntry", 1),
    ]
    assert "no row for customer_id='c9' in table memory" in dead[0].error_message
    assert counts == Counter({"enriched": 2, "missing": 2})


def test_missing_rows_can_be_dropped_or_defaulted() -> None:
    table = MemoryTable(CUSTOMERS)
    dropping = enrich(
        "customer", table, on="customer_id", input=ORDER, output=ENRICHED,
        merge=Merge.fields("tier"), missing="drop",
    )  # fmt: skip
    driver = run(dropping, order("o1", "c1"), order("o2", "c9"))
    assert [o["id"] for o in driver.outputs()] == ["o1"]
    assert driver.stats["customer"].filtered == 1 and not driver.dead_letters()

    defaulting = enrich(
        "customer", table, on="customer_id", input=ORDER, output=ENRICHED,
        merge=Merge.fields("tier", customer_name="name"),
        missing=Missing.default({"name": "unknown", "tier": "basic"}),
    )  # fmt: skip
    out = by_id(run(defaulting, order("o1", "c1"), order("o2", "c9")).outputs())
    assert (out["o2"]["customer_name"], out["o2"]["tier"]) == ("unknown", "basic")
    assert out["o1"]["tier"] == "gold"


def test_nested_and_custom_merges() -> None:
    nested = enrich(
        "customer", MemoryTable(CUSTOMERS), on="customer_id", input=ORDER, output=NESTED,
        merge=Merge.nested("customer"),
    )  # fmt: skip
    [out] = run(nested, order("o1", "c2")).outputs()
    assert out["customer"] == CUSTOMERS["c2"]

    table = MemoryTable({"C1": CUSTOMERS["c1"]})
    custom = enrich(
        "customer", table, on=lambda o: o["customer_id"].upper(), input=ORDER, output=ENRICHED,
        merge=Merge.using(lambda o, row: {**o, "customer_name": row["name"].lower()}),
    )  # fmt: skip
    [out] = run(custom, order("o1", "c1")).outputs()
    assert out["customer_name"] == "ada"


def test_table_updates_reach_later_lookups() -> None:
    table = MemoryTable(CUSTOMERS)
    stage = enrich(
        "customer", table, on="customer_id", input=ORDER, output=ENRICHED,
        merge=Merge.fields("tier"),
    )  # fmt: skip
    driver = TestDriver(Pipeline("shop", source="shop.in", key="id", schemas=SCHEMAS) | stage)
    driver.send(order("o1", "c1"))
    driver.run()
    table.put("c1", {**CUSTOMERS["c1"], "tier": "platinum"})
    table.delete("c2")
    driver.send(order("o2", "c1"))
    driver.send(order("o3", "c2"))
    driver.run()
    assert {o["id"]: o["tier"] for o in driver.outputs()} == {"o1": "gold", "o2": "platinum"}
    assert [d.value["id"] for d in driver.dead_letters()] == ["o3"]


async def test_first_lookup_waits_until_the_table_is_ready() -> None:
    table = MemoryTable(CUSTOMERS, ready=False)
    stage = enrich(
        "customer", table, on="customer_id", input=ORDER, output=ENRICHED,
        merge=Merge.fields("tier"),
    )  # fmt: skip
    driver = TestDriver(Pipeline("shop", source="shop.in", key="id", schemas=SCHEMAS) | stage)
    driver.send(order("o1", "c1"))
    running = asyncio.create_task(driver.drain())
    await asyncio.sleep(0.2)
    assert not running.done() and driver.outputs() == []  # held back: the table is loading
    table.mark_ready()
    await asyncio.wait_for(running, 5)
    assert [o["tier"] for o in driver.outputs()] == ["gold"]


def test_a_table_that_never_loads_is_retried_then_dead_lettered() -> None:
    stage = enrich(
        "customer", MemoryTable(CUSTOMERS, ready=False), on="customer_id", input=ORDER,
        output=ENRICHED, merge=Merge.fields("tier"), ready_timeout=0.05,
        retry=RetryPolicy(max_attempts=2, jitter=0),
    )  # fmt: skip
    driver = run(stage, order("o1", "c1"))
    [dead] = driver.dead_letters()
    assert (dead.error_class, dead.attempts) == ("TableUnavailable", 2)
    assert "not ready within 0.05s" in dead.error_message


async def test_kafka_table_reports_an_unreachable_broker() -> None:
    table = KafkaTable("127.0.0.1:1", "customers")
    assert isinstance(table, Table) and not table.ready
    with pytest.raises(TableUnavailable, match="not loaded"):
        table.get("c1")
    with pytest.raises(BrokerUnavailableError, match="loading table customers: no Kafka broker"):
        await asyncio.wait_for(table.wait_ready(), 30)
    with pytest.raises(TableUnavailable, match="stopped following customers"):
        table.get("c1")
    await table.stop()


def test_bad_definitions_are_refused() -> None:
    table = MemoryTable()
    base: dict[str, Any] = {
        "on": "customer_id", "input": ORDER, "output": ENRICHED, "merge": Merge.fields("tier"),
    }  # fmt: skip
    with pytest.raises(DefinitionError, match="is not a table"):
        enrich("e", {"c1": {}}, **base)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="merge must be a Merge"):
        enrich("e", table, **{**base, "merge": lambda o, r: o})
    with pytest.raises(DefinitionError, match="missing='ignore' is not"):
        enrich("e", table, **{**base, "missing": "ignore"})
    with pytest.raises(DefinitionError, match="field '' must be"):
        enrich("e", table, **{**base, "on": ""})
    with pytest.raises(DefinitionError, match="ready_timeout must be > 0"):
        enrich("e", table, **{**base, "ready_timeout": 0})
    with pytest.raises(DefinitionError, match="at least one field"):
        Merge.fields()
    with pytest.raises(DefinitionError, match="not None"):
        Missing.default(None)
    with pytest.raises(ConfigError, match="bootstrap address and a topic"):
        KafkaTable("", "customers")


async def test_the_setup_loads_the_table_before_the_stage_consumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = MemoryTable(CUSTOMERS, ready=False)
    stage = enrich(
        "customer", table, on="customer_id", input=ORDER, output=ENRICHED,
        merge=Merge.fields("tier"), ready_timeout=0.3,
    )  # fmt: skip
    assert stage.setup is not None
    asyncio.get_running_loop().call_later(0.1, table.mark_ready)
    async with stage.setup():  # the worker enters it before it joins its group
        assert table.ready
    # A table that does not load in time: the stage starts anyway (each record waits for it
    # and is retried, then dead-lettered, as above), and says so.
    never = enrich(
        "customer", MemoryTable(CUSTOMERS, ready=False), on="customer_id", input=ORDER,
        output=ENRICHED, merge=Merge.fields("tier"), ready_timeout=0.05,
    )  # fmt: skip
    assert never.setup is not None
    async with asyncio.timeout(5), never.setup():
        pass
    assert "table memory not loaded before consuming" in caplog.text
