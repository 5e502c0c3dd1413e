"""The pipeline DSL: naming, immutability, validation with clear messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline import (
    DefinitionError,
    Delivery,
    Pipeline,
    SchemaCompatibilityError,
    SchemaError,
    SchemaStore,
    TopicPolicy,
    stage,
)

SCHEMAS = Path(__file__).parent / "schemas_worker"
ORDER = "test.worker.Order"
PRICED = "test.worker.Priced"
REGIONAL = "test.worker.Regional"


def _same(v: Any) -> Any:
    return v


validate = stage("validate", input=ORDER, output=ORDER)(_same)
price = stage("price", input=ORDER, output=PRICED)(_same)
bill = stage("bill", input=PRICED, output=PRICED)(_same)
notify = stage("notify", input=PRICED, output=None)(_same)
regional = stage("regional", input=REGIONAL, output=REGIONAL)(_same)


@pytest.fixture(scope="module")
def store() -> SchemaStore:
    return SchemaStore.from_directory(SCHEMAS)


@pytest.fixture
def orders(store: SchemaStore) -> Pipeline:
    return Pipeline("orders", source="orders.in", key="order_id", schemas=store)


def test_default_names(orders: Pipeline) -> None:
    p = orders | validate | price | notify
    nodes = p.nodes()
    assert [(n.name, n.index) for n in nodes] == [("validate", 0), ("price", 1), ("notify", 2)]
    assert [n.input_topic for n in nodes] == ["orders.in", "orders.validate", "orders.price"]
    assert [n.output_topic for n in nodes] == ["orders.validate", "orders.price", None]
    assert [n.dlq_topic for n in nodes] == [
        "orders.validate.dlq",
        "orders.price.dlq",
        "orders.notify.dlq",
    ]
    assert [n.state_topic for n in nodes] == [
        "orders.validate.state",
        "orders.price.state",
        "orders.notify.state",
    ]
    assert [n.group for n in nodes] == ["orders.validate", "orders.price", "orders.notify"]
    assert {n.pipeline for n in nodes} == {"orders"}
    assert p.sink_topic is None
    assert (orders | validate).sink_topic == "orders.validate"


def test_overridden_names_flow_into_the_next_stage(orders: Pipeline) -> None:
    p = orders.then(
        validate, output_topic="valid", dlq_topic="bad", state_topic="seen", group="g1"
    ).then(price)
    first, second = p.nodes()
    assert (first.output_topic, first.dlq_topic, first.state_topic, first.group) == (
        "valid",
        "bad",
        "seen",
        "g1",
    )
    assert second.input_topic == "valid"  # the next stage reads the overridden topic
    assert (second.output_topic, second.group) == ("orders.price", "orders.price")


def test_operators_return_new_pipelines(orders: Pipeline) -> None:
    one = orders | validate
    two = one | price
    assert orders.stages == ()
    assert one.stages == (validate,)
    assert two.stages == (validate, price)
    assert [n.name for n in one.nodes()] == ["validate"]
    with pytest.raises(AttributeError):
        one.name = "other"  # type: ignore[misc]
    wider = two.with_topics(TopicPolicy(partitions=12))
    assert (two.topics.partitions, wider.topics.partitions) == (3, 12)
    eos = two.with_delivery("exactly_once")
    assert (two.delivery, eos.delivery) == (Delivery.AT_LEAST_ONCE, Delivery.EXACTLY_ONCE)
    assert eos.stages == two.stages


def test_schemas_from_a_directory() -> None:
    p = Pipeline("orders", source="orders.in", key="order_id", schemas=SCHEMAS) | validate
    assert p.schemas.get(ORDER).name == ORDER


def test_duplicate_stage_name(orders: Pipeline) -> None:
    again = stage("validate", input=ORDER, output=ORDER)(_same)
    with pytest.raises(DefinitionError, match="'orders' already has a stage named 'validate'"):
        orders | validate | again


def test_stage_after_a_sink(orders: Pipeline) -> None:
    with pytest.raises(DefinitionError, match="'bill' follows 'notify', which is a sink"):
        orders | price | notify | bill


def test_not_a_stage(orders: Pipeline) -> None:
    with pytest.raises(DefinitionError, match="is not a Stage"):
        orders.then(_same)  # type: ignore[arg-type]


def test_unknown_schema_names_pipeline_stage_and_schema(orders: Pipeline) -> None:
    ghost = stage("ghost", input=ORDER, output="test.worker.Nope")(_same)
    with pytest.raises(SchemaError) as info:
        orders | ghost
    message = str(info.value)
    assert "pipeline 'orders'" in message
    assert "stage 'ghost'" in message
    assert "'test.worker.Nope'" in message
    assert ORDER in message  # the known schemas are listed


def test_key_field_missing_from_the_first_input(store: SchemaStore) -> None:
    p = Pipeline("orders", source="orders.in", key="customer_id", schemas=store)
    with pytest.raises(DefinitionError) as info:
        p | validate
    message = str(info.value)
    assert "'customer_id' is not a field of test.worker.Order" in message
    assert "first stage 'validate'" in message
    assert "order_id" in message  # the fields that do exist


def test_incompatible_schemas_name_both_stages_and_the_field(orders: Pipeline) -> None:
    with pytest.raises(SchemaCompatibilityError) as info:
        orders | price | regional
    message = str(info.value)
    assert "stage 'price'" in message
    assert "stage 'regional'" in message
    assert "region" in message


def test_compatible_chain_is_accepted(orders: Pipeline) -> None:
    # price writes Priced and bill reads Priced: the pipe between them is compatible.
    assert [n.name for n in (orders | price | bill).nodes()] == ["price", "bill"]


def test_unknown_stage_name_lists_the_known_stages(orders: Pipeline) -> None:
    p = orders | validate | price
    assert p.node("price").output_topic == "orders.price"
    with pytest.raises(
        DefinitionError, match="no stage named 'prices'; its stages: validate, price"
    ):
        p.node("prices")
    with pytest.raises(DefinitionError, match="its stages: none"):
        orders.node("x")


@pytest.mark.parametrize("bad", ["exactly-once", "EXACTLY_ONCE", ""])
def test_bad_delivery_string(store: SchemaStore, bad: str) -> None:
    with pytest.raises(DefinitionError) as info:
        Pipeline("orders", source="orders.in", key="order_id", schemas=store, delivery=bad)
    message = str(info.value)
    assert "pipeline 'orders'" in message
    assert "at_least_once" in message and "exactly_once" in message


@pytest.mark.parametrize("name", ["", "has space", "a/b", "a:b"])
def test_bad_pipeline_name(store: SchemaStore, name: str) -> None:
    with pytest.raises(DefinitionError, match="pipeline name"):
        Pipeline(name, source="in", key="order_id", schemas=store)


def test_topic_policy_validation() -> None:
    with pytest.raises(DefinitionError, match="at least 1"):
        TopicPolicy(partitions=0)


def test_missing_schema_directory() -> None:
    with pytest.raises(SchemaError, match="schema directory not found"):
        Pipeline("orders", source="in", key="order_id", schemas=SCHEMAS / "nope")


def test_bad_delivery_string_in_with_delivery(orders: Pipeline) -> None:
    with pytest.raises(DefinitionError, match="exactly_once"):
        orders.with_delivery("exactly-once")


@pytest.mark.parametrize("topic", ["orders.in", "orders.validate", "orders.validate.dlq"])
def test_overridden_output_topic_may_not_collide(orders: Pipeline, topic: str) -> None:
    with pytest.raises(DefinitionError, match=topic):
        (orders | validate).then(price, output_topic=topic)
