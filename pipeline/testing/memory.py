"""An in-memory log: the stage worker runs on it in unit tests, without a broker.

:class:`MemoryBroker` holds topics (partitions of offset-numbered records) and the committed
offsets of consumer groups. :class:`MemoryTransport` implements
:class:`~pipeline.runtime.transport.Transport` on it, so a real
:class:`~pipeline.runtime.worker.StageWorker` runs unchanged: it partitions with the Java
client's murmur2, buffers until :meth:`~MemoryTransport.flush`, and resumes a group from its
committed offsets. Where Kafka would accept a call that only a bug makes (writing to a topic
not prepared, committing a partition not owned or past the end of the log), it raises instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import BrokerError, TopicError
from pipeline.runtime.kafka import partition_for as _murmur2_partition
from pipeline.runtime.offsets import out_of_range
from pipeline.runtime.transport import InMessage, RebalanceCallback, TopicPartition, Transport

__all__ = ["MemoryBroker", "MemoryRecord", "MemoryTransport"]

Headers = tuple[tuple[str, bytes], ...]
_Pending = tuple[str, int, bytes | None, bytes | None, Headers, int]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class MemoryRecord:
    """One record of a memory topic, shaped like aiokafka's ``ConsumerRecord``.

    Example:
        >>> MemoryRecord("t", 0, 5, 0, b"k", b"v", (("seq", b"1"),)).header("seq")
        b'1'
    """

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] = ()  # a tuple, as aiokafka delivers them

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or ``None``."""
        return next((v for k, v in reversed(self.headers) if k == name), None)


class MemoryBroker:
    """Topics and committed offsets, in memory.

    Args:
        clock: Milliseconds since the epoch for records written without a timestamp.

    Example:
        >>> broker = MemoryBroker()
        >>> broker.create_topic("orders", 3)
        >>> rec = broker.produce("orders", b"o-1", b"v")
        >>> [r.value for r in broker.records("orders")], rec.offset
        ([b'v'], 0)
    """

    def __init__(self, *, clock: Callable[[], int] = _now_ms) -> None:
        self.clock = clock
        self._topics: dict[str, list[list[MemoryRecord]]] = {}
        self._starts: dict[tuple[str, int], int] = {}  # log start offsets after deletions
        self._committed: dict[tuple[str, str, int], int] = {}
        self._metadata: dict[tuple[str, str, int], str] = {}  # committed with the offsets
        self._waiters: list[asyncio.Future[None]] = []

    def create_topic(self, name: str, partitions: int) -> None:
        """Create ``name``; again with the same partition count is a no-op.

        Raises:
            TopicError: It exists with another partition count, or ``partitions < 1``.
        """
        log = self._topics.get(name)
        if partitions < 1 or (log is not None and len(log) != partitions):
            exists = "" if log is None else f": it exists with {len(log)}"
            raise TopicError(
                f"topic {name} cannot have {partitions} partitions{exists}", topic=name
            )
        if log is None:
            self._topics[name] = [[] for _ in range(partitions)]

    def partitions(self, topic: str) -> int:
        """The partition count of ``topic`` (:class:`TopicError` if there is no such topic)."""
        return len(self._log(topic))

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes]] = (),
        *,
        partition: int | None = None,
        timestamp: int | None = None,
    ) -> MemoryRecord:
        """Write one record, durable at once; by key (murmur2, null key: 0) unless ``partition``."""
        if partition is None:
            count = self.partitions(topic)
            partition = 0 if key is None else _murmur2_partition(key, count)
        return self._write(topic, partition, key, value, tuple(headers), timestamp)

    def records(self, topic: str, partition: int | None = None) -> list[MemoryRecord]:
        """The records of ``topic`` (or one partition), partition by partition, in offset order."""
        parts = self._log(topic)
        wanted = range(len(parts)) if partition is None else [partition]
        return [r for p in wanted for r in parts[p][self.log_start(topic, p) :]]

    def log_start(self, topic: str, partition: int) -> int:
        """The first offset of a partition still in the log."""
        return self._starts.get((topic, partition), 0)

    def delete_records(self, topic: str, partition: int, before: int) -> int:
        """Delete the records below offset ``before`` (as ``kafka-delete-records``); return how
        many went. Offsets stay as they were: the log start moves up."""
        end = len(self._log(topic)[partition])
        start = self.log_start(topic, partition)
        new_start = max(start, min(before, end))
        self._starts[(topic, partition)] = new_start
        return new_start - start

    def end_offsets(self, topic: str) -> dict[int, int]:
        """The next offset to be written, per partition."""
        return {p: len(part) for p, part in enumerate(self._log(topic))}

    def committed(self, group: str, topic: str) -> dict[int, int]:
        """The committed offsets (next to read) of ``group`` in ``topic``, per partition."""
        found = sorted(self._committed.items())
        return {p: o for (g, t, p), o in found if g == group and t == topic}

    def lag(self, group: str, topic: str) -> int:
        """Records of ``topic`` that ``group`` has not committed yet."""
        done = self.committed(group, topic)
        return sum(end - done.get(p, 0) for p, end in self.end_offsets(topic).items())

    def _log(self, topic: str) -> list[list[MemoryRecord]]:
        log = self._topics.get(topic)
        if log is None:
            known = ", ".join(sorted(self._topics)) or "none"
            raise TopicError(f"topic {topic} does not exist; topics: {known}", topic=topic)
        return log

    def _write(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Headers,
        timestamp: int | None,
    ) -> MemoryRecord:
        log = self._log(topic)
        if not 0 <= partition < len(log):
            raise TopicError(f"topic {topic} has no partition {partition}", topic=topic)
        for what, data in (("key", key), ("value", value), *headers):  # as aiokafka checks
            if data is not None and not (isinstance(data, bytes) and isinstance(what, str)):
                raise TypeError(f"{topic}: {what!r} must be bytes, not {type(data).__name__}")
        ts = self.clock() if timestamp is None else timestamp
        record = MemoryRecord(topic, partition, len(log[partition]), ts, key, value, headers)
        log[partition].append(record)
        waiters, self._waiters = self._waiters, []
        for fut in waiters:  # wake fetches that wait for records
            if not fut.done():
                fut.set_result(None)
        return record

    async def _wait_for_records(self, seconds: float) -> None:
        """Return when records are written, or after ``seconds``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait([fut], timeout=seconds)
        finally:
            fut.cancel()  # a no-op once resolved; leaves no pending future behind


class MemoryTransport:
    """The :class:`~pipeline.runtime.transport.Transport` of one group member on a broker.

    The member owns every partition of the input topic (one consumer per group);
    :meth:`rebalance` moves partitions as a real group would.

    Args:
        broker: The broker.
        group: The consumer group; a new transport of the same group resumes from its commits.
        input_topic: The topic to consume.
        max_wait_ms: Upper bound of one empty :meth:`fetch`, so a stopped worker exits soon.

    Example:
        >>> broker = MemoryBroker()
        >>> broker.create_topic("in", 1)
        >>> MemoryTransport(broker, group="g", input_topic="in").commits
        []
    """

    def __init__(
        self,
        broker: MemoryBroker,
        *,
        group: str,
        input_topic: str,
        state_topic: str | None = None,
        max_wait_ms: int = 10,
    ) -> None:
        self.broker = broker
        self.group = group
        self.input_topic = input_topic
        self.state_topic = state_topic
        self.max_wait_ms = max_wait_ms
        self.commits: list[dict[TopicPartition, int]] = []  # every commit, in order
        self.flushes = 0
        self._started = False
        self._positions: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._prepared: dict[str, int] = {}
        self._pending: list[_Pending] = []
        self._on_revoked: RebalanceCallback | None = None
        self._on_assigned: RebalanceCallback | None = None

    async def start(self, on_revoked: RebalanceCallback, on_assigned: RebalanceCallback) -> None:
        """Join the group: own every partition of the input topic, from the committed offsets."""
        count = self.broker.partitions(self.input_topic)
        self._on_revoked, self._on_assigned = on_revoked, on_assigned
        self._started = True
        await self._assign(range(count))

    async def stop(self) -> None:
        """Leave the group; records appended but not flushed are lost (as on a crash)."""
        self._started = False
        self._positions, self._pending = {}, []

    async def claim(self, partition: int) -> None:
        """Take an input partition (nothing to fence in memory)."""

    async def release(self, partition: int) -> None:
        """Give up an input partition."""

    async def rewind(self, partition: int) -> None:
        """Read ``partition`` again from the group's committed offset."""
        done = self.broker.committed(self.group, self.input_topic)
        start = self.broker.log_start(self.input_topic, partition)  # never committed: earliest
        self._positions[TopicPartition(self.input_topic, partition)] = done.get(partition, start)

    async def restore(
        self, partition: int, start: int
    ) -> AsyncIterator[list[tuple[bytes, bytes | None]]]:
        """The state changelog records of ``partition`` from ``start`` to its end, in
        batches of up to 1,000."""
        if self.state_topic is None or self.state_topic not in self.broker._topics:
            return
        batch: list[tuple[bytes, bytes | None]] = []
        for record in self.broker.records(self.state_topic, partition):
            if record.offset >= start and record.key is not None:
                batch.append((record.key, record.value))
                if len(batch) >= 1000:
                    yield batch
                    batch = []
        if batch:
            yield batch

    async def state_end(self, partition: int) -> int:
        """The end offset of the state changelog's ``partition``."""
        if self.state_topic is None or self.state_topic not in self.broker._topics:
            return 0
        return self.broker.end_offsets(self.state_topic)[partition]

    async def send_ahead(self) -> None:
        """Nothing: outputs become visible at their commit (tests count them there)."""

    def discard(self, partition: int) -> None:
        """Nothing to drop: the memory log never loses a commit."""

    async def rebalance(self, partitions: Iterable[int]) -> None:
        """Move the assignment to ``partitions`` of the input topic, as an eager rebalance does.

        The revocation callback sees the old assignment (and may still commit it); each newly
        assigned partition is read again from the group's committed offset.
        """
        self._check_started("rebalance")
        old = self.assignment()
        if old and self._on_revoked is not None:
            await self._on_revoked(old)
        self._positions, self._paused = {}, set()
        await self._assign(partitions)

    async def _assign(self, partitions: Iterable[int]) -> None:
        done = self.broker.committed(self.group, self.input_topic)
        count = self.broker.partitions(self.input_topic)
        for p in partitions:
            if not 0 <= p < count:
                raise TopicError(f"topic {self.input_topic} has no partition {p}")
            start = self.broker.log_start(self.input_topic, p)
            self._positions[TopicPartition(self.input_topic, p)] = done.get(p, start)
        if self._on_assigned is not None:
            await self._on_assigned(self.assignment())

    async def fetch(self, timeout_ms: int, max_records: int) -> Mapping[Any, list[Any]]:
        """Up to ``max_records`` visible records, partition by partition in offset order."""
        self._check_started("fetch")
        await asyncio.sleep(0)  # a real fetch always lets other tasks run
        batches = self._take(max_records)
        if not batches:
            await self.broker._wait_for_records(min(timeout_ms, self.max_wait_ms) / 1000)
            batches = self._take(max_records)
        return batches

    def _take(self, room: int) -> dict[TopicPartition, list[MemoryRecord]]:
        batches: dict[TopicPartition, list[MemoryRecord]] = {}
        for tp in sorted(self._positions):
            if tp in self._paused:
                continue
            start = self._positions[tp]
            log_start = self.broker.log_start(tp.topic, tp.partition)
            end = len(self.broker._log(tp.topic)[tp.partition])
            if not log_start <= start <= end:  # as Kafka answers OFFSET_OUT_OF_RANGE
                raise out_of_range(
                    tp.topic, tp.partition, position=start, start=log_start, end=end,
                    group=self.group,
                )  # fmt: skip
            msgs = self.broker._log(tp.topic)[tp.partition][start : start + max(room, 0)]
            if msgs:
                batches[tp] = msgs
                self._positions[tp] = start + len(msgs)
                room -= len(msgs)
        return batches

    def connected(self) -> bool:
        return True

    def member(self) -> bool:
        return self._on_revoked is not None

    async def lag(self) -> dict[int, int]:
        ends = self.broker.end_offsets(self.input_topic)
        return {tp.partition: ends[tp.partition] - pos for tp, pos in self._positions.items()}

    def assignment(self) -> set[Any]:
        """The input partitions this member owns."""
        return set(self._positions)

    def caught_up(self) -> bool:
        """Whether every owned partition was fetched to its end (nothing left to read)."""
        ends = {tp: len(self.broker._log(tp.topic)[tp.partition]) for tp in self._positions}
        return all(self._positions[tp] >= end for tp, end in ends.items())

    async def out_of_range(self, partitions: list[int]) -> list[Any]:
        """Those of ``partitions`` whose committed offset is outside the log now."""
        done = self.broker.committed(self.group, self.input_topic)
        gaps = []
        for p in partitions:
            start = self.broker.log_start(self.input_topic, p)
            end = len(self.broker._log(self.input_topic)[p])
            if p in done and not start <= done[p] <= end:
                gap = out_of_range(
                    self.input_topic, p, position=done[p], start=start, end=end,
                    group=self.group,
                )  # fmt: skip
                gaps.append(gap)
        return gaps

    def seek(self, partition: int, offset: int) -> None:
        """Read ``partition`` from ``offset`` next."""
        self._positions[TopicPartition(self.input_topic, partition)] = offset

    def pause(self) -> None:
        """Fetch nothing from the owned partitions until :meth:`resume`."""
        self._paused = set(self._positions)

    def resume(self) -> None:
        """Fetch from every owned partition again."""
        self._paused = set()

    async def prepare_topic(self, topic: str) -> int:
        """Learn ``topic``'s partition count (:class:`TopicError` if it is missing)."""
        count = self._prepared[topic] = self.broker.partitions(topic)
        return count

    def partition_for(self, topic: str, key: bytes | None) -> int:
        """The partition of ``key`` in ``topic`` (murmur2, as the Java client; null key: 0)."""
        return 0 if key is None else _murmur2_partition(key, self._count(topic))

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        timestamp: int | None,
        source: int = 0,
    ) -> None:
        """Buffer one record; it becomes visible on :meth:`commit`."""
        if not 0 <= partition < self._count(topic):
            raise TopicError(f"topic {topic} has no partition {partition}", topic=topic)
        ts = self.broker.clock() if timestamp is None else timestamp
        self._pending.append((topic, partition, key, value, tuple(headers), ts))

    async def flush(self) -> None:
        """Make every buffered record visible (durable), in append order."""
        # Swap before the first await, as the Kafka writer does: later appends go to the next
        # flush (the concurrent worker relies on this).
        pending, self._pending = self._pending, []
        for topic, partition, key, value, headers, ts in pending:
            self.broker._write(topic, partition, key, value, headers, ts)
        self.flushes += 1
        await asyncio.sleep(0)

    async def read_from(self, partitions: list[int]) -> dict[int, tuple[int, str]]:
        """The committed offset and its metadata per partition, or the log start and ``""``."""
        found = {}
        for p in partitions:
            at = (self.group, self.input_topic, p)
            if at in self.broker._committed:
                found[p] = (self.broker._committed[at], self.broker._metadata.get(at, ""))
            else:
                found[p] = (self.broker.log_start(self.input_topic, p), "")
        return found

    async def commit(
        self,
        offsets: Mapping[int, int],
        state: Mapping[int, Mapping[bytes, bytes | None]],
        metadata: Mapping[int, str] | None = None,
    ) -> set[int]:
        """Make outputs, then ``state``, visible; then store the next offsets to read (with
        ``metadata`` per partition, as Kafka keeps it).

        Raises:
            BrokerError: A partition is not owned, or an offset is past the end of the log.
        """
        self._check_started("commit")
        await self.flush()
        if state and self.state_topic is None:
            raise BrokerError("state written, but the transport has no state topic")
        for partition, updates in state.items():
            for key, value in updates.items():
                assert self.state_topic is not None
                self.broker._write(self.state_topic, partition, key, value, (), self.broker.clock())
        checked = {TopicPartition(self.input_topic, p): o for p, o in offsets.items()}
        for tp, offset in checked.items():
            if tp not in self._positions:
                raise BrokerError(f"commit of {tp.topic}/{tp.partition}@{offset}: not assigned")
            end = self.broker.end_offsets(tp.topic)[tp.partition]
            if not 0 <= offset <= end:
                raise BrokerError(f"commit of {tp.topic}/{tp.partition}@{offset}: its end is {end}")
        for tp, offset in checked.items():
            at = (self.group, tp.topic, tp.partition)
            self.broker._committed[at] = offset
            self.broker._metadata[at] = (metadata or {}).get(tp.partition, "")
        if checked:
            self.commits.append(checked)
        await asyncio.sleep(0)
        return set()

    def _count(self, topic: str) -> int:
        count = self._prepared.get(topic)
        if count is None:
            raise TopicError(f"{topic} is written before prepare_topic({topic!r})", topic=topic)
        return count

    def _check_started(self, what: str) -> None:
        if not self._started:
            raise BrokerError(f"{what} on a memory transport that is not started", group=self.group)


if TYPE_CHECKING:  # mypy proves that the memory transport fits the worker's interface

    def _fits_transport(transport: MemoryTransport) -> Transport:
        return transport

    def _fits_message(record: MemoryRecord) -> InMessage:
        return record
