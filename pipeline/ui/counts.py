"""The dashboard's dead-letter counts, kept live without keeping records.

:class:`DlqIndex` reads every dead-letter topic of the pipeline once from its start and then
follows it (one consumer, ``read_committed``, headers only): counts by error class, per 10
seconds by error class, and the dead letters that replay receipts (``P.S.dlq.replays``) say
were replayed. Until it has caught up, its summary says how far it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka import errors as kerr
from aiokafka.structs import TopicPartition

from pipeline.dlq.kafka import receipts_topic
from pipeline.dsl import StageNode
from pipeline.errors import PipelineError
from pipeline.runtime import deadletter as dl
from pipeline.runtime.diagnose import start_client
from pipeline.security import Bootstrap, connection

log = logging.getLogger(__name__)

_BUCKET_MS = 10_000  # counts over time are kept per 10 seconds
_UNKNOWN = "(no dlq headers)"


@dataclass(slots=True)
class TopicCounts:
    """What :class:`DlqIndex` knows of one dead-letter topic."""

    topic: str
    total: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    per_bucket: Counter[tuple[str, int]] = field(default_factory=Counter)  # (class, 10 s)
    replayed: set[int] = field(default_factory=set)  # partition << 40 | offset, from receipts
    read: int = 0  # offsets consumed so far (for the catch-up progress)
    backlog: int = 0  # offsets that were there when the index started reading the topic

    def summary(self, buckets: int = 30) -> dict[str, Any]:
        """Totals, and counts by class in at most ``buckets`` time buckets (oldest first)."""
        slots = sorted({b for _, b in self.per_bucket})
        series: list[dict[str, Any]] = []
        if slots:
            first, last = slots[0], slots[-1]
            width = max(1, -(-(last - first + 1) // buckets))  # 10 s slots per bucket
            rows: dict[int, Counter[str]] = {}
            for (cls, slot), n in self.per_bucket.items():
                rows.setdefault((slot - first) // width, Counter())[cls] += n
            series = [
                {"start_ms": (first + i * width) * _BUCKET_MS,
                 "seconds": width * _BUCKET_MS // 1000, "by_class": dict(rows.get(i, Counter()))}
                for i in range((last - first) // width + 1)
            ]  # fmt: skip
        return {
            "topic": self.topic,
            "total": self.total,
            "by_class": dict(self.by_class.most_common()),
            "replayed": len(self.replayed),
            "series": series,
            "indexed": min(self.read, self.backlog) if self.backlog else self.read,
            "backlog": self.backlog,
            "caught_up": self.read >= self.backlog,
        }


class DlqIndex:
    """Counts of the dead letters of every stage, kept up to date by one background reader.

    Example:
        >>> index = DlqIndex(bootstrap, pipeline.nodes())      # doctest: +SKIP
        >>> task = asyncio.create_task(index.run())            # doctest: +SKIP
        >>> index.counts["orders.validate.dlq"].by_class       # doctest: +SKIP
        Counter({'InvalidOrderError': 12, 'DecodeError': 3})
    """

    def __init__(self, bootstrap: Bootstrap, nodes: Iterable[StageNode]) -> None:
        self.bootstrap = bootstrap
        nodes = list(nodes)
        self.counts = {n.dlq_topic: TopicCounts(n.dlq_topic) for n in nodes}
        self._receipts = {receipts_topic(n): n.dlq_topic for n in nodes}
        self.error: str | None = None
        self._look_again = False

    def look_again(self) -> None:
        """Look for new topics at the next read (a replay just created a receipts topic)."""
        self._look_again = True

    async def run(self, refresh_s: float = 5.0) -> None:
        """Read until cancelled; topics that appear later are picked up within ``refresh_s``."""
        while True:
            consumer = AIOKafkaConsumer(
                **connection(self.bootstrap).client_args(), enable_auto_commit=False,
                isolation_level="read_committed", max_poll_records=20_000,
            )  # fmt: skip
            try:
                await start_client(consumer, self.bootstrap, "reading dead letters")
                await self._follow(consumer, refresh_s)
            except (PipelineError, kerr.KafkaError) as exc:
                self.error = str(exc)
                log.warning("dead-letter index: %s (trying again)", exc)
                for counts in self.counts.values():  # read again from the start
                    self.counts[counts.topic] = TopicCounts(counts.topic)
                await asyncio.sleep(refresh_s)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    async def _follow(self, consumer: AIOKafkaConsumer, refresh_s: float) -> None:
        assigned: set[TopicPartition] = set()
        next_refresh = 0.0
        while True:
            if time.monotonic() >= next_refresh or self._look_again:
                self._look_again = False
                await self._assign(consumer, assigned)
                next_refresh = time.monotonic() + refresh_s
                self.error = None
            if not assigned:
                await asyncio.sleep(refresh_s)
                continue
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                receipt_of = self._receipts.get(tp.topic)
                if receipt_of is not None:
                    self._add_receipts(self.counts[receipt_of], records)
                else:
                    self._add(self.counts[tp.topic], records)

    async def _assign(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        cluster = await consumer._client.fetch_all_metadata()
        found = {
            TopicPartition(topic, p)
            for topic in [*self.counts, *self._receipts]
            for p in cluster.partitions_for_topic(topic) or ()
        }
        new = found - assigned
        if not new:
            return
        positions = {tp: await consumer.position(tp) for tp in assigned}
        consumer.assign(sorted(found))
        for tp, at in positions.items():
            consumer.seek(tp, at)
        await consumer.seek_to_beginning(*new)
        starts = await consumer.beginning_offsets(list(new))
        ends = await consumer.end_offsets(list(new))
        for tp in new:
            if tp.topic in self.counts:
                self.counts[tp.topic].backlog += ends[tp] - starts[tp]
        assigned |= new

    @staticmethod
    def _add(counts: TopicCounts, records: list[Any]) -> None:
        for record in records:
            cls = _UNKNOWN
            for name, value in record.headers:
                if name == dl.ERROR_CLASS:
                    cls = value.decode("utf-8", "replace")
            counts.total += 1
            counts.by_class[cls] += 1
            counts.per_bucket[cls, record.timestamp // _BUCKET_MS] += 1
        if records:
            counts.read += len(records)

    @staticmethod
    def _add_receipts(counts: TopicCounts, records: list[Any]) -> None:
        for record in records:
            for name, value in record.headers:
                if name == dl.RECEIPT:
                    part, _, off = value.decode().partition("@")
                    with contextlib.suppress(ValueError):
                        counts.replayed.add(int(part) << 40 | int(off))
