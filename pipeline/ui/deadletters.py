"""The dashboard's dead letters: counts kept live, pages read on demand, replays in the background.

A dead-letter topic may hold millions of records; none of this keeps records in memory:

- :class:`DlqIndex` reads every dead-letter topic of the pipeline once from its start and then
  follows it (one consumer, ``read_committed``, headers only): counts by error class, per
  10 seconds by error class, and the dead letters that replay receipts (``P.S.dlq.replays``) say
  were replayed. Until it has caught up, its summary says how far it got.
- :class:`DlqBrowser` reads one page of a stage's dead letters, newest first, matching a
  :class:`~pipeline.dlq.Where` and a time range: it reads each partition backwards from a
  cursor in growing windows, merging the partitions by time, until a page is full or a scan
  budget is spent (then the page says so, and the next page goes on from where it stopped).
- :class:`ReplayRuns` runs :func:`pipeline.dlq.replay` (the code behind ``pipeline dlq
  replay``) in the background, a dry run first to count what would go, and reports progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka import errors as kerr
from aiokafka.structs import TopicPartition

from pipeline.dlq import DeadLetterRecord, Where, decode_value, new_replay_id, replay
from pipeline.dsl import Pipeline, StageNode
from pipeline.errors import PipelineError
from pipeline.runtime import deadletter as dl
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import translate
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
        self.counts = {n.dlq_topic: TopicCounts(n.dlq_topic) for n in nodes}
        self._receipts = {receipts_topic_of(t): t for t in self.counts}
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


def receipts_topic_of(dlq_topic: str) -> str:
    return f"{dlq_topic}.replays"


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


@dataclass(slots=True)
class ReplayRun:
    """One replay (or dry run) started from the dashboard, and how far it got."""

    id: str
    stage: str
    lane: str | None
    where: str
    dry_run: bool
    state: str = "running"  # running, done, failed
    read: int = 0
    total: int = 0
    report: dict[str, Any] | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "stage": self.stage, "lane": self.lane, "where": self.where,
            "dry_run": self.dry_run, "state": self.state, "read": self.read,
            "total": self.total, "report": self.report, "error": self.error,
        }  # fmt: skip


class ReplayRuns:
    """Replays started from the dashboard, run one at a time per stage in the background."""

    def __init__(
        self, bootstrap: Bootstrap, keep: int = 100, on_done: Callable[[], None] | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self._on_done = on_done
        self.runs: dict[str, ReplayRun] = {}
        self._keep = keep
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def start(self, pipeline: Pipeline, node: StageNode, where: Where, dry_run: bool) -> ReplayRun:
        """Start a replay of ``node``'s dead letters matching ``where`` (``dry_run``: count)."""
        run = ReplayRun(new_replay_id(), node.name, node.lane, str(where), dry_run)
        self.runs[run.id] = run
        while len(self.runs) > self._keep:
            self.runs.pop(next(iter(self.runs)))
        task = asyncio.create_task(self._run(run, pipeline, node, where))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return run

    async def _run(self, run: ReplayRun, pipeline: Pipeline, node: StageNode, where: Where) -> None:
        def progress(read: int, total: int) -> None:
            run.read, run.total = read, total

        lock = self._locks.setdefault(node.dlq_topic, asyncio.Lock())
        try:
            async with lock:  # two replays of one stage at once would race for the same records
                report = await replay(
                    self.bootstrap, pipeline, node.name, where=where, dry_run=run.dry_run,
                    progress=progress, replay_id=run.id, lane=node.lane,
                )  # fmt: skip
            run.report, run.state = report.as_dict(), "done"
            if self._on_done is not None:
                self._on_done()
        except PipelineError as exc:
            run.error, run.state = str(exc), "failed"
        except Exception as exc:  # shown on the page: a replay must never fail silently
            log.exception("replay %s failed", run.id)
            run.error, run.state = f"{type(exc).__name__}: {exc}", "failed"

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


__all__ = [
    "DlqBrowser",
    "DlqIndex",
    "Page",
    "PageQuery",
    "ReplayRun",
    "ReplayRuns",
    "TopicCounts",
]
