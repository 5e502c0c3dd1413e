"""Benchmark ``publisher``: the framework's :class:`~pipeline.Publisher` against a hand-written
aiokafka producer sending the same records with the same acks and idempotence.

Both send the bench's ~200-byte orders to a topic of ``partitions`` partitions through one
producer each (``acks=all``, idempotent, linger 5 ms, 256 KiB batches: the publisher's
settings). The baseline's records are encoded, keyed and given the same three headers
(``seq``, ``writer``, ``event-id``) *before* its clock starts; the framework validates,
encodes, stamps and partitions inside its clock. Two ways of sending, alternating, best of
``--repeat``:

- ``bulk``: ``publish_many(values)`` (durable every 5,000) against ``send()`` per record with
  the futures awaited every 5,000;
- ``concurrent``: 64 tasks each awaiting ``publish(value)`` in a loop (an application's
  request handlers; calls in flight share batches) against 64 tasks each awaiting
  ``send_and_wait`` in a loop.

``ratio`` = framework / baseline records per second for each; target >= 0.8.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from bench import common, report, workload
from pipeline.publish import Events, Publisher
from pipeline.runtime.kafka import partition_for
from pipeline.security import connection

NAME = "publisher"
MODES = ("bulk", "concurrent")
CONTENDERS = ("aiokafka", "publisher")
TASKS = 64
CHUNK = 5000


@dataclass(frozen=True, slots=True)
class Config:
    records: int = 100_000
    partitions: int = 3
    keys: int = 10_000
    repeat: int = 3
    results: Any = common.RESULTS


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    store = workload.schema_store()
    codec = store.codec(workload.ORDER)
    values = list(workload.orders(config.records, config.keys))
    load_at_start = common.load_average()
    runs: dict[str, dict[str, list[float]]] = {m: {c: [] for c in CONTENDERS} for m in MODES}
    for r in range(config.repeat):
        for mode in MODES:
            order = CONTENDERS if r % 2 == 0 else tuple(reversed(CONTENDERS))
            for name in order:
                topic = common.unique(f"pub-{mode}-{name}")
                await topics.create(topic)
                if name == "publisher":
                    seconds = await _framework(bootstrap, topic, codec, values, mode)
                else:
                    records = _prepared(codec, values, config.partitions)
                    seconds = await _baseline(bootstrap, topic, records, mode)
                written = await common.end_offsets(bootstrap, topic)
                if written != len(values):
                    raise AssertionError(f"{name} {mode}: {written} records, not {len(values)}")
                rate = len(values) / seconds
                runs[mode][name].append(rate)
                print(f"[{NAME}] {mode} {name}: {rate:,.0f} rec/s")
                await common.settle()
    best = {m: {c: round(max(v)) for c, v in by.items()} for m, by in runs.items()}
    ratios = {m: round(best[m]["publisher"] / best[m]["aiokafka"], 2) for m in MODES}
    doc = {
        "benchmark": NAME,
        "ratios": ratios,
        "targets": {f"{m}_at_least_0.8x": ratios[m] >= 0.8 for m in MODES},
        "conditions": {
            "records": config.records,
            "partitions": config.partitions,
            "keys": config.keys,
            "record_bytes_mean": round(common.record_bytes(store, keys=config.keys), 1),
            "tasks_concurrent": TASKS,
            "chunk_bulk": CHUNK,
            "producer": "acks=all, idempotent, linger_ms=5, max_batch_size=256 KiB (both)",
            "broker": broker,
            "repeat": config.repeat,
            "best_of": "highest records/s of the runs",
            "load_average_1_5_15min_at_start": load_at_start,
            **common.machine(),
        },
        "contenders": {"best_records_per_s": best, "runs_records_per_s": runs},
    }
    print()
    for mode in MODES:
        b = best[mode]
        print(f"{mode:11} publisher {b['publisher']:>8,} rec/s  aiokafka {b['aiokafka']:>8,} "
              f"rec/s  ratio {ratios[mode]}")  # fmt: skip
    print(f"[{NAME}] results: {report.write(NAME, doc, config.results)}")
    return doc


def _prepared(codec: Any, values: list[dict[str, Any]], partitions: int) -> list[tuple[Any, ...]]:
    """The baseline's records, made before its clock starts: what the publisher would send
    (same key, value bytes and headers, stamped by the framework's own ``Events``)."""
    events = Events(codec, workload.KEY_FIELD, writer=uuid.uuid4().bytes)
    out = []
    for value in values:
        key, data, headers = events.record(value)
        out.append((partition_for(key, partitions), key, data, list(headers)))
    return out


def _producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **connection(bootstrap).client_args(), acks="all", enable_idempotence=True,
        linger_ms=5, max_batch_size=256 * 1024,
    )  # fmt: skip


async def _baseline(bootstrap: str, topic: str, records: list[tuple[Any, ...]], mode: str) -> float:
    producer = _producer(bootstrap)
    await producer.start()
    try:
        await producer.partitions_for(topic)
        t0 = time.monotonic()
        if mode == "bulk":
            pending = []
            for part, key, data, headers in records:
                pending.append(
                    await producer.send(topic, data, key=key, partition=part, headers=headers)
                )
                if len(pending) >= CHUNK:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        else:

            async def caller(mine: list[tuple[Any, ...]]) -> None:
                for part, key, data, headers in mine:
                    await producer.send_and_wait(
                        topic, data, key=key, partition=part, headers=headers
                    )

            await asyncio.gather(*(caller(records[i::TASKS]) for i in range(TASKS)))
        return time.monotonic() - t0
    finally:
        await producer.stop()


async def _framework(
    bootstrap: str, topic: str, codec: Any, values: list[dict[str, Any]], mode: str
) -> float:
    async with Publisher(bootstrap, topic, codec, workload.KEY_FIELD, batch_records=CHUNK) as pub:
        t0 = time.monotonic()
        if mode == "bulk":
            await pub.publish_many(values)
        else:

            async def caller(mine: list[dict[str, Any]]) -> None:
                for value in mine:
                    await pub.publish(value)

            await asyncio.gather(*(caller(values[i::TASKS]) for i in range(TASKS)))
        return time.monotonic() - t0
