"""The benchmark's data: the ``bench.Order`` schema, a deterministic record generator, the map
every contender applies, and a bare fastavro codec for the hand-written baselines.

Every contender runs the same :func:`transform` on the same decoded dicts, so a difference in
throughput is the cost of the machinery around it, not of the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer

from pipeline.schema import HEADER_SIZE, MAGIC, SchemaStore

SCHEMA_DIR = Path(__file__).parent / "schemas"
ORDER = "bench.Order"
KEY_FIELD = "order_id"

_STATUSES = ("NEW", "PAID", "SHIPPED", "DELIVERED", "CANCELLED")
_STREETS = ("Lindenstrasse", "Rue de Rivoli", "Baker Street", "Calle Mayor", "Via Roma")
_CITIES = ("Berlin", "Paris", "London", "Madrid", "Roma")


def schema_store() -> SchemaStore:
    """The benchmark's schemas (``bench/schemas/*.avsc``)."""
    return SchemaStore.from_directory(SCHEMA_DIR)


def order(i: int, keys: int) -> dict[str, Any]:
    """The ``i``-th input record; ``keys`` distinct order ids cycle through the stream."""
    k = i % keys
    return {
        "order_id": f"order-{k:07d}",
        "customer_id": f"customer-{(k * 7919) % 100_000:06d}",
        "sku": f"SKU-{i % 50_000:05d}-{'SML'[i % 3]}",
        "quantity": 1 + i % 9,
        "unit_price": 3.25 + (i % 1000) / 8,
        "total": 0.0,
        "currency": "EUR",
        "status": _STATUSES[i % len(_STATUSES)],
        "created_at_ms": 1_767_225_600_000 + i * 37,
        "shipping_address": (
            f"{1 + i % 250} {_STREETS[i % 5]}, {10_000 + k % 89_999} {_CITIES[k % 5]}, Europe"
        ),
        "note": None if i % 8 == 0 else "leave the parcel with the neighbour if nobody is at home",
        "tags": ["priority" if i % 10 == 0 else "standard", "web", f"campaign-{i % 12:02d}"],
        "attempt": 0,
    }


def orders(count: int, keys: int, start: int = 0) -> Iterator[dict[str, Any]]:
    """``count`` records from index ``start``."""
    return (order(i, keys) for i in range(start, start + count))


def transform(value: dict[str, Any]) -> dict[str, Any]:
    """The map every contender applies: price the order and count the attempt."""
    value["total"] = value["unit_price"] * value["quantity"]
    value["attempt"] += 1
    return value


class RawAvro:
    """Single-object Avro with fastavro and nothing else: what a hand-written loop would do.

    The header check is kept (a real consumer must not read foreign bytes as its schema);
    writer/reader resolution is skipped because the fingerprint is the reader's own.
    """

    __slots__ = ("_buffer", "_header", "_parsed")

    def __init__(self, store: SchemaStore, name: str = ORDER) -> None:
        schema = store.get(name)
        self._parsed = parse_schema(schema.raw)
        self._header = MAGIC + schema.fingerprint
        self._buffer = BytesIO(self._header)

    def decode(self, data: bytes) -> Any:
        if data[:HEADER_SIZE] != self._header:
            raise ValueError("not a bench.Order single-object record")
        stream = BytesIO(data)
        stream.seek(HEADER_SIZE)
        return schemaless_reader(stream, self._parsed, None)

    def encode(self, value: Any) -> bytes:
        buffer = self._buffer
        buffer.seek(HEADER_SIZE)
        buffer.truncate()
        schemaless_writer(buffer, self._parsed, value)
        return buffer.getvalue()

    def processor(self) -> Callable[[bytes], bytes]:
        """``bytes -> bytes``: decode, :func:`transform`, encode (for the baselines' loops)."""
        decode, encode = self.decode, self.encode

        def process(data: bytes) -> bytes:
            return encode(transform(decode(data)))

        return process
