"""The baselines: the fastest consume-process-produce-commit loop we know how to write on aiokafka.

Per fetched batch (``getmany``): process every record, build one producer batch per output
partition (``create_batch`` / ``send_batch``), await one future per batch, then ``commit()`` the
batch's offsets. Producer and consumer settings are the framework's (see
:class:`~pipeline.runtime.kafka.KafkaTransport`): acks=all, idempotence, 5 ms linger, 256 KiB
batches, 2000 records per fetch, 100 ms fetch wait.

The key is kept, so the output partition is the input partition (topics are co-partitioned);
headers and timestamps are copied through, as the framework does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench import common
from pipeline.runtime.transport import Batching


async def run_loop(
    bootstrap: str,
    *,
    label: str,
    source: str,
    target: int,
    topics: common.Topics,
    process: Callable[[bytes], bytes] | None,
    batching: Batching = Batching(),
) -> common.RunResult:
    """Consume ``source`` until the commits cover ``target`` records.

    Args:
        process: ``bytes -> bytes`` applied to each value; ``None`` copies values through.
    """
    output, group = common.unique(f"{label}-out"), common.unique(label)
    await topics.create(output)
    result = common.RunResult(label)
    probe = common.Probe(target)
    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=group,
        client_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=batching.max_records,
        fetch_max_wait_ms=batching.fetch_wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=group,
        acks="all",
        enable_idempotence=True,
        linger_ms=batching.linger_ms,
        max_batch_size=batching.max_batch_bytes,
    )
    try:
        await producer.start()
        await consumer.start()
        try:
            await _loop(consumer, producer, output, probe, process, batching)
        finally:
            await consumer.stop()
            await producer.stop()
        result.seconds = probe.seconds()
        result.records = probe.total
        result.timed_records = probe.at_end
    except Exception as exc:  # report it, let the other contenders run
        result.error = common.describe(exc)
        return result
    await common.verify(bootstrap, result, output, group, source)
    return result


async def _loop(
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    output: str,
    probe: common.Probe,
    process: Callable[[bytes], bytes] | None,
    batching: Batching,
) -> None:
    create, send = producer.create_batch, producer.send_batch
    while not probe.done.is_set():
        batches = await consumer.getmany(
            timeout_ms=batching.fetch_wait_ms, max_records=batching.max_records
        )
        if not batches:
            continue
        probe.received()
        pending: list[tuple[Any, int]] = []
        for tp, msgs in batches.items():
            builder = create()
            for msg in msgs:
                value = msg.value if process is None else process(msg.value)
                headers = list(msg.headers)
                ts = msg.timestamp
                if builder.append(key=msg.key, value=value, timestamp=ts, headers=headers) is None:
                    pending.append((builder, tp.partition))
                    builder = create()
                    builder.append(key=msg.key, value=value, timestamp=ts, headers=headers)
            pending.append((builder, tp.partition))
        futures = [await send(b, output, partition=p) for b, p in pending]
        for fut in futures:
            await fut
        offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batches.items()}
        await consumer.commit(offsets)
        probe.committed({(tp.topic, tp.partition): o for tp, o in offsets.items()})
