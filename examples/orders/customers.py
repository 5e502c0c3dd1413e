"""The customer table: a compacted topic, loaded into each enrich process by ``stages``.

The rows (:func:`examples.orders.domain.customers`, 1,000 from a fixed seed) are written to the
compacted topic ``NAME.customers`` (key: customer id, value: an Avro ``Customer``). The enrich
stage joins against a :class:`stages.KafkaTable` on that topic: every enrich instance reads the
whole topic into memory before its first lookup and keeps following it, so a changed or new
customer reaches lookups within a fetch wait.

Seed the topic before the enrich stage runs (the demo does it for you)::

    python -m examples.orders.customers --bootstrap 127.0.0.1:9092

Which broker the table reads: :class:`CustomerTable` connects on first use, to
``PIPELINE_BOOTSTRAP`` or else the broker of ``pipeline kafka start`` (as the CLI resolves
it), because a stage function cannot see the ``--bootstrap`` option of ``pipeline run``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer

from examples.orders import domain
from pipeline import Codec, Connection
from pipeline.runtime.topics import TopicSpec, ensure_topics
from pipeline.security import Bootstrap, connection
from stages import KafkaTable, TableUnavailable


class CustomerTable:
    """A :class:`stages.KafkaTable` on ``topic`` that finds its broker on first use.

    Building it (at import of the pipeline module) does nothing; the enrich stage's first
    record starts the load. It satisfies the :class:`stages.Table` protocol.

    Args:
        topic: The compacted customers topic.
        decode: Bytes -> row (the ``Customer`` codec's decode).
        bootstrap: Bootstrap servers; by default resolved when the table is first used.

    Example:
        >>> table = CustomerTable("orders.customers", decode=lambda b: b)
        >>> table.name, table.ready
        ('orders.customers', False)
    """

    def __init__(
        self, topic: str, *, decode: Callable[[bytes], Any], bootstrap: Bootstrap | None = None
    ) -> None:
        self.topic = topic
        self._decode = decode
        self._bootstrap = bootstrap
        self._table: KafkaTable | None = None

    @property
    def name(self) -> str:
        return self.topic

    @property
    def ready(self) -> bool:
        return self._table is not None and self._table.ready

    async def wait_ready(self) -> None:
        """Connect (the first time) and wait until the whole topic is loaded."""
        if self._table is None:
            bootstrap = self._bootstrap or _default_bootstrap()
            self._table = KafkaTable(bootstrap, self.topic, decode=self._decode)
        await self._table.wait_ready()

    def get(self, key: str | bytes) -> Any:
        """The customer row of ``key``, or None."""
        if self._table is None:
            raise TableUnavailable(f"table {self.topic} is not loaded yet")
        return self._table.get(key)


def _default_bootstrap() -> Connection:
    from pipeline.cli.commands import bootstrap_address  # the CLI's own fallback chain

    return bootstrap_address(None)


def customer_topic(pipeline: str) -> str:
    """The customers topic of pipeline ``pipeline``."""
    return f"{pipeline}.customers"


def spec(topic: str, partitions: int = 3) -> TopicSpec:
    """The customers topic: compacted, so it keeps the latest row of every customer."""
    return TopicSpec(
        topic, "customer table", partitions, None,
        {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"},
    )  # fmt: skip


async def seed(bootstrap: Bootstrap, topic: str, codec: Codec) -> int:
    """Create the compacted topic if missing and write every customer row to it.

    Writing the same rows again is harmless: compaction keeps one per customer, and the
    table holds the latest anyway. Returns the number of rows written.
    """
    await ensure_topics(bootstrap, [spec(topic)])
    producer = AIOKafkaProducer(
        **connection(bootstrap).client_args(), acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        rows = domain.customers()
        sent = [
            await producer.send(topic, codec.encode(row), key=customer_id.encode())
            for customer_id, row in rows.items()
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    """``python -m examples.orders.customers``: seed the customers topic."""
    from examples.orders.pipeline import CUSTOMER, SCHEMAS
    from pipeline import SchemaStore

    parser = argparse.ArgumentParser(description="Write the example's customers to Kafka.")
    parser.add_argument("--bootstrap", help="default: PIPELINE_BOOTSTRAP or the local broker")
    parser.add_argument("--topic", default="orders.customers")
    args = parser.parse_args(argv)
    codec = SchemaStore.from_directory(SCHEMAS).codec(CUSTOMER)
    bootstrap = args.bootstrap or _default_bootstrap()
    written = asyncio.run(seed(bootstrap, args.topic, codec))
    print(f"{written} customers written to {args.topic} at {bootstrap}")


if __name__ == "__main__":
    main()
