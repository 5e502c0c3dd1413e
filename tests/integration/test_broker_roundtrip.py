"""The ground everything stands on: a real broker keeps every keyed record once, in order."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.testing import Names

RECORDS = 10_000
KEYS = 100
PARTITIONS = 3


async def test_keyed_records_arrive_once_and_in_order(kafka_bootstrap: str, names: Names) -> None:
    topic = names.topic("roundtrip")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all", linger_ms=5
    )
    await producer.start()
    try:
        futures = []
        for i in range(RECORDS):
            key, seq = i % KEYS, i // KEYS
            futures.append(
                await producer.send(topic, f"{key}:{seq}".encode(), key=f"k{key}".encode())
            )
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    assert {m.partition for m in metadata} == set(range(PARTITIONS)), "keys spread over partitions"

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=names.group(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: dict[str, list[int]] = defaultdict(list)
    partition_of: dict[str, set[int]] = defaultdict(set)
    received = 0
    try:
        async with asyncio.timeout(60):
            while received < RECORDS:
                batches = await consumer.getmany(timeout_ms=1000)
                for tp, records in batches.items():
                    for r in records:
                        assert r.key is not None and r.value is not None
                        key, seq = r.value.decode().split(":")
                        assert r.key.decode() == f"k{key}"
                        seen[key].append(int(seq))
                        partition_of[key].add(tp.partition)
                        received += 1
                await consumer.commit()
        # Nothing more than the 10,000 records: an extra fetch must come back empty.
        extra = await consumer.getmany(timeout_ms=1000)
        assert sum(len(v) for v in extra.values()) == 0
    finally:
        await consumer.stop()

    assert received == RECORDS
    assert len(seen) == KEYS
    for key, seqs in seen.items():
        assert seqs == list(range(RECORDS // KEYS)), f"key {key} lost, duplicated or reordered"
        assert len(partition_of[key]) == 1, f"key {key} spread over partitions"
