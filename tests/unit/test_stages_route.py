"""stages.route on the TestDriver: tagging, fan-out, unmatched records, per-route branches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import DefinitionError, Pipeline, SchemaStore, TopicPolicy
from pipeline.testing import TestDriver
from stages import ROUTE_HEADER, branch, branches, route, routes_of, take_route

SCHEMAS = SchemaStore.from_directory(Path(__file__).parent / "schemas_stages")
ORDER = "stages.test.Order"
ROUTES = {
    "eu": lambda o: o["country"] in {"DE", "FR"},
    "us": lambda o: o["country"] == "US",
    "big": lambda o: o["total"] >= 100,
}


def order(oid: str, country: str, total: float = 1.0) -> dict[str, Any]:
    return {"id": oid, "country": country, "total": total}


def main(stage: Any) -> Pipeline:
    return Pipeline("shop", source="shop.in", key="id", schemas=SCHEMAS) | stage


def tags(driver: TestDriver, topic: str) -> dict[str, bytes | None]:
    codec = SCHEMAS.codec(ORDER)
    return {codec.decode(r.value)["id"]: r.header(ROUTE_HEADER) for r in driver.records(topic)}


def follow(driver: TestDriver, branch_pipeline: Pipeline) -> TestDriver:
    """Run a branch on a copy of the tagged topic the main driver wrote."""
    side = TestDriver(branch_pipeline)
    for r in driver.records(branch_pipeline.source):
        side.broker.produce(r.topic, r.key, r.value, r.headers, partition=r.partition)
    side.run()
    return side


def test_records_are_tagged_first_match_wins_and_branches_split_them() -> None:
    counts: Counter[str] = Counter()
    p = main(route("region", schema=ORDER, routes=ROUTES, default="rest", counts=counts))
    driver = TestDriver(p)
    for o in [order("a", "DE"), order("b", "US", 500), order("c", "JP", 200), order("d", "BR")]:
        driver.send(o)
    stats = driver.run()["region"]
    assert tags(driver, "shop.region") == {"a": b"eu", "b": b"us", "c": b"big", "d": b"rest"}
    assert stats.produced == 4 and stats.dead_letters == 0
    assert counts == Counter({"eu": 1, "us": 1, "big": 1, "rest": 1})
    # Keys, sequence numbers and event ids pass through unchanged.
    sent = {r.key: r.headers for r in driver.records("shop.in")}
    for r in driver.records("shop.region"):
        assert [h for h in r.headers if h[0] != ROUTE_HEADER] == list(sent[r.key])

    split = branches(p, "region", topics={"rest": "shop.unsorted"})
    assert sorted(split) == ["big", "eu", "rest", "us"]
    assert {name: b.sink_topic for name, b in split.items()} == {
        "eu": "shop.region.eu",
        "us": "shop.region.us",
        "big": "shop.region.big",
        "rest": "shop.unsorted",
    }
    for name, expected in [("eu", ["a"]), ("us", ["b"]), ("big", ["c"]), ("rest", ["d"])]:
        side = follow(driver, split[name])
        assert [o["id"] for o in side.outputs()] == expected
        assert side.stats["take"].filtered == 3


def test_fan_out_tags_every_matching_route() -> None:
    p = main(route("region", schema=ORDER, routes=ROUTES, fan_out=True, default="rest"))
    driver = TestDriver(p)
    driver.send(order("a", "DE", 150))
    driver.send(order("b", "JP"))
    driver.run()
    assert tags(driver, "shop.region") == {"a": b"eu,big", "b": b"rest"}
    assert [o["id"] for o in follow(driver, branch(p, "region", "big")).outputs()] == ["a"]
    assert [o["id"] for o in follow(driver, branch(p, "region", "eu")).outputs()] == ["a"]
    assert follow(driver, branch(p, "region", "us")).outputs() == []


def test_unmatched_records_are_dead_lettered_or_dropped() -> None:
    driver = TestDriver(main(route("region", schema=ORDER, routes=ROUTES)))
    driver.send(order("a", "JP"))
    driver.send(order("b", "FR"))
    driver.run()
    [dead] = driver.dead_letters()
    assert (dead.value["id"], dead.error_class, dead.attempts) == ("a", "Unroutable", 1)
    assert "matches none of the routes eu, us, big" in dead.error_message

    counts: Counter[str] = Counter()
    stage = route("region", schema=ORDER, routes=ROUTES, drop_unmatched=True, counts=counts)
    driver = TestDriver(main(stage))
    driver.send(order("a", "JP"))
    stats = driver.run()["region"]
    assert (stats.filtered, stats.dead_letters, counts["unmatched"]) == (1, 0, 1)


def test_a_failing_predicate_dead_letters_at_once() -> None:
    routes = {"vip": lambda o: o["customer_id"].startswith("vip")}
    driver = TestDriver(main(route("r", schema=ORDER, routes=routes, default="rest")))
    driver.send(order("a", "DE"))  # customer_id is None
    driver.run()
    [dead] = driver.dead_letters()
    assert dead.error_class == "Unroutable" and dead.attempts == 1
    assert "route 'vip' failed on this record: AttributeError" in dead.error_message


def test_take_route_inline_in_the_main_line() -> None:
    p = main(route("region", schema=ORDER, routes=ROUTES)) | take_route("eu", schema=ORDER)
    driver = TestDriver(p)
    for o in [order("a", "DE"), order("b", "US"), order("c", "FR")]:
        driver.send(o)
    driver.run()
    assert sorted(o["id"] for o in driver.outputs()) == ["a", "c"]
    assert driver.stats["take-eu"].filtered == 1


def test_branches_inherit_the_pipeline_settings() -> None:
    p = main(route("region", schema=ORDER, routes=ROUTES)).with_topics(TopicPolicy(6))
    eu = branch(p, "region", "eu").with_delivery("exactly_once")
    assert eu.name == "shop.region.eu" and eu.topics.partitions == 6
    assert [n.group for n in eu.nodes()] == ["shop.region.eu.take"]
    assert routes_of(p.node("region").stage) == ("eu", "us", "big")


def test_bad_definitions_are_refused() -> None:
    with pytest.raises(DefinitionError, match="at least one route"):
        route("r", schema=ORDER, routes={})
    with pytest.raises(DefinitionError, match="route name 'e u' is not valid"):
        route("r", schema=ORDER, routes={"e u": bool})
    with pytest.raises(DefinitionError, match="predicate of route 'eu' must be callable"):
        route("r", schema=ORDER, routes={"eu": True})  # type: ignore[dict-item]
    with pytest.raises(DefinitionError, match="default route 'eu' is also a route"):
        route("r", schema=ORDER, routes=ROUTES, default="eu")
    p = main(route("region", schema=ORDER, routes=ROUTES))
    with pytest.raises(DefinitionError, match="has no route 'asia'; its routes: eu, us, big"):
        branch(p, "region", "asia")
    with pytest.raises(DefinitionError, match="has no route asia"):
        branches(p, "region", topics={"asia": "x"})
    with pytest.raises(DefinitionError, match="no stage named 'nope'"):
        branch(p, "nope", "eu")
