"""Helpers for integration tests: stage processes, reading topics back, order checks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.record import SEQ_HEADER, decode_seq
from pipeline.security import Bootstrap, connection

ROOT = Path(__file__).resolve().parents[2]


class StageProcess:
    """``pipeline run MODULE:PIPELINE --stage NAME`` as a child OS process (``faust``:
    ``pipeline faust``, the stage as an agent of a faust-streaming app)."""

    def __init__(
        self,
        ref: str,
        stage: str,
        bootstrap: str,
        env: dict[str, str],
        log: Path,
        extra: tuple[str, ...] = (),
        *,
        faust: bool = False,
    ) -> None:
        self.stage = stage
        self.log = log
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        run = ["faust"] if faust else ["run", "--shutdown-timeout", "20"]
        cmd = [
            sys.executable, "-m", "pipeline.cli", *run[:1], ref, "--stage", stage,
            "--bootstrap", bootstrap, *run[1:], *extra,
        ]  # fmt: skip
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM, then wait for a clean exit; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        """SIGKILL: no chance to finish, flush or commit anything."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


async def end_offsets(bootstrap: Bootstrap, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(**connection(bootstrap).client_args(), enable_auto_commit=False)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def count(bootstrap: Bootstrap, topic: str) -> int:
    return sum((await end_offsets(bootstrap, topic)).values())


async def wait_for_count(bootstrap: Bootstrap, topic: str, expected: int, within: float) -> int:
    deadline = time.monotonic() + within
    n = 0
    while time.monotonic() < deadline:
        n = await count(bootstrap, topic)
        if n >= expected:
            return n
        await asyncio.sleep(0.5)
    return n


async def committed(bootstrap: Bootstrap, group: str, topic: str) -> dict[int, int]:
    """The offsets ``group`` committed on ``topic``, by partition (0 where none)."""
    ends = await end_offsets(bootstrap, topic)
    reader = AIOKafkaConsumer(
        **connection(bootstrap).client_args(), group_id=group, enable_auto_commit=False
    )
    await reader.start()
    try:
        found = {}
        for p in ends:
            offset = await reader.committed(TopicPartition(topic, p))
            found[p] = offset or 0
        return found
    finally:
        await reader.stop()


async def read_all(bootstrap: Bootstrap, topic: str, *, read_committed: bool = False) -> list[Any]:
    """Every record of ``topic`` now, partition by partition in offset order."""
    ends = await end_offsets(bootstrap, topic)
    consumer = AIOKafkaConsumer(
        **connection(bootstrap).client_args(),
        enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        max_poll_records=5000,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        remaining = {tp for tp in tps if ends[tp.partition] > 0}
        async with asyncio.timeout(120):
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=500)
                for tp, msgs in batch.items():
                    records.extend(msgs)
                    if msgs and msgs[-1].offset + 1 >= ends[tp.partition]:
                        remaining.discard(tp)
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp.partition]:
                        remaining.discard(tp)
    finally:
        await consumer.stop()
    return records


def seq_of(record: Any) -> int:
    for k, v in record.headers:
        if k == SEQ_HEADER:
            return decode_seq(v)
    raise AssertionError(f"record without a seq header: {record}")


def order_violations(records: list[Any]) -> list[str]:
    """Per key, sequence numbers must strictly increase in offset order (per partition)."""
    last: dict[bytes, int] = {}
    bad = []
    for r in records:
        seq = seq_of(r)
        prev = last.get(r.key)
        if prev is not None and seq <= prev:
            bad.append(
                f"key {r.key!r}: seq {seq} after {prev} ({r.topic}/{r.partition}@{r.offset})"
            )
        last[r.key] = seq
    return bad


def by_key(records: list[Any], value: Callable[[Any], Any] = seq_of) -> dict[bytes, list[Any]]:
    out: dict[bytes, list[Any]] = defaultdict(list)
    for r in records:
        out[r.key].append(value(r))
    return out


class TopicReader:
    """Reads a topic incrementally from the beginning (read_committed by default)."""

    def __init__(self, bootstrap: str, topic: str, *, read_committed: bool = True) -> None:
        self.topic = topic
        self.records: list[Any] = []
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed" if read_committed else "read_uncommitted",
            max_poll_records=10_000,
        )

    async def __aenter__(self) -> TopicReader:
        await self._consumer.start()
        # A topic created a moment ago (on a cluster: by another broker) may be missing from
        # the first metadata answers: wait for it rather than read nothing forever.
        deadline = time.monotonic() + 30
        while not (parts := self._consumer.partitions_for_topic(self.topic)):
            assert time.monotonic() < deadline, f"topic {self.topic} never showed up"
            await self._consumer._client.force_metadata_update()
            if not self._consumer.partitions_for_topic(self.topic):
                await asyncio.sleep(0.2)
        self._consumer.assign([TopicPartition(self.topic, p) for p in sorted(parts)])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self, timeout_ms: int = 500) -> int:
        batch = await self._consumer.getmany(timeout_ms=timeout_ms)
        for msgs in batch.values():
            self.records.extend(msgs)
        return sum(len(m) for m in batch.values())

    def distinct(self) -> int:
        return len({(r.key, seq_of(r)) for r in self.records})

    async def until_distinct(self, expected: int, within: float) -> int:
        deadline = time.monotonic() + within
        while self.distinct() < expected and time.monotonic() < deadline:
            await self.poll()
        return self.distinct()

    async def settle(self, quiet_s: float = 3.0) -> None:
        """Keep reading until nothing new arrives for ``quiet_s`` seconds."""
        quiet_until = time.monotonic() + quiet_s
        while time.monotonic() < quiet_until:
            if await self.poll():
                quiet_until = time.monotonic() + quiet_s


def duplicates(records: list[Any]) -> int:
    seen: set[tuple[bytes, int]] = set()
    dupes = 0
    for r in records:
        ident = (r.key, seq_of(r))
        if ident in seen:
            dupes += 1
        seen.add(ident)
    return dupes
