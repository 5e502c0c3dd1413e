"""The dashboard's pages of dead letters, read on demand, never a whole topic.

:class:`DlqBrowser` reads one page of a stage's dead letters, newest first, matching a
:class:`~pipeline.dlq.Where` and a time range: it reads each partition backwards from a cursor
in growing windows, merging the partitions by time, until a page is full or a scan budget is
spent (then the page says so, and the next page goes on from where it stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka import errors as kerr
from aiokafka.structs import TopicPartition

from pipeline.dlq import DeadLetterRecord, Where, decode_value
from pipeline.dsl import Pipeline, StageNode
from pipeline.errors import PipelineError
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import translate
from pipeline.security import Bootstrap, connection


@dataclass(frozen=True, slots=True)
class PageQuery:
    """Which dead letters a page shows: a filter, a time range (ms, inclusive start, exclusive
    end), where the previous page stopped (per partition, exclusive), and how many."""

    where: Where = field(default_factory=Where)
    since_ms: int | None = None
    until_ms: int | None = None
    cursor: dict[int, int] | None = None
    limit: int = 50

    @staticmethod
    def parse_cursor(text: str) -> dict[int, int] | None:
        """``"0:120,1:98"`` -> ``{0: 120, 1: 98}`` (``""`` -> ``None``: from the end)."""
        if not text:
            return None
        try:
            pairs = (item.split(":") for item in text.split(","))
            return {int(p): int(o) for p, o in pairs}
        except ValueError as exc:
            raise PipelineError(f"bad page cursor {text!r} (PARTITION:OFFSET,...)") from exc

    @staticmethod
    def format_cursor(cursor: dict[int, int]) -> str:
        return ",".join(f"{p}:{o}" for p, o in sorted(cursor.items()))


@dataclass(slots=True)
class Page:
    """One page: rows newest first, the cursor of the next page (``None``: nothing older), and
    how many dead letters were read to fill it."""

    rows: list[dict[str, Any]]
    next_cursor: str | None
    scanned: int
    complete: bool  # False: the scan budget ran out before the page was full


class DlqBrowser:
    """Reads pages of dead letters, one at a time, with one long-lived consumer.

    Args:
        bootstrap: The cluster.
        pipelines: Whose schemas decode the values.
        budget: At most this many dead letters are read for one page.
    """

    def __init__(self, bootstrap: Bootstrap, budget: int = 50_000) -> None:
        self.bootstrap = bootstrap
        self.budget = budget
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None

    async def _reader(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            # A page seeks from window to window: a fetch still waiting at a partition's end
            # (the broker holds it up to fetch_max_wait_ms) must not delay the next window.
            consumer = AIOKafkaConsumer(
                **connection(self.bootstrap).client_args(), enable_auto_commit=False,
                isolation_level="read_committed", max_poll_records=5_000, fetch_max_wait_ms=20,
            )  # fmt: skip
            await start_client(consumer, self.bootstrap, "reading dead letters")
            self._consumer = consumer
        return self._consumer

    async def page(
        self, pipeline: Pipeline, node: StageNode, query: PageQuery, replayed: set[int]
    ) -> Page:
        """The dead letters of ``node`` that ``query`` asks for, newest first.

        Raises:
            TopicError: The dead-letter topic does not exist.
            BrokerUnavailableError: No broker answers.
        """
        async with self._lock:
            try:
                return await self._page(pipeline, node, query, replayed)
            except kerr.KafkaError as exc:
                await self.close()
                raise translate(exc, "reading dead letters", topic=node.dlq_topic) from exc

    async def _page(
        self, pipeline: Pipeline, node: StageNode, query: PageQuery, replayed: set[int]
    ) -> Page:
        consumer = await self._reader()
        topic = node.dlq_topic
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return Page([], None, 0, True)
        low, high = await _bounds(consumer, tps, query)
        # A merge by time over the partitions, read backwards a window at a time: a match may
        # be shown once no partition can still hold a newer one (``floor``: the newest of the
        # oldest timestamps read so far in each partition not read to its start).
        matches: list[DeadLetterRecord] = []
        oldest_read = dict.fromkeys(high, math.inf)
        window = dict.fromkeys(high, max(query.limit, 100))
        scanned = 0
        while True:
            open_parts = [p for p in high if high[p] > low[p]]
            floor = max((oldest_read[p] for p in open_parts), default=-math.inf)
            ready = [r for r in matches if r.timestamp >= floor]
            if len(ready) >= query.limit or not open_parts or scanned >= self.budget:
                break
            for p in open_parts:
                if oldest_read[p] != floor:
                    continue  # another partition holds the floor: read that one first
                begin = max(low[p], high[p] - window[p])
                chunk = await _read_range(consumer, TopicPartition(topic, p), begin, high[p])
                scanned += high[p] - begin
                if chunk:
                    oldest_read[p] = min(r.timestamp for r in chunk)
                matches += [r for r in chunk if _in_time(r, query) and query.where.matches(r)]
                high[p] = begin
                window[p] = min(window[p] * 4, 5_000)  # few matches: read further at a time
        # The page: the newest ``limit`` of the matches that may be shown; the cursor resumes
        # right after them, so what was read and not shown is read again by the next page.
        ranked = sorted(ready, key=lambda r: (-r.timestamp, -r.offset))
        shown = ranked[: query.limit]
        kept = {(r.partition, r.offset) for r in shown}
        rest = [r for r in matches if (r.partition, r.offset) not in kept]
        cursor = dict(high)
        for record in rest:  # not shown: the next page reads them again
            cursor[record.partition] = max(cursor[record.partition], record.offset + 1)
        more = any(cursor[p] > low[p] for p in cursor)
        rows = [_row(pipeline, node, r, replayed) for r in shown]
        complete = len(shown) >= query.limit or not more
        return Page(rows, PageQuery.format_cursor(cursor) if more else None, scanned, complete)


async def _bounds(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], query: PageQuery
) -> tuple[dict[int, int], dict[int, int]]:
    """Per partition, the offsets a page may read: ``[low, high)`` from the time range, the
    cursor and the partition's start and (stable) end."""
    consumer.assign(tps)
    starts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    low = {tp.partition: starts[tp] for tp in tps}
    high = {tp.partition: ends[tp] for tp in tps}
    if query.since_ms is not None:
        found = await consumer.offsets_for_times(dict.fromkeys(tps, query.since_ms))
        for tp, at in found.items():
            low[tp.partition] = at.offset if at is not None else ends[tp]
    if query.until_ms is not None:
        found = await consumer.offsets_for_times(dict.fromkeys(tps, query.until_ms))
        for tp, at in found.items():
            high[tp.partition] = at.offset if at is not None else ends[tp]
    for p, at in (query.cursor or {}).items():
        if p in high:
            high[p] = min(high[p], at)
    return low, high


async def _read_range(
    consumer: AIOKafkaConsumer, tp: TopicPartition, begin: int, end: int
) -> list[DeadLetterRecord]:
    """The records of ``tp`` at offsets ``[begin, end)`` (transaction markers leave gaps)."""
    consumer.seek(tp, begin)
    out: list[DeadLetterRecord] = []
    deadline = time.monotonic() + 10  # ends are stable offsets: this only guards a stall
    while await consumer.position(tp) < end and time.monotonic() < deadline:
        batch = await consumer.getmany(tp, timeout_ms=1000)
        out.extend(DeadLetterRecord.of(r) for r in batch.get(tp, []) if r.offset < end)
    return out


def _in_time(record: DeadLetterRecord, query: PageQuery) -> bool:
    if query.since_ms is not None and record.timestamp < query.since_ms:
        return False
    return query.until_ms is None or record.timestamp < query.until_ms


def _row(
    pipeline: Pipeline, node: StageNode, record: DeadLetterRecord, replayed: set[int]
) -> dict[str, Any]:
    value = decode_value(pipeline, node, record.value)
    return {
        "at": f"{record.partition}@{record.offset}",
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": None if record.key is None else record.key.decode("utf-8", "replace"),
        "error_class": record.error_class,
        "error_message": record.error_message,
        "attempts": record.attempts,
        "origin": list(record.origin) if record.origin else None,
        "value": value if isinstance(value, (dict, list)) else str(value),
        "headers": {k: v.decode("utf-8", "replace") for k, v in record.headers},
        "replayed": (record.partition << 40 | record.offset) in replayed,
    }
