"""The README's main job: run on a real local Kafka broker and print what happened.

For now it proves the ground: it starts (or finds) a broker, creates a 3-partition topic,
publishes keyed records with an idempotent producer and reads them back with a consumer group.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from rich.console import Console
from rich.table import Table

from pipeline.broker import open_broker
from pipeline.config import Settings

RECORDS = 20_000
KEYS = 500


async def roundtrip(bootstrap: str) -> Table:
    topic = f"demo-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    t0 = time.perf_counter()
    try:
        futures = [
            await producer.send(topic, f"{i}".encode(), key=f"order-{i % KEYS}".encode())
            for i in range(RECORDS)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    produced_s = time.perf_counter() - t0
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"{topic}-g", auto_offset_reset="earliest"
    )
    await consumer.start()
    received = 0
    t1 = time.perf_counter()
    try:
        while received < RECORDS:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                received += len(records)
    finally:
        await consumer.stop()
    consumed_s = time.perf_counter() - t1
    table = Table(title=f"round trip over topic {topic} (3 partitions, {KEYS} keys)")
    for col in ("step", "records", "seconds", "records/s"):
        table.add_column(col, justify="right")
    table.add_row("publish", str(RECORDS), f"{produced_s:.2f}", f"{RECORDS / produced_s:,.0f}")
    table.add_row("consume", str(received), f"{consumed_s:.2f}", f"{received / consumed_s:,.0f}")
    return table


def main() -> None:
    console = Console()
    console.print("Starting a local Apache Kafka broker ...")
    with open_broker(Settings()) as broker:
        console.print(f"broker: {broker.bootstrap} ({broker.source})")
        console.print(asyncio.run(roundtrip(broker.bootstrap)))


if __name__ == "__main__":
    main()
