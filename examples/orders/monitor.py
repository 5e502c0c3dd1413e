"""What the demo watches: offsets and groups on the broker, stage processes and their stats.

- :class:`Cluster`: end offsets, committed group offsets, group states, reading a topic range;
- :class:`StageProcess`: ``pipeline run ... --stage NAME`` as a child OS process, with its log,
  its stats file (rewritten by the stage once a second) and its CPU time;
- :class:`Activity`: when each stage's counters first moved and last changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from pipeline.ops.supervisor import Instance, Supervisor
from pipeline.security import Bootstrap, connection

ROOT = Path(__file__).resolve().parents[2]
Offsets = dict[int, int]  # partition -> offset
T = TypeVar("T")


def total(offsets: Mapping[int, int]) -> int:
    """The sum over partitions."""
    return sum(offsets.values())


def delta(end: Mapping[int, int], start: Mapping[int, int]) -> int:
    """Records between ``start`` and ``end`` offsets, over all partitions."""
    return sum(end[p] - start.get(p, 0) for p in end)


class Cluster:
    """A small admin view of the broker for the demo (an async context manager).

    Example:
        >>> async with Cluster(bootstrap) as cluster:         # doctest: +SKIP
        ...     await cluster.end_offsets("orders.placed")
        {0: 33410, 1: 33201, 2: 33389}
    """

    def __init__(self, bootstrap: Bootstrap) -> None:
        self.bootstrap = bootstrap
        args = connection(bootstrap).client_args()
        self._admin = AIOKafkaAdminClient(**args, client_id="orders-demo")
        self._consumer = AIOKafkaConsumer(**args, client_id="orders-demo", enable_auto_commit=False)
        self._parts: dict[str, list[int]] = {}

    async def __aenter__(self) -> Cluster:
        await self._admin.start()
        await self._consumer.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(Exception):
            await self._consumer.stop()
        with contextlib.suppress(Exception):
            await self._admin.close()

    async def partitions(self, topic: str) -> list[int]:
        """The partition numbers of ``topic``."""
        if topic not in self._parts:
            described = await self._admin.describe_topics([topic])
            self._parts[topic] = sorted(p["partition"] for p in described[0]["partitions"])
        return self._parts[topic]

    async def end_offsets(self, topic: str) -> Offsets:
        """The next offset to be written, per partition."""
        tps = [TopicPartition(topic, p) for p in await self.partitions(topic)]
        ends = await self._consumer.end_offsets(tps)
        return {tp.partition: int(off) for tp, off in ends.items()}

    async def start_offsets(self, topic: str) -> Offsets:
        """The oldest offset still in the log, per partition."""
        tps = [TopicPartition(topic, p) for p in await self.partitions(topic)]
        starts = await self._consumer.beginning_offsets(tps)
        return {tp.partition: int(off) for tp, off in starts.items()}

    async def committed(self, group: str, topic: str) -> Offsets:
        """The group's committed offsets on ``topic`` (the log start where it has none, as a
        new group with ``auto_offset_reset=earliest`` begins there)."""
        found = await _patiently(lambda: self._admin.list_consumer_group_offsets(group))
        offsets = {tp.partition: meta.offset for tp, meta in found.items() if tp.topic == topic}
        starts = await self.start_offsets(topic)
        return {p: offsets[p] if offsets.get(p, -1) >= 0 else starts[p] for p in starts}

    async def lag(self, group: str, topic: str) -> int:
        """Records of ``topic`` the group has not committed yet."""
        return delta(await self.end_offsets(topic), await self.committed(group, topic))

    async def read(self, topic: str, start: Offsets, end: Offsets) -> list[Any]:
        """Every record of ``topic`` from ``start`` up to ``end`` (exclusive), per partition."""
        consumer = AIOKafkaConsumer(
            **connection(self.bootstrap).client_args(),
            client_id="orders-demo-reader",
            enable_auto_commit=False,
            max_poll_records=10_000,
            fetch_max_bytes=16 * 1024 * 1024,
        )
        await consumer.start()
        records: list[Any] = []
        try:
            wanted = {p: (start.get(p, 0), end[p]) for p in end if end[p] > start.get(p, 0)}
            tps = [TopicPartition(topic, p) for p in wanted]
            if not tps:
                return records
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, wanted[tp.partition][0])
            remaining = set(tps)
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=1000)
                for tp, msgs in batch.items():
                    stop = wanted[tp.partition][1]
                    records.extend(m for m in msgs if m.offset < stop)
                    if msgs and msgs[-1].offset + 1 >= stop:
                        remaining.discard(tp)
        finally:
            await consumer.stop()
        return records


async def _patiently(call: Callable[[], Awaitable[T]], within: float = 30.0) -> T:
    """``call()``, again after a pause while the broker answers with a retriable error (a
    fresh broker has no group coordinator until its offsets topic exists)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


class StageProcess:
    """One stage as its own OS process, started by ``pipeline up``'s supervisor
    (:class:`~pipeline.ops.supervisor.Supervisor`): ``python -m pipeline.cli run REF --stage
    NAME --http ... --stats-file ...``. The demo does not let the supervisor restart a stage
    that dies: a crash fails the demo instead of hiding in a restart.

    Args:
        instance: The supervised instance (already started).
    """

    def __init__(self, instance: Instance) -> None:
        assert instance.proc is not None and instance.stats_file is not None
        self.instance = instance
        self.stage = instance.stage
        self.log = instance.log
        self.stats_file = instance.stats_file
        self.proc = instance.proc
        self._stopping = False

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.proc.poll() is None

    @classmethod
    def start_all(
        cls,
        ref: str,
        stages: list[str],
        bootstrap: Bootstrap,
        workdir: Path,
        *,
        stage_env: Mapping[str, Mapping[str, str]] | None = None,
        faust: Collection[str] = (),
    ) -> list[StageProcess]:
        """Every stage's process, logs and stats files in ``workdir`` (``faust``: stages run
        as agents of a faust-streaming app, ``pipeline faust``)."""
        # The enrich stage's customer table finds its broker through PIPELINE_BOOTSTRAP.
        supervisor = Supervisor(
            ref, stages, bootstrap, logs=workdir, stats_dir=workdir, shutdown_timeout=20,
            env={"PIPELINE_BOOTSTRAP": str(bootstrap)}, stage_env=stage_env, faust=faust,
        )  # fmt: skip
        for inst in supervisor.instances:
            assert inst.stats_file is not None
            inst.stats_file.unlink(missing_ok=True)
        supervisor.start()
        return [cls(inst) for inst in supervisor.instances]

    def stats(self) -> dict[str, Any] | None:
        """The stage's latest counters (``StageStats.as_dict``), or None before the first."""
        try:
            data = json.loads(self.stats_file.read_text())
        except (OSError, ValueError):
            return None
        for entry in data if isinstance(data, list) else []:
            if isinstance(entry, dict) and entry.get("stage") == self.stage:
                return entry
        return None

    def assigned(self) -> bool:
        """Whether the stage has logged that it got its partitions (worker's INFO line)."""
        try:
            return "partitions assigned" in self.log.read_text(errors="replace")
        except OSError:
            return False

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the process so far (Linux ``/proc``; None elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        # Fields after the command name start at field 3 (state); utime and stime are 14, 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Ask the stage to stop: one SIGTERM (it finishes its batch, commits and leaves).

        Sent once only: a second SIGTERM that arrives after the stage has restored the
        default handler, on its way out, would kill it.
        """
        if self.proc.poll() is None and not self._stopping:
            self._stopping = True
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 45.0) -> int:
        """Wait for the exit after :meth:`stop` (SIGKILL after ``timeout``); the exit code."""
        self.stop()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the stage's log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(slots=True)
class Activity:
    """When a stage's ``consumed`` counter first moved and last changed (demo clock).

    The stats file is rewritten once a second, so both times are late by up to a second;
    their difference, the stage's active span, is within about a second of the truth.
    """

    first: float | None = None
    last: float | None = None
    consumed: int = 0

    def observe(self, consumed: int, now: float | None = None) -> None:
        """Record the counter as read at ``now``."""
        now = time.monotonic() if now is None else now
        if consumed > self.consumed:
            if self.first is None:
                self.first = now
            self.last = now
            self.consumed = consumed

    @property
    def span(self) -> float:
        """Seconds between the first and the last change (at least one stats interval)."""
        if self.first is None or self.last is None:
            return 0.0
        return max(1.0, self.last - self.first)
