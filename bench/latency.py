"""Benchmark ``latency``: end-to-end latency of three hops at a steady rate.

The same three-hop chain (decode, :func:`~bench.workload.transform`, encode at each hop, the
input paced at ``rate`` records/s by the framework's publisher, one record at a time as an
application sends), in one process, alternating:

- ``aiokafka_chain``: **baseline**, three hand-written at-least-once loops: ``getmany``,
  ``send`` per record (idempotent producer, acks=all), await the sends, ``commit``;
- ``stages``: a pipeline of three framework stages run by ``run_stages`` (at-least-once,
  dedup off, default batching).

Every topic stamps records with the broker's clock (``LogAppendTime``), so latency is the
broker's time of the append to the last topic minus its time of the append to the input: the
three hops, without the publisher. Reported: p50, p99 and max per contender, and
``p99_ratio`` = stages p99 / aiokafka_chain p99 (target <= 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import common, report, workload
from bench.contenders.stage import sync_price_stage
from pipeline.dsl import Pipeline, TopicPolicy
from pipeline.publish import Publisher
from pipeline.runtime.runner import RunOptions, run_stages
from pipeline.stage import stage as make_stage

NAME = "latency"
CONTENDERS = ("aiokafka_chain", "stages")
HOPS = 3
RATE, SECONDS = 1000, 10.0  # records/s, seconds of publishing per run


@dataclass(frozen=True, slots=True)
class Config:
    rate: int = RATE
    seconds: float = SECONDS
    partitions: int = 3
    keys: int = 1000
    repeat: int = 2
    results: Any = common.RESULTS


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    store = workload.schema_store()
    load_at_start = common.load_average()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    for _ in range(config.repeat):
        for name in CONTENDERS:
            found = await _one(bootstrap, name, config, store, topics)
            runs[name].append(found)
            print(f"[{NAME}] {name}: {found}")
    best = {name: min(found, key=lambda r: r["p99_ms"]) for name, found in runs.items()}
    base, ours = best["aiokafka_chain"]["p99_ms"], best["stages"]["p99_ms"]
    ratio = round(ours / base, 2) if base else None
    doc = {
        "benchmark": NAME,
        "p99_ratio": ratio,
        "targets": {"p99_at_most_2x_the_chain": None if ratio is None else ratio <= 2},
        "conditions": {
            "rate_per_s": config.rate,
            "seconds": config.seconds,
            "hops": HOPS,
            "partitions": config.partitions,
            "keys": config.keys,
            "record_bytes_mean": round(common.record_bytes(store, keys=config.keys), 1),
            "broker": broker,
            "repeat": config.repeat,
            "latency": "LogAppendTime of the last topic minus LogAppendTime of the input",
            "best_of": "lowest p99 of the runs",
            "load_average_1_5_15min_at_start": load_at_start,
            **common.machine(),
        },
        "contenders": {"best": best, "runs": runs},
    }
    print()
    for name in CONTENDERS:
        b = best[name]
        print(
            f"{name:16} p50 {b['p50_ms']:>6} ms  p99 {b['p99_ms']:>6} ms  max {b['max_ms']:>6} ms"
        )
    print(f"p99 ratio stages/aiokafka_chain: {ratio}")
    print(f"[{NAME}] results: {report.write(NAME, doc, config.results)}")
    return doc


async def _one(
    bootstrap: str, name: str, config: Config, store: Any, topics: common.Topics
) -> dict[str, Any]:
    prefix = common.unique(f"lat-{name}")
    chain = [f"{prefix}.in", *(f"{prefix}.hop{i}" for i in range(1, HOPS + 1))]
    await _create_log_append_topics(bootstrap, chain, config.partitions)
    topics.adopt(*chain)
    stop = asyncio.Event()
    work: Awaitable[Any]
    if name == "stages":
        pipeline = Pipeline(
            prefix, source=chain[0], key=workload.KEY_FIELD, schemas=store,
            topics=TopicPolicy(partitions=config.partitions),
        )  # fmt: skip
        for i in range(1, HOPS + 1):  # output topic P.S = the chain's topic
            pipeline = pipeline.then(_renamed(f"hop{i}"))
        topics.adopt(*(t for n in pipeline.nodes() for t in (n.dlq_topic, n.state_topic)))
        work = run_stages(
            pipeline, [f"hop{i}" for i in range(1, HOPS + 1)], bootstrap,
            options=RunOptions(stats_interval=1.0), stop=stop,
        )  # fmt: skip
    else:
        process = workload.RawAvro(store).processor()
        work = asyncio.gather(
            *(_hop(bootstrap, chain[i], chain[i + 1], process, stop) for i in range(HOPS))
        )
    task = asyncio.ensure_future(work)
    try:
        await asyncio.sleep(6)  # groups formed, partitions assigned: not part of the latency
        sent = await _publish(bootstrap, chain[0], store, config)
        await _wait_for(bootstrap, chain[-1], sent, 60)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)
    return await _latencies(bootstrap, chain[0], chain[-1], store)


def _renamed(name: str) -> Any:
    base = sync_price_stage()
    return make_stage(name, input=base.input, output=base.output, dedup=base.dedup)(base.fn)


async def _create_log_append_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    await admin.start()
    try:
        config = {"message.timestamp.type": "LogAppendTime"}
        await admin.create_topics([NewTopic(n, partitions, 1, topic_configs=config) for n in names])
    finally:
        await admin.close()
    for name in names:
        await common.wait_for_topic(bootstrap, name, partitions)


async def _hop(bootstrap: str, source: str, output: str, process: Any, stop: asyncio.Event) -> None:
    """One hand-written at-least-once hop, written for latency as a careful user would."""
    group = common.unique("lat-chain")
    consumer = AIOKafkaConsumer(
        source, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", fetch_max_wait_ms=100,
    )  # fmt: skip
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0
    )
    await producer.start()
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            futures = [
                await producer.send(
                    output, process(m.value), key=m.key, partition=m.partition,
                    headers=list(m.headers),
                )
                for msgs in batches.values()
                for m in msgs
            ]  # fmt: skip
            if futures:
                await asyncio.gather(*futures)
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


async def _publish(bootstrap: str, topic: str, store: Any, config: Config) -> int:
    """Publish ``rate`` records/s for ``seconds``, each sent at once (the group flush shares
    a round trip among the records that arrive meanwhile); return how many."""
    codec = store.codec(workload.ORDER)
    count = int(config.rate * config.seconds)
    async with Publisher(bootstrap, topic, codec, workload.KEY_FIELD) as pub:
        t0, sent = time.monotonic(), []
        for i, value in enumerate(workload.orders(count, config.keys)):
            sent.append(asyncio.ensure_future(pub.publish(value)))
            ahead = t0 + (i + 1) / config.rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        await asyncio.gather(*sent)
    return count


async def _wait_for(bootstrap: str, topic: str, count: int, within: float) -> None:
    deadline = time.monotonic() + within
    while await common.end_offsets(bootstrap, topic) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: fewer than {count} records after {within:.0f}s")
        await asyncio.sleep(0.2)


async def _latencies(bootstrap: str, first: str, last: str, store: Any) -> dict[str, Any]:
    codec = store.codec(workload.ORDER)

    async def stamps(topic: str) -> dict[tuple[bytes, int], int]:
        found: dict[tuple[bytes, int], int] = {}
        expected = await common.end_offsets(bootstrap, topic)
        for r in await common.read_records(bootstrap, topic, expected):
            value = codec.decode(r.value)
            found[(r.key, value["created_at_ms"])] = r.timestamp
        return found

    start, end = await stamps(first), await stamps(last)
    gaps = sorted(end[k] - start[k] for k in end if k in start)
    n = len(gaps)
    return {
        "records": n,
        "p50_ms": gaps[n // 2],
        "p99_ms": gaps[min(n - 1, int(n * 0.99))],
        "max_ms": gaps[-1],
    }
