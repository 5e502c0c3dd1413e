"""What every benchmark shares: topic names, topic admin, pre-loading, progress probes,
verification against the broker, and the result record.

Timing rule, the same for every contender: the clock starts when the contender first receives
records (so process start, topic creation and the group join are excluded for all) and stops
when the contender's own commit covers the last input record, i.e. when every output is
acknowledged (acks=all) and the input offsets are committed. Afterwards the broker is asked
independently: the output topic's end offsets and the group's committed offsets must both
equal the record count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import workload
from pipeline.publish import Publisher
from pipeline.record import SEQ_HEADER, decode_seq
from pipeline.schema import SchemaStore
from pipeline.security import Bootstrap, connection

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True, slots=True)
class OneStage:
    """The knobs of a benchmark that runs one stage over pre-loaded records."""

    records: int = 200_000
    partitions: int = 3
    keys: int = 10_000
    repeat: int = 3
    results: Path = RESULTS

    def conditions(
        self, store: SchemaStore, broker: str, load_at_start: list[float], **more: Any
    ) -> dict[str, Any]:
        """The run's conditions for its results document (``more`` added before the load)."""
        return {
            "records": self.records,
            "record_bytes_mean": round(record_bytes(store, keys=self.keys), 1),
            "partitions": self.partitions,
            "keys": self.keys,
            "broker": broker,
            **more,
            "load_average_1_5_15min_at_start": load_at_start,
        }


class WarningTally(logging.Handler):
    """Counts the framework's warnings (a run's result reports them instead of the console)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(f"{record.name}: {record.getMessage()}")

    def since(self, count: int) -> dict[str, Any]:
        """What was logged after the tally stood at ``count``."""
        return {"count": self.count - count, "first": self.first[:5]}


TALLY = WarningTally()


def unique(prefix: str) -> str:
    """A fresh topic or group name: ``bench-<prefix>-<8 hex digits>``."""
    return f"bench-{prefix}-{uuid.uuid4().hex[:8]}"


class Topics:
    """Creates topics and remembers them, so that :meth:`delete_all` can clean up."""

    def __init__(self, bootstrap: Bootstrap, partitions: int, replication: int = 1) -> None:
        self.bootstrap = bootstrap
        self.partitions = partitions
        self.replication = replication
        self.created: list[str] = []

    async def create(self, *names: str) -> None:
        admin = AIOKafkaAdminClient(
            **connection(self.bootstrap).client_args(), client_id="bench-admin"
        )
        await admin.start()
        r = self.replication
        config = {"min.insync.replicas": str(min(2, r))}
        try:
            await admin.create_topics(
                [NewTopic(n, self.partitions, r, topic_configs=config) for n in names]
            )
        finally:
            await admin.close()
        self.created.extend(names)
        for name in names:  # metadata reaches every listener a moment after the create
            await wait_for_topic(self.bootstrap, name, self.partitions)

    def adopt(self, *names: str) -> None:
        """Remember topics someone else (the framework, faust) created, for clean-up."""
        self.created.extend(names)

    async def delete_all(self) -> None:
        if not self.created:
            return
        admin = AIOKafkaAdminClient(
            **connection(self.bootstrap).client_args(), client_id="bench-admin"
        )
        await admin.start()
        try:
            existing = set(await _list_topics(self.bootstrap))
            doomed = sorted(set(self.created) & existing)
            if doomed:
                await admin.delete_topics(doomed)
        finally:
            await admin.close()
        self.created.clear()


async def _list_topics(bootstrap: Bootstrap) -> list[str]:
    consumer = AIOKafkaConsumer(**connection(bootstrap).client_args())
    await consumer.start()
    try:
        return sorted(await consumer.topics())
    finally:
        await consumer.stop()


async def wait_for_topic(
    bootstrap: Bootstrap, topic: str, partitions: int, limit: float = 30
) -> None:
    consumer = AIOKafkaConsumer(**connection(bootstrap).client_args())
    await consumer.start()
    try:
        deadline = time.monotonic() + limit
        while len(consumer.partitions_for_topic(topic) or ()) != partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} did not appear within {limit:.0f}s")
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.05)
    finally:
        await consumer.stop()


async def preload(
    bootstrap: Bootstrap,
    topic: str,
    store: SchemaStore,
    count: int,
    keys: int,
    start: int = 0,
    traced: bool = False,
) -> float:
    """Publish ``count`` orders with the framework's :class:`Publisher`; return the seconds.

    The publisher keys by ``order_id`` (murmur2, as the Java client), adds the ``seq`` and
    ``event-id`` headers, and sends through an idempotent producer in batches.
    """
    t0 = time.monotonic()
    codec = store.codec(workload.ORDER)
    async with Publisher(
        bootstrap, topic, codec, workload.KEY_FIELD, batch_records=20_000
    ) as publisher:
        if not traced:
            await publisher.publish_many(workload.orders(count, keys, start))
        else:  # each event with a W3C traceparent of its own, as a traced caller gives it
            for i, order in enumerate(workload.orders(count, keys, start)):
                trace = f"00-{uuid.uuid4().hex}-{i + 1:016x}-01"
                publisher.buffer(order, traceparent=trace)
                if i % 20_000 == 19_999:
                    await publisher.flush()
            await publisher.flush()
    return time.monotonic() - t0


def record_bytes(store: SchemaStore, sample: int = 2000, keys: int = 10_000) -> float:
    """Mean single-object encoded size of the input records."""
    codec = store.codec(workload.ORDER)
    sizes = [len(codec.encode(v)) for v in workload.orders(sample, keys)]
    return sum(sizes) / len(sizes)


class Probe:
    """A contender's own progress: when records first arrived, when the commits covered all.

    ``done`` is set when the committed positions (next offset to read, summed over the input
    partitions, which all start at offset 0) reach ``target``.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.t_first: float | None = None
        self.t_end: float | None = None
        self.at_end = 0  # records covered by the commit that reached the target
        self.positions: dict[tuple[str, int], int] = {}
        self.done = asyncio.Event()

    def received(self) -> None:
        if self.t_first is None:
            self.t_first = time.monotonic()

    def committed(self, positions: Mapping[tuple[str, int], int]) -> None:
        self.positions.update(positions)
        if self.t_end is None and self.total >= self.target:
            self.t_end = time.monotonic()
            self.at_end = self.total  # a graceful stop may commit more later: not timed
            self.done.set()

    @property
    def total(self) -> int:
        return sum(self.positions.values())

    def seconds(self) -> float:
        if self.t_first is None or self.t_end is None:
            raise RuntimeError(
                f"the contender stopped after committing {self.total} of {self.target} records"
            )
        return self.t_end - self.t_first


def describe(exc: BaseException) -> str:
    """``Class: message (at file:line)`` of the innermost frame: enough to find the failure."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


@dataclass
class RunResult:
    """One timed run of one contender."""

    contender: str
    records: int = 0  # records the run handled and committed in all
    timed_records: int | None = None  # records covered by the timed interval, if fewer
    seconds: float | None = None
    output_records: int | None = None  # end offsets of the output topic, read afterwards
    committed_records: int | None = None  # the group's committed offsets, read afterwards
    error: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def records_per_s(self) -> float | None:
        if self.error or not self.seconds:
            return None
        timed = self.records if self.timed_records is None else self.timed_records
        return timed / self.seconds

    @property
    def verified(self) -> bool:
        return self.error is None and self.output_records == self.committed_records == self.records

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        rate = self.records_per_s
        out["records_per_s"] = None if rate is None else round(rate, 1)
        out["seconds"] = None if self.seconds is None else round(self.seconds, 4)
        out["verified"] = self.verified
        return out


async def end_offsets(bootstrap: Bootstrap, topic: str) -> int:
    """Records in ``topic`` (sum of end offsets; every topic here is fresh and never compacted)."""
    consumer = AIOKafkaConsumer(**connection(bootstrap).client_args())
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum((await consumer.end_offsets(tps)).values()) if tps else 0
    finally:
        await consumer.stop()


async def committed(bootstrap: Bootstrap, group: str, topic: str) -> int:
    """Sum of ``group``'s committed offsets on ``topic`` (0 for partitions without a commit)."""
    consumer = AIOKafkaConsumer(
        **connection(bootstrap).client_args(), group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        total = 0
        for p in consumer.partitions_for_topic(topic) or ():
            total += await consumer.committed(TopicPartition(topic, p)) or 0
        return total
    finally:
        await consumer.stop()


async def verify(
    bootstrap: Bootstrap, result: RunResult, output: str, group: str, topic: str
) -> None:
    """Fill in what the broker says about ``result``'s output topic and committed offsets."""
    result.output_records = await end_offsets(bootstrap, output)
    result.committed_records = await committed(bootstrap, group, topic)


async def read_records(
    bootstrap: Bootstrap, topic: str, expected: int, limit: float = 60
) -> list[Any]:
    """Read ``topic`` back from its start until ``expected`` records (or ``limit`` seconds)."""
    consumer = AIOKafkaConsumer(
        topic,
        **connection(bootstrap).client_args(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    found: list[Any] = []
    try:
        deadline = time.monotonic() + limit
        while len(found) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for msgs in batches.values():
                found.extend(msgs)
    finally:
        await consumer.stop()
    return found


async def read_sequences(
    bootstrap: Bootstrap, topic: str, expected: int, limit: float = 60
) -> dict[bytes | None, list[int]]:
    """Read ``topic`` back; per key, the ``seq`` headers in the order the topic holds them."""
    seqs: dict[bytes | None, list[int]] = {}
    for msg in await read_records(bootstrap, topic, expected, limit):
        seq = next((decode_seq(v) for k, v in msg.headers if k == SEQ_HEADER), -1)
        seqs.setdefault(msg.key, []).append(seq)
    return seqs


def order_violations(seqs: Mapping[bytes | None, Iterable[int]]) -> int:
    """Places where a key's sequence numbers do not strictly increase."""
    bad = 0
    for values in seqs.values():
        last = None
        for seq in values:
            if seq < 0 or (last is not None and seq <= last):
                bad += 1
            last = seq
    return bad


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: other work on the machine disturbs the figures."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return [round(x, 2) for x in load]


def machine() -> dict[str, Any]:
    """The conditions every result is reported with."""
    import aiokafka
    import fastavro

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiokafka": aiokafka.__version__,
        "fastavro": fastavro.__version__,
        "load_average_1_5_15min_at_end": load_average(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


async def settle(seconds: float = 0.5) -> None:
    """A short pause between runs so one contender's clean-up does not overlap the next."""
    import gc

    gc.collect()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(seconds)


async def alternate(
    bench: str,
    contenders: tuple[str, ...],
    repeat: int,
    run_one: Callable[[str], Awaitable[RunResult]],
) -> dict[str, list[RunResult]]:
    """Run each contender ``repeat`` times, in turns whose order flips every round (so none
    always runs first), printing each result; the results by contender."""
    runs: dict[str, list[RunResult]] = {c: [] for c in contenders}
    for r in range(repeat):
        for name in contenders if r % 2 == 0 else tuple(reversed(contenders)):
            result = await run_one(name)
            runs[name].append(result)
            rate = result.records_per_s
            told = f"error {result.error}" if rate is None else f"{rate:,.0f} rec/s"
            print(f"[{bench}] {name}: {told}")
            await settle()
    return runs
