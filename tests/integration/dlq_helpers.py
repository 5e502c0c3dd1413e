"""Helpers for the dead-letter integration tests: publishing poison, the CLI, offsets."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pipeline.record import SEQ_HEADER, encode_seq
from pipeline.runtime.kafka import BatchWriter, partition_for
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.schema import MAGIC, SchemaStore
from pipeline.testing import Names
from tests.integration.apps import poison
from tests.integration.helpers import ROOT, TopicReader, count

REF = "tests.integration.apps.poison:build"
PAYLOAD = "p" * 100
N_HEADER = "test-n"


@dataclass
class Published:
    """What a test published: the kind of each record, by (key, seq)."""

    kinds: dict[tuple[bytes, int], str] = field(default_factory=dict)
    numbers: dict[tuple[bytes, int], int] = field(default_factory=dict)
    _seqs: Counter[bytes] = field(default_factory=Counter)

    def of(self, kind: str) -> set[tuple[bytes, int]]:
        return {ident for ident, k in self.kinds.items() if k == kind}

    def numbers_of(self, *kinds: str) -> set[int]:
        return {self.numbers[i] for i, k in self.kinds.items() if k in kinds}


@functools.cache
def store() -> SchemaStore:
    return poison.schemas()


def poison_bytes(kind: str, event: dict[str, Any]) -> bytes:
    """The value of record ``event`` as ``kind`` wants it (good, or one of the poisons)."""
    good = store().codec(poison.EVENT).encode(event)
    if kind == "truncated":
        return good[:-20]
    if kind == "unknown_fp":
        return MAGIC + bytes.fromhex("0123456789abcdef") + good[10:]
    if kind == "legacy":  # a known writer schema that cannot be read as an Event
        return store().codec(poison.LEGACY).encode({"key": event["key"], "n": str(event["n"])})
    return good


async def publish(
    bootstrap: str,
    topic: str,
    plan: list[tuple[str, int, str]],
    published: Published,
    *,
    dedup: bool = True,
) -> None:
    """Publish ``(key, n, kind)`` records in order, each with a ``test-n`` header; with
    ``dedup`` also with per-key seqs and event ids (without, the stage cannot deduplicate)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        parts = len(await producer.partitions_for(topic))
        writer = BatchWriter(producer)
        for key, n, kind in plan:
            raw_key = key.encode()
            published._seqs[raw_key] += 1
            seq = published._seqs[raw_key]
            payload = kind if kind in ("fail", "fatal", "flaky", "storm") else PAYLOAD
            value = poison_bytes(kind, {"key": key, "n": n, "hops": 0, "payload": payload})
            headers = [(N_HEADER, str(n).encode())]
            if dedup:
                headers += [(SEQ_HEADER, encode_seq(seq)), ("event-id", uuid.uuid4().bytes)]
            writer.append(topic, partition_for(raw_key, parts), raw_key, value, headers, None)
            published.kinds[(raw_key, seq)] = kind
            published.numbers[(raw_key, seq)] = n
            if writer.buffered >= 5000:
                await writer.flush()
        await writer.flush()
    finally:
        await producer.stop()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT, env=full, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def cli_json(*args: str, env: dict[str, str]) -> dict[str, Any]:
    done = cli(*args, "--json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def wait_for(bootstrap: str, topic: str, at_least: int, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while (n := await count(bootstrap, topic)) < at_least:
        assert time.monotonic() < deadline, f"{what}: {topic} stuck at {n} < {at_least}"
        await asyncio.sleep(0.2)


def stats_of(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())[0]
    return result


async def wait_for_stats(path: Path, key: str, at_least: int, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        try:
            stats = stats_of(path)
        except FileNotFoundError:
            stats = {}
        if stats.get(key, 0) >= at_least:
            return stats
        assert time.monotonic() < deadline, f"stats {key} stuck below {at_least}: {stats}"
        await asyncio.sleep(0.2)


def header(record: Any, name: str) -> str:
    return dict(record.headers).get(name, b"").decode()


async def setup(bootstrap: str, names: Names, label: str, **env: str) -> tuple[Any, dict[str, str]]:
    name = names.pipeline(label)
    pipeline = poison.build(name)
    await ensure_topics(bootstrap, topic_specs(pipeline))
    return pipeline, {"POISON_PIPELINE": name, **env}


def numbers(records: list[Any]) -> list[int]:
    return [int(header(r, N_HEADER)) for r in records]


async def until_numbered(reader: TopicReader, expected: int, within: float) -> None:
    deadline = time.monotonic() + within
    while len(set(numbers(reader.records))) < expected:
        assert time.monotonic() < deadline, f"{reader.topic}: {len(reader.records)} < {expected}"
        await reader.poll()


class Offsets:
    """End offsets through one long-lived consumer (cheap enough to poll every few ms)."""

    def __init__(self, bootstrap: str) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)

    async def __aenter__(self) -> Offsets:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def total(self, topic: str) -> int:
        tps = [TopicPartition(topic, p) for p in range(3)]
        return sum((await self._consumer.end_offsets(tps)).values())

    async def wait(self, topic: str, at_least: int, within: float, poll: float = 0.01) -> float:
        """Seconds until ``topic`` holds ``at_least`` records."""
        began = time.monotonic()
        while (n := await self.total(topic)) < at_least:
            assert time.monotonic() - began < within, f"{topic} stuck at {n} < {at_least}"
            await asyncio.sleep(poll)
        return time.monotonic() - began

    async def timed(
        self,
        bootstrap: str,
        topic: str,
        plan: list[tuple[str, int, str]],
        seqs: Published,
        sink: str,
        end: int,
    ) -> float:
        """Seconds from the start of publishing ``plan`` until ``sink`` holds ``end`` records."""
        began = time.monotonic()
        await publish(bootstrap, topic, plan, seqs)
        await self.wait(sink, end, 60)
        return time.monotonic() - began
