"""The order workflow as a pipeline: five stages, each its own process in production.

::

    orders.placed --validate--> orders.validate --enrich--> orders.enrich --price--> orders.price
        --fraud--> orders.fraud --notify--> orders.outbox

Run it by hand (the demo, ``python -m examples.orders.demo``, does all of this)::

    pipeline topics create examples.orders.pipeline:pipeline
    python -m examples.orders.customers                  # the customer table's topic
    pipeline run examples.orders.pipeline:pipeline --stage validate   # one per stage;
    # N copies of a stage are N competing consumers

What happens to records that do not become confirmations:

- undecodable bytes: dead-lettered by ``validate`` (``DecodeError``), bytes untouched;
- orders breaking a business rule: dead-lettered by ``validate`` (``InvalidOrderError``),
  at once, without retries (a retry cannot fix the data; fix and replay);
- orders of customers missing from the table: dead-lettered by ``enrich``
  (``MissingEntry``, the reusable enrich stage's error);
- retransmissions (same order, same sequence number): dropped and counted by ``validate``'s
  dedup table;
- orders with a fraud score of 70 or more: filtered out by ``fraud`` (held for review; a
  deliberate, counted filter-out, not an error).

``enrich`` is the reusable :func:`stages.enrich` stage joining against the customer table, a
:class:`stages.KafkaTable` loaded from the compacted topic ``orders.customers`` (see
:mod:`examples.orders.customers`, which also seeds it); the other stages are plain functions
over :mod:`examples.orders.domain`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from examples.orders import domain
from examples.orders.customers import CustomerTable, customer_topic
from pipeline import Pipeline, SchemaStore, Stage, TopicPolicy, stage
from stages import Merge, Table, enrich

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
NAMESPACE = "com.example.orders"
ORDER_PLACED = f"{NAMESPACE}.OrderPlaced"
VALID_ORDER = f"{NAMESPACE}.ValidOrder"
ENRICHED_ORDER = f"{NAMESPACE}.EnrichedOrder"
PRICED_ORDER = f"{NAMESPACE}.PricedOrder"
SCORED_ORDER = f"{NAMESPACE}.ScoredOrder"
CONFIRMATION = f"{NAMESPACE}.Confirmation"
CUSTOMER = f"{NAMESPACE}.Customer"
STAGES = ("validate", "enrich", "price", "fraud", "notify")

Order = dict[str, Any]


@stage(input=ORDER_PLACED, output=VALID_ORDER)
def validate(order: Order) -> Order:
    """Check the business rules; normalise currency, country and coupon codes."""
    return domain.check_order(order)


def enrich_customer(customers: Table) -> Stage:
    """Join the order with its customer row (nested as ``customer``); an order whose
    customer is not in the table is dead-lettered (``MissingEntry``)."""
    return enrich(
        "enrich", customers, on="customer_id", input=VALID_ORDER, output=ENRICHED_ORDER,
        merge=Merge.nested("customer"),
    )  # fmt: skip


@stage(input=ENRICHED_ORDER, output=PRICED_ORDER)
def price(order: Order) -> Order:
    """Compute subtotal, tier and coupon discount, tax and total."""
    return {**order, "price": domain.price_order(order)}


@stage(input=PRICED_ORDER, output=SCORED_ORDER)
def fraud(order: Order) -> Order | None:
    """Score the order; hold (filter out) those at or above the threshold."""
    score = domain.score_order(order)
    if domain.is_flagged(score):
        return None
    return {**order, "fraud": score}


@stage(input=SCORED_ORDER, output=CONFIRMATION)
def notify(order: Order) -> Order:
    """Write the confirmation to the outbox, stamped with the time it was made."""
    return domain.confirmation(order, confirmed_at=time.time_ns() // 1_000_000)


def build(
    name: str = "orders",
    *,
    partitions: int = 3,
    schemas: Path = SCHEMAS,
    customers: Table | None = None,
    check: Stage = validate,
) -> Pipeline:
    """The orders pipeline named ``name``; its input is ``NAME.placed``, its output
    (notify's) is the outbox ``NAME.outbox``.

    Args:
        name: Pipeline name, the prefix of its topics and groups.
        partitions: Partitions of each topic.
        schemas: Directory of the ``.avsc`` files.
        customers: The customer table (default: :func:`customer_table` of ``name``); tests
            pass a ``stages.MemoryTable``.
        check: The first stage (default :func:`validate`); a test deploys a fixed one.

    Example:
        >>> [n.output_topic for n in build().nodes()][-2:]
        ['orders.fraud', 'orders.outbox']
    """
    store = SchemaStore.from_directory(schemas)
    table = customers if customers is not None else customer_table(name, store)
    return (
        Pipeline(
            name,
            source=f"{name}.placed",
            key="order_id",
            schemas=store,
            topics=TopicPolicy(partitions=partitions),
        )
        | check
        | enrich_customer(table)
        | price
        | fraud
    ).then(notify, output_topic=f"{name}.outbox")


def customer_table(name: str, store: SchemaStore) -> CustomerTable:
    """The customer table of pipeline ``name``: the compacted topic ``NAME.customers``."""
    return CustomerTable(customer_topic(name), decode=store.codec(CUSTOMER).decode)


#: ``pipeline run examples.orders.pipeline:pipeline --stage NAME``
pipeline = build()

#: The same pipeline, tracking jobs: ``pipeline jobs submit examples.orders.pipeline:tracked``
#: (each stage also reports the records that carry a job id; the others cost nothing more).
tracked = pipeline.with_jobs()
