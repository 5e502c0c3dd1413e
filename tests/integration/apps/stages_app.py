"""A pipeline of reusable stages, run by ``pipeline run`` in a child process.

Environment (read here, by the test app, not by the framework):
``STAGES_PIPELINE`` (name), ``STAGES_BOOTSTRAP`` (the table's broker), ``STAGES_TABLE`` (the
compacted customers topic).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline import Pipeline, SchemaStore, TopicPolicy
from stages import KafkaTable, Merge, enrich

SCHEMAS = Path(__file__).resolve().parents[2] / "unit" / "schemas_stages"
ORDER = "stages.test.Order"
CUSTOMER = "stages.test.Customer"
ENRICHED = "stages.test.CustomerOrder"


def build(name: str | None = None) -> Pipeline:
    name = name or os.environ.get("STAGES_PIPELINE", "stages")
    bootstrap = os.environ.get("STAGES_BOOTSTRAP", "127.0.0.1:9092")
    store = SchemaStore.from_directory(SCHEMAS)
    customers = KafkaTable(
        bootstrap,
        os.environ.get("STAGES_TABLE", f"{name}.customers"),
        decode=store.codec(CUSTOMER).decode,
    )
    return Pipeline(
        name, source=f"{name}.in", key="id", schemas=store, topics=TopicPolicy(3)
    ) | enrich(
        "customer",
        customers,
        on="customer_id",
        input=ORDER,
        output=ENRICHED,
        merge=Merge.fields("tier", customer_name="name"),
        concurrency=4,
    )
