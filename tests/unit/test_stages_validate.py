"""stages.validate on the TestDriver: rules, dead letters, the rejected stream, counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import DefinitionError, Pipeline, SchemaStore
from pipeline.testing import TestDriver
from stages import (
    FAILED_HEADER,
    ROUTE_HEADER,
    Rule,
    ValidationFailed,
    branch,
    take_route,
    validate,
)

SCHEMAS = SchemaStore.from_directory(Path(__file__).parent / "schemas_stages")
ORDER = "stages.test.Order"

RULES = [
    Rule("total is positive", lambda o: o["total"] > 0, "total must be > 0"),
    Rule("currency known", lambda o: o["currency"] in {"EUR", "USD"}),
    Rule("has skus", lambda o: len(o["skus"]) > 0),
]


def order(oid: str, total: float = 10.0, currency: str = "EUR", skus: int = 1) -> dict[str, Any]:
    return {"id": oid, "total": total, "currency": currency, "skus": ["s"] * skus}


def pipeline(*stages: Any) -> Pipeline:
    p = Pipeline("shop", source="shop.in", key="id", schemas=SCHEMAS)
    for s in stages:
        p = p | s
    return p


def test_invalid_records_are_dead_lettered_with_every_failed_rule() -> None:
    counts: Counter[str] = Counter()
    driver = TestDriver(pipeline(validate("check", schema=ORDER, rules=RULES, counts=counts)))
    driver.send(order("o1"))
    driver.send(order("o2", total=-5, currency="GBP"))
    driver.send(order("o3", skus=0))
    driver.send(order("o4", total=3))
    stats = driver.run()["check"]
    assert [o["id"] for o in sorted(driver.outputs(), key=lambda o: o["id"])] == ["o1", "o4"]
    dead = sorted(driver.dead_letters("check"), key=lambda d: d.value["id"])
    assert [d.value["id"] for d in dead] == ["o2", "o3"]
    assert {d.error_class for d in dead} == {"ValidationFailed"}
    assert [d.attempts for d in dead] == [1, 1]  # not retriable: no retry waits
    assert driver.clock.waits == []
    assert "total is positive (total must be > 0)" in dead[0].error_message
    assert "currency known (currency known does not hold)" in dead[0].error_message
    assert "has skus" not in dead[0].error_message
    assert "failed 1 rule(s): has skus" in dead[1].error_message
    assert (stats.processed, stats.dead_letters) == (2, 2)
    assert stats.dead_by_error["ValidationFailed"] == 2
    assert counts == Counter(
        {
            "valid": 2,
            "invalid": 2,
            "failed:total is positive": 1,
            "failed:currency known": 1,
            "failed:has skus": 1,
        }
    )


def test_a_rule_that_raises_fails_with_the_error_in_the_message() -> None:
    rules = [Rule("customer is vip", lambda o: o["customer_id"].startswith("vip"))]
    driver = TestDriver(pipeline(validate("check", schema=ORDER, rules=rules)))
    driver.send({**order("o1"), "customer_id": None})
    driver.send({**order("o2"), "customer_id": "vip-1"})
    driver.run()
    assert [o["id"] for o in driver.outputs()] == ["o2"]
    [dead] = driver.dead_letters()
    assert "customer is vip raised AttributeError" in dead.error_message


def test_rejected_stream_routes_instead_of_dead_lettering() -> None:
    check = validate("check", schema=ORDER, rules=RULES, rejected="rejected")
    main = pipeline(check, take_route("valid", schema=ORDER))
    rejected = branch(main, "check", "rejected")
    assert rejected.source == "shop.check" and rejected.sink_topic == "shop.check.rejected"
    driver = TestDriver(main)
    for i, total in enumerate([5.0, -1.0, 7.0, 0.0]):
        driver.send(order(f"o{i}", total=total))
    driver.run()
    assert driver.dead_letters() == []
    tagged = driver.records("shop.check")
    assert sorted(r.header(ROUTE_HEADER) for r in tagged) == [b"rejected"] * 2 + [b"valid"] * 2
    assert sorted(o["id"] for o in driver.outputs()) == ["o0", "o2"]
    # The rejected branch reads the same tagged topic and keeps the others, with the reasons.
    side = TestDriver(rejected)
    for r in tagged:
        side.broker.produce(r.topic, r.key, r.value, r.headers, partition=r.partition)
    side.run()
    kept = side.records("shop.check.rejected")
    assert sorted(side.outputs(), key=lambda o: o["id"]) == [
        order("o1", total=-1.0) | {"customer_id": None, "country": "DE"},
        order("o3", total=0.0) | {"customer_id": None, "country": "DE"},
    ]
    failed = json.loads(kept[0].header(FAILED_HEADER) or b"")
    assert failed == [{"rule": "total is positive", "message": "total must be > 0"}]
    assert side.stats["take"].filtered == 2


def test_validation_failed_carries_the_rule_names() -> None:
    s = validate("check", schema=ORDER, rules=RULES)
    with pytest.raises(ValidationFailed) as info:
        s(order("o", total=-1, skus=0))
    assert info.value.rules == ("total is positive", "has skus")
    assert info.value.retriable is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rules": []}, "at least one Rule"),
        ({"rules": [Rule("a", bool), Rule("a", bool)]}, "two rules are named 'a'"),
        ({"rules": [lambda o: True]}, "is not a Rule"),
        ({"rules": RULES, "rejected": "bad name"}, "rejected route 'bad name' is not valid"),
        ({"rules": RULES, "rejected": "valid"}, "valid and rejected routes are equal"),
    ],
)
def test_bad_definitions_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        validate("check", schema=ORDER, **kwargs)


def test_bad_rules_are_refused() -> None:
    with pytest.raises(DefinitionError, match="non-empty"):
        Rule(" ", bool)
    with pytest.raises(DefinitionError, match="callable"):
        Rule("x", "not a function")  # type: ignore[arg-type]


def test_unknown_schema_is_refused_when_composed() -> None:
    with pytest.raises(DefinitionError, match=r"stages\.test\.Nope"):
        pipeline(validate("check", schema="stages.test.Nope", rules=RULES))


def test_dead_letter_mode_does_not_route() -> None:
    main = pipeline(validate("check", schema=ORDER, rules=RULES))
    with pytest.raises(DefinitionError, match="does not route"):
        branch(main, "check", "rejected")
