"""The ways ``restore`` reads a changelog back: raw client, framework transport, real worker.

Every path reads the same changelog partitions from offset 0 to their end offsets; each
returns a :class:`~bench.common.RunResult` whose ``records`` are the changelog records it saw
(``output_records`` too, so that ``verified`` compares them with the topic's record count).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import common, workload
from bench.contenders.stage import sync_price_stage
from pipeline.dsl import Pipeline, TopicPolicy
from pipeline.runtime import writers
from pipeline.runtime.kafka import BatchWriter, partition_for
from pipeline.runtime.kafka_transport import KafkaTransport
from pipeline.runtime.runner import RunOptions, run_stages
from pipeline.runtime.state import (
    SEQ_PREFIX,
    MemoryStores,
    RocksStores,
    StateTable,
    now_ms,
    position,
)
from pipeline.runtime.stats import StageStats
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.schema import SchemaStore
from pipeline.stage import DedupPolicy

#: The restore reader's settings in :meth:`KafkaTransport.restore` (the baseline uses them).
READER = {
    "enable_auto_commit": False,
    "isolation_level": "read_uncommitted",
    "max_poll_records": 10_000,
    "fetch_max_bytes": 16 * 1024 * 1024,
    "max_partition_fetch_bytes": 16 * 1024 * 1024,
}
_FLUSH_EVERY = 100_000


def record_key(k: int) -> bytes:
    """The ``k``-th record key: the bench's order ids (``order-0000042``, 13 bytes)."""
    return f"order-{k:07d}".encode()


_WRITER = b"0123456789abcdef"  # one publisher's identity, as Publisher stamps it
_SEEN = now_ms()


def changelog_record(k: int) -> tuple[bytes, bytes]:
    """Key ``k``'s dedup-by-sequence entry as the state table writes it (one writer)."""
    entry = (_WRITER, position(1 + k % 1000, 0), _SEEN)
    return SEQ_PREFIX + record_key(k), writers.encode(entry)


def pipeline_for(
    name: str, source: str, changelog: str, store: SchemaStore, partitions: int
) -> Pipeline:
    """A one-stage pipeline (dedup on) whose state changelog is ``changelog``."""
    return Pipeline(
        name,
        source=source,
        key=workload.KEY_FIELD,
        schemas=store,
        topics=TopicPolicy(partitions=partitions),
    ).then(sync_price_stage(dedup=True), state_topic=changelog)


async def create_changelog(
    bootstrap: str,
    source: str,
    changelog: str,
    store: SchemaStore,
    partitions: int,
    topics: common.Topics,
) -> None:
    """Create ``source`` and ``changelog`` as the framework does (compacted state topic)."""
    pipeline = pipeline_for(common.unique("restore-fill"), source, changelog, store, partitions)
    node = pipeline.nodes()[0]
    topics.adopt(*(s.name for s in topic_specs(pipeline)))
    await ensure_topics(bootstrap, topic_specs(pipeline))
    assert node.state_topic == changelog
    await common.wait_for_topic(bootstrap, changelog, partitions)


async def fill_changelog(
    bootstrap: str, topic: str, keys: int, partitions: int
) -> tuple[float, int]:
    """Write one entry per key, each on its key's partition; return seconds and bytes."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=512 * 1024,
    )
    t0, size = time.monotonic(), 0
    await producer.start()
    try:
        writer = BatchWriter(producer)
        for k in range(keys):
            key, value = changelog_record(k)
            size += len(key) + len(value)
            writer.append(topic, partition_for(record_key(k), partitions), key, value, [], None)
            if writer.buffered >= _FLUSH_EVERY:
                await writer.flush()
        await writer.flush()
    finally:
        await producer.stop()
    return time.monotonic() - t0, size


async def raw_read(
    bootstrap: str, topic: str, partitions: int, label: str, *, together: bool
) -> common.RunResult:
    """Read the partitions to their ends, applying nothing.

    Args:
        together: One consumer for all partitions; otherwise one fresh consumer per partition,
            one after the other, as the worker restores on assignment.
    """
    result = common.RunResult(label)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    groups = [tps] if together else [[tp] for tp in tps]
    n, t0 = 0, time.monotonic()
    try:
        for group in groups:
            reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, **READER)
            await reader.start()
            try:
                reader.assign(group)
                ends = await reader.end_offsets(group)
                for tp in group:
                    reader.seek(tp, 0)
                pending = {tp for tp in group if ends[tp] > 0}
                while pending:
                    batches = await reader.getmany(*pending, timeout_ms=500)
                    for records in batches.values():
                        for record in records:
                            if record.key is not None:
                                n += 1
                    for tp in list(pending):
                        if await reader.position(tp) >= ends[tp]:
                            pending.discard(tp)
            finally:
                await reader.stop()
    except Exception as exc:
        result.error = common.describe(exc)
        return result
    result.seconds = time.monotonic() - t0
    result.records = result.output_records = n
    return result


async def transport_read(
    bootstrap: str, topic: str, source: str, partitions: int, label: str
) -> common.RunResult:
    """The framework's read path alone: ``KafkaTransport.restore`` per partition, no apply."""
    result = common.RunResult(label)
    transport = KafkaTransport(
        bootstrap, group=common.unique("restore-read"), input_topic=source, state_topic=topic
    )
    n, t0 = 0, time.monotonic()
    try:
        for p in range(partitions):
            async for batch in transport.restore(p, 0):
                n += len(batch)
    except Exception as exc:
        result.error = common.describe(exc)
        return result
    finally:
        await _discard(transport)
    result.seconds = time.monotonic() - t0
    result.records = result.output_records = n
    return result


async def _discard(transport: KafkaTransport) -> None:
    """Close the clients the transport built but never started (restore() uses its own)."""
    for client in (transport._consumer, transport._producer):
        with contextlib.suppress(Exception):
            await client.stop()


async def worker_restore(
    bootstrap: str,
    *,
    changelog: str,
    source: str,
    store: SchemaStore,
    partitions: int,
    expected: int,
    rocks: bool,
    topics: common.Topics,
    label: str,
    time_limit: float = 300,
) -> common.RunResult:
    """A real stage worker joins a fresh group, is assigned every partition and restores.

    The worker stops once ``stats.restored`` reaches ``expected``; the figure is its own
    ``restore_seconds`` (store open + read + apply, partition after partition).
    """
    result = common.RunResult(label)
    pipeline = pipeline_for(common.unique("restore"), source, changelog, store, partitions)
    node = pipeline.nodes()[0]
    topics.adopt(node.output_topic or "", node.dlq_topic)
    state_dir = Path(tempfile.mkdtemp(prefix="bench-restore-")) if rocks else None
    options = RunOptions(shutdown_timeout=60, stats_interval=0.05, state_dir=state_dir)
    stop = asyncio.Event()
    seen: dict[str, float] = {}
    t0 = time.monotonic()

    def on_stats(stats: list[StageStats]) -> None:
        if stats and stats[0].restored >= expected and not stop.is_set():
            seen["wall"] = time.monotonic() - t0
            stop.set()

    watchdog = asyncio.get_running_loop().call_later(time_limit, stop.set)
    try:
        stats = await run_stages(
            pipeline, [node.name], bootstrap, options=options, stop=stop, on_stats=on_stats
        )
    except Exception as exc:
        result.error = common.describe(exc)
        return result
    finally:
        watchdog.cancel()
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)
    s = stats[0]
    result.records = result.output_records = s.restored
    result.seconds = s.restore_seconds
    result.notes = {
        "store": "RocksStores (rocksdict)" if rocks else "MemoryStores (dict)",
        "wall_from_start_to_restored_s": round(seen.get("wall", 0.0), 3),
        "stats": s.as_dict(),
    }
    if s.restored != expected:
        result.error = f"restored {s.restored:,} records, the changelog holds {expected:,}"
    return result


def apply_timing(keys: int) -> dict[str, Any]:
    """The apply cost alone, in process, over the same records (no broker): the framework's
    ``PartitionTable.apply_many`` in batches of 10,000 (a restore's fetch), into each store."""
    records = [changelog_record(k) for k in range(keys)]
    out: dict[str, Any] = {}
    policy = DedupPolicy()
    for name in ("memory", "rocks"):
        directory = Path(tempfile.mkdtemp(prefix="bench-apply-"))
        stores = RocksStores(directory) if name == "rocks" else MemoryStores()
        try:
            table, _ = StateTable("t", policy, stores).open(0)
            now = now_ms()
            t0 = time.perf_counter()
            for start in range(0, len(records), 10_000):
                table.apply_many(records[start : start + 10_000], now)
            seconds = time.perf_counter() - t0
            last_key, last_value = records[-1]
            got = table.store.get(last_key)  # RocksDB holds the encoding, memory the entry
            same = (writers.decode(got) if type(got) is bytes else got) == writers.decode(
                last_value
            )
            stores.close("t", 0, table.store)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        out[name] = {
            "records": keys,
            "seconds": round(seconds, 3),
            "us_per_record": round(seconds * 1e6 / keys, 3),
            "records_per_s": round(keys / seconds, 1),
            "last_entry_as_expected": same,
        }
    return out
