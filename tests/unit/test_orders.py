"""The orders example: business rules, and the whole pipeline on the in-memory TestDriver."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from examples.orders import domain
from examples.orders.pipeline import (
    CONFIRMATION,
    ORDER_PLACED,
    SCHEMAS,
    STAGES,
    build,
    customer_table,
    pipeline,
)
from examples.orders.report import Check, Outcome, StageResult, checks, passed
from examples.orders.workload import Expected, Faults, Workload
from pipeline import Codec, Pipeline, SchemaStore
from pipeline.compat import check_compatible
from pipeline.testing import TestDriver
from stages import MemoryTable, Table, TableUnavailable

GOLD_DE = next(
    c for c in domain.customers().values() if c["tier"] == "GOLD" and c["country"] == "DE"
)
STANDARD_US = next(
    c for c in domain.customers().values() if c["tier"] == "STANDARD" and c["country"] == "US"
)


def order(**changes: Any) -> dict[str, Any]:
    """A valid OrderPlaced of a standard US customer, shipped home: 2 x 10.00 + 1 x 5.50."""
    base: dict[str, Any] = {
        "order_id": "o-1",
        "customer_id": STANDARD_US["customer_id"],
        "items": [
            {"sku": "SKU-0001", "quantity": 2, "unit_price_cents": 1000},
            {"sku": "SKU-0002", "quantity": 1, "unit_price_cents": 550},
        ],
        "currency": "USD",
        "ship_to_country": "US",
        "coupon": None,
        "channel": "web",
        "placed_at": 1_700_000_000_000,
    }
    return {**base, **changes}


def in_memory() -> Pipeline:
    """The orders pipeline with its customer table in memory (same rows as the topic's)."""
    rows: dict[str | bytes, Any] = {k: v for k, v in domain.customers().items()}  # noqa: C416
    return build(customers=MemoryTable(rows))  # (MemoryTable wants str | bytes keys)


def priced(value: dict[str, Any], customer: dict[str, Any]) -> dict[str, Any]:
    enriched = {**domain.check_order(value), "customer": customer}
    return {**enriched, "price": domain.price_order(enriched)}


# -- validation -----------------------------------------------------------------------------


def test_validate_normalises_codes() -> None:
    valid = domain.check_order(order(currency=" usd", ship_to_country="us", coupon="save5"))
    assert (valid["currency"], valid["ship_to_country"], valid["coupon"]) == ("USD", "US", "SAVE5")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"items": []}, "no lines"),
        ({"items": [{"sku": "S", "quantity": 0, "unit_price_cents": 100}]}, "quantity 0"),
        ({"items": [{"sku": "S", "quantity": 1, "unit_price_cents": -5}]}, "unit price -5"),
        ({"currency": "XBT"}, "currency 'XBT'"),
        ({"ship_to_country": "ZZ"}, "country 'ZZ'"),
        ({"coupon": "FREESTUFF"}, "coupon 'FREESTUFF'"),
        ({"customer_id": "alice"}, "customer_id 'alice'"),
        ({"order_id": " "}, "order_id is empty"),
    ],
)
def test_validate_rejects_broken_orders(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(domain.InvalidOrderError, match=reason) as info:
        domain.check_order(order(**changes))
    assert info.value.retriable is False  # dead-lettered at once, never retried


# -- pricing --------------------------------------------------------------------------------


def test_price_without_discount_or_tax() -> None:
    assert priced(order(), STANDARD_US)["price"] == {
        "subtotal_cents": 2550, "discount_cents": 0, "tax_rate_bp": 0, "tax_cents": 0,
        "total_cents": 2550,
    }  # fmt: skip


def test_gold_tier_and_percent_coupon_add_up_then_tax_on_the_rest() -> None:
    value = order(customer_id=GOLD_DE["customer_id"], currency="EUR", ship_to_country="DE")
    price = priced({**value, "coupon": "TENOFF"}, GOLD_DE)["price"]
    # 10 % tier + 10 % coupon of 25.50 = 5.10; tax 19 % of 20.40 = 3.876 -> 3.88
    assert price == {
        "subtotal_cents": 2550, "discount_cents": 510, "tax_rate_bp": 1900, "tax_cents": 388,
        "total_cents": 2428,
    }  # fmt: skip


def test_fixed_coupon_never_takes_more_than_the_subtotal() -> None:
    cheap = order(items=[{"sku": "S", "quantity": 1, "unit_price_cents": 299}], coupon="SAVE5")
    price = priced(cheap, STANDARD_US)["price"]
    assert (price["discount_cents"], price["total_cents"]) == (299, 0)


def test_tax_rounds_half_up_at_the_cent() -> None:
    value = order(items=[{"sku": "S", "quantity": 1, "unit_price_cents": 250}], currency="EUR")
    price = priced({**value, "ship_to_country": "DE"}, STANDARD_US)["price"]
    assert price["tax_cents"] == 48  # 19 % of 2.50 = 0.475


# -- fraud ----------------------------------------------------------------------------------


def test_fraud_rules_add_points_and_flag_at_the_threshold() -> None:
    small = priced(order(), STANDARD_US)
    assert domain.score_order(small) == {"score": 0, "reasons": []}
    big = order(items=[{"sku": "S", "quantity": 1, "unit_price_cents": 200_000}])
    abroad = priced({**big, "ship_to_country": "DE", "currency": "EUR"}, STANDARD_US)
    score = domain.score_order(abroad)
    assert score == {"score": 80, "reasons": ["high_value", "foreign_shipping"]}
    assert domain.is_flagged(score)
    bulk = priced(order(items=[{"sku": "S", "quantity": 12, "unit_price_cents": 100}]), STANDARD_US)
    assert domain.score_order(bulk)["score"] == 25
    assert not domain.is_flagged(domain.score_order(bulk))


# -- the pipeline on the TestDriver ---------------------------------------------------------


def test_pipeline_confirms_filters_and_dead_letters() -> None:
    driver = TestDriver(in_memory())
    driver.send(order(order_id="o-ok"), seq=1, event_id=b"e-ok")
    driver.send(order(order_id="o-ok"), seq=1, event_id=b"e-ok")  # a retransmission
    driver.send(order(order_id="o-bad", items=[]), seq=1)
    driver.send(order(order_id="o-who", customer_id="c-9999"), seq=1)
    fraudster = order(
        order_id="o-fraud",
        items=[{"sku": "S", "quantity": 1, "unit_price_cents": 600_000}],
    )
    driver.send(fraudster, seq=1)
    driver.send_raw(b"o-poison", b'{"order_id": "o-poison"}')
    stats = driver.run()

    [confirmation] = driver.outputs()
    assert confirmation["order_id"] == "o-ok"
    assert confirmation["email"] == STANDARD_US["email"]
    assert confirmation["total_cents"] == 2550
    assert "25.50 USD" in confirmation["body"]
    assert confirmation["confirmed_at"] >= confirmation["placed_at"]

    dead = {(d.stage, d.key, d.error_class) for d in driver.dead_letters()}
    assert dead == {
        ("validate", b"o-bad", "InvalidOrderError"),
        ("validate", b"o-poison", "DecodeError"),
        ("enrich", b"o-who", "MissingEntry"),
    }
    assert all(d.attempts <= 1 for d in driver.dead_letters())
    assert driver.clock.waits == []  # business-rule failures are never retried
    [unknown] = driver.dead_letters("enrich")
    assert unknown.value is not None  # dead letters keep the original, decodable bytes
    assert unknown.value["customer_id"] == "c-9999"
    assert stats["validate"].duplicates == 1
    assert stats["fraud"].filtered == 1
    for s in stats.values():
        assert s.consumed == s.processed + s.filtered + s.duplicates + s.dead_letters


def test_generated_workload_meets_its_expectations_in_memory() -> None:
    codec = pipeline.schemas.codec(ORDER_PLACED)
    work = Workload(600, codec, seed=3, faults=Faults(duplicates=0.05, undecodable=0.02))
    driver = TestDriver(in_memory())
    for event in work.events():
        if event.value is None:
            driver.send_raw(event.key, event.raw)
        else:
            driver.send(event.value, seq=event.seq, event_id=event.event_id)
    stats = driver.run(timeout=60)
    exp = work.expected
    assert exp.published == 600 == exp.orders + exp.duplicates + exp.undecodable
    assert exp.orders == exp.invalid + exp.unknown_customer + exp.flagged + exp.confirmed
    assert exp.duplicates and exp.undecodable and exp.flagged
    assert stats["validate"].duplicates == exp.duplicates
    assert stats["validate"].dead_by_error == {
        "DecodeError": exp.undecodable, "InvalidOrderError": exp.invalid,
    }  # fmt: skip
    assert stats["enrich"].dead_by_error.get("MissingEntry", 0) == exp.unknown_customer
    assert stats["fraud"].filtered == exp.flagged
    assert len(driver.outputs()) == exp.confirmed


# -- schemas --------------------------------------------------------------------------------


def test_topology_and_names() -> None:
    assert [n.name for n in pipeline.nodes()] == list(STAGES)
    assert pipeline.source == "orders.placed"
    assert pipeline.sink_topic == "orders.outbox"
    assert build("shop").sink_topic == "shop.outbox"
    table = customer_table("orders", pipeline.schemas)
    assert isinstance(table, Table)
    assert (table.name, table.ready) == ("orders.customers", False)
    with pytest.raises(TableUnavailable):  # no lookups before the topic is loaded
        table.get("c-0001")


def test_old_writers_are_readable_thanks_to_defaults() -> None:
    """v1 of OrderPlaced had no 'channel', v1 of Confirmation no 'locale'."""
    store = SchemaStore.from_directory(SCHEMAS)
    cases = ((ORDER_PLACED, "channel", "web", order()), (CONFIRMATION, "locale", "en", None))
    for name, added, default, value in cases:
        current = store.get(name)
        old_raw = copy.deepcopy(current.raw)
        old_raw["fields"] = [f for f in old_raw["fields"] if f["name"] != added]
        old = store.add(old_raw)  # the v1 writer, known to the store by its fingerprint
        check_compatible(old, current, writer_label="v1", reader_label="v2")
        v1_value = dict(value or _confirmation())
        del v1_value[added]
        data = Codec(old, store).encode(v1_value)
        assert Codec(current, store).decode(data)[added] == default


def _confirmation() -> dict[str, Any]:
    scored = {**priced(order(), STANDARD_US), "fraud": {"score": 0, "reasons": []}}
    return domain.confirmation(scored, confirmed_at=1_700_000_000_500)


# -- the demo's verdict ---------------------------------------------------------------------


def _result(name: str, consumed: int, produced: int, **counts: Any) -> StageResult:
    stats = {"consumed": consumed, "produced": produced, "processed": produced, **counts}
    dead = counts.get("dead_letters", 0)
    return StageResult(name, stats, arrived=consumed, written=produced, dead_written=dead,
                       exit_code=0)  # fmt: skip


def test_checks_pass_when_everything_is_accounted_for_and_fail_otherwise() -> None:
    stages = [
        _result("validate", 10, 8, duplicates=1, dead_letters=1, dead_by_error={"DecodeError": 1}),
        _result("enrich", 8, 8),
        _result("price", 8, 8),
        _result("fraud", 8, 7, filtered=1),
        _result("notify", 7, 7),
    ]
    expected = Expected(published=10, orders=9, duplicates=1, undecodable=1, flagged=1,
                        confirmed=7)  # fmt: skip
    outcome = Outcome(10, 1.0, 1.0, stages, outbox=7, outbox_distinct=7, expected=expected)
    assert passed(checks(outcome))
    outcome.outbox = outcome.outbox_distinct = 6  # a confirmation went missing
    failed = [c.name for c in checks(outcome) if c.ok is False]
    assert "pipeline: published = outbox + filtered + duplicates + dead letters" in failed
    assert not passed([Check("x", False, "")])
