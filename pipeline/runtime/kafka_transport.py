"""The stage worker's transport on aiokafka: at-least-once or exactly-once.

At-least-once: one idempotent producer (acks=all). :meth:`KafkaTransport.commit` makes the
outputs durable, then the state changelog, then commits the offsets: a crash in between
replays records whose outputs exist (the next stage's dedup table drops them) but never
records state for outputs that do not exist.

Exactly-once: one transactional producer per input partition
(:mod:`pipeline.runtime.transactions`): outputs, changelog and offsets of a partition commit in
one transaction; a fence stops the worker.

The consumer never resets its position silently (``auto_offset_reset="none"``): a partition the
group never committed starts at its beginning, and a position below the log start or past its
end is raised as :class:`~pipeline.errors.OffsetOutOfRangeError` for the worker's
:class:`~pipeline.runtime.offsets.OffsetReset` policy to decide.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kerr
from aiokafka.structs import TopicPartition as KafkaTP

from pipeline.errors import OffsetOutOfRangeError
from pipeline.runtime.diagnose import explain
from pipeline.runtime.kafka import BatchWriter, Listener, abandon, partition_for, translate
from pipeline.runtime.offsets import out_of_range
from pipeline.runtime.transactions import PartitionProducers, stop_within
from pipeline.runtime.transport import Batching, RebalanceCallback
from pipeline.security import Bootstrap, Connection, connection

log = logging.getLogger(__name__)

_PARTITION_CACHE_LIMIT = 200_000
_STOP_TIMEOUT_S = 15.0  # per client, when a stage stops


class KafkaTransport:
    """One consumer in the stage's group and its producer(s).

    Args:
        bootstrap: Bootstrap servers, or a :class:`~pipeline.security.Connection`.
        group: The stage's consumer group.
        input_topic: The topic the stage reads.
        state_topic: The stage's changelog topic.
        exactly_once: Transactions per input partition instead of an idempotent producer.
        batching: Fetch and produce batch sizes.
        session_timeout_ms: How long the group waits for a silent member.
        advertise: The worker's HTTP surface, told to the group in the consumer's client id
            (``<group>@<url>``), where ``pipeline status`` finds each member's health.
    """

    def __init__(
        self,
        bootstrap: Bootstrap,
        *,
        group: str,
        input_topic: str,
        state_topic: str,
        exactly_once: bool = False,
        batching: Batching = Batching(),
        session_timeout_ms: int = 10_000,
        read_committed: bool = False,
        advertise: str | None = None,
    ) -> None:
        self.connection = connection(bootstrap)
        self.bootstrap = self.connection.bootstrap
        self.group = group
        self.input_topic = input_topic
        self.state_topic = state_topic
        self.exactly_once = exactly_once
        self.batching = batching
        self._consumer = AIOKafkaConsumer(
            **self.connection.client_args(),
            group_id=group,
            client_id=group if advertise is None else f"{group}@{advertise}",
            enable_auto_commit=False,
            # Never jump silently: a missing commit is handled in fetch(), an out-of-range
            # position goes to the worker's OffsetReset policy.
            auto_offset_reset="none",
            isolation_level="read_committed"
            if exactly_once or read_committed
            else "read_uncommitted",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(1000, session_timeout_ms // 4),
            max_poll_records=batching.max_records,
            fetch_max_wait_ms=batching.fetch_wait_ms,
            fetch_min_bytes=batching.fetch_min_bytes,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            # A topic created just before the stage starts may be missing from the first
            # metadata answer; refresh soon rather than after aiokafka's default 5 minutes.
            metadata_max_age_ms=5_000,
        )
        self._producer = self._new_producer(None)  # at-least-once writes; metadata in EOS
        self._writer = BatchWriter(self._producer)
        self._state_writer = BatchWriter(self._producer)
        self._txn = PartitionProducers(  # exactly-once: a producer per input partition
            self._new_producer, input_topic=input_topic, group=group, state_topic=state_topic,
            rewind=self.rewind, member=self._member,
        )  # fmt: skip
        self._partitions: dict[str, int] = {}
        self._ahead: list[tuple[list[Any], list[Any]]] = []  # sent before their commit
        self._part_cache: dict[tuple[str, bytes], int] = {}
        self._started: list[Any] = []

    def _new_producer(self, partition: int | None) -> AIOKafkaProducer:
        txn_id = None if partition is None else f"{self.group}.{self.input_topic}.{partition}"
        return AIOKafkaProducer(
            **self.connection.client_args(),
            client_id=self.group,
            acks="all",
            enable_idempotence=True,
            transactional_id=txn_id,
            linger_ms=self.batching.linger_ms,
            max_batch_size=self.batching.max_batch_bytes,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, on_revoked: RebalanceCallback, on_assigned: RebalanceCallback) -> None:
        try:
            await self._producer.start()
            self._started.append(self._producer)
            await self._consumer.start()
            self._started.append(self._consumer)
            self._consumer.subscribe([self.input_topic], listener=Listener(on_revoked, on_assigned))
        except Exception as exc:
            await self.stop()
            if isinstance(exc, kerr.KafkaError):
                raise await explain(
                    self.connection, exc, f"starting the Kafka clients of group {self.group}"
                ) from exc
            raise translate(exc, "starting the stage's Kafka clients", group=self.group) from exc

    async def stop(self) -> None:
        await self._txn.close()
        while self._started:
            client = self._started.pop()
            await stop_within(client, _STOP_TIMEOUT_S, f"a Kafka client of group {self.group}")

    async def claim(self, partition: int) -> None:
        """Take ownership of an input partition (EOS: start its transactional producer).

        Starting the producer fences an older instance that used the same transactional id
        and completes or aborts its open transaction, so the changelog read next is final.
        """
        if self.exactly_once:
            await self._txn.claim(partition)

    async def release(self, partition: int) -> None:
        """Give up an input partition (EOS: close its producer; nothing open is committed)."""
        await self._txn.release(partition)

    async def lag(self) -> dict[int, int]:
        """Records behind the end (the high watermark of the last fetch) per owned partition."""
        consumer, behind = self._consumer, {}
        for tp in list(consumer.assignment()):
            end = consumer.highwater(tp)
            if end is None:
                continue
            try:
                position = await consumer.position(tp)
            except kerr.KafkaError:  # no position yet (just assigned): unknown, not zero
                continue
            behind[tp.partition] = max(0, end - position)
        return behind

    def connected(self) -> bool:
        """Whether the consumer holds a live connection to any broker now.

        Reads aiokafka's connection table (no public API says this): the consumer long-polls
        fetches and heartbeats, so a healthy stage is never without one for long.
        """
        conns = getattr(self._consumer._client, "_conns", None)
        if conns is None:
            return True
        return any(conn.connected() for conn in list(conns.values()))

    def member(self) -> bool:
        """Whether the group still knows this member (see :meth:`_member`)."""
        return self._member()

    def _member(self) -> bool:
        """Whether the group still knows this member (aiokafka resets its id when the group
        answered that its session expired)."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        return coordinator is None or getattr(coordinator, "member_id", "x") != ""

    # -- reading ---------------------------------------------------------------------------

    async def fetch(self, timeout_ms: int, max_records: int) -> Mapping[Any, list[Any]]:
        """The next records by partition.

        Raises:
            OffsetOutOfRangeError: A partition's position is outside its log (the worker's
                policy decides; nothing was skipped).
        """
        consumer = self._consumer
        try:
            result: Mapping[Any, list[Any]] = await consumer.getmany(
                timeout_ms=timeout_ms, max_records=max_records
            )
        except kerr.NoOffsetForPartitionError as exc:
            # The group never committed this partition: a new stage reads it from the start.
            for tp in exc.args:
                if isinstance(tp, KafkaTP) and tp in consumer.assignment():
                    await consumer.seek_to_beginning(tp)
            return {}
        except kerr.OffsetOutOfRangeError as exc:
            positions = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            for tp, position in positions.items():
                start = (await consumer.beginning_offsets([tp]))[tp]
                end = (await consumer.end_offsets([tp]))[tp]
                raise out_of_range(
                    tp.topic, tp.partition, position=position, start=start, end=end,
                    group=self.group,
                ) from None  # fmt: skip
            raise translate(
                exc, "fetching records", topic=self.input_topic, group=self.group, operation="READ"
            ) from exc
        except kerr.KafkaError as exc:
            raise translate(
                exc, "fetching records", topic=self.input_topic, group=self.group, operation="READ"
            ) from exc
        return result

    def assignment(self) -> set[Any]:
        return set(self._consumer.assignment())

    def seek(self, partition: int, offset: int) -> None:
        """Read an input partition from ``offset`` next."""
        self._consumer.seek(KafkaTP(self.input_topic, partition), offset)

    async def out_of_range(self, partitions: list[int]) -> list[OffsetOutOfRangeError]:
        """Those of ``partitions`` whose committed offset is outside the log now."""
        consumer, gaps = self._consumer, []
        tps = [KafkaTP(self.input_topic, p) for p in partitions]
        if not tps:
            return []
        try:
            starts = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                committed = await consumer.committed(tp)
                if committed is not None and not starts[tp] <= committed <= ends[tp]:
                    gap = out_of_range(
                        tp.topic, tp.partition, position=committed, start=starts[tp],
                        end=ends[tp], group=self.group,
                    )  # fmt: skip
                    gaps.append(gap)
        except kerr.KafkaError as exc:
            raise translate(exc, "reading offsets", topic=self.input_topic) from exc
        return gaps

    def pause(self) -> None:
        """Fetch nothing more from the owned partitions; polls keep the member in its group."""
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        """Fetch from every owned partition again."""
        self._consumer.resume(*self._consumer.assignment())

    async def rewind(self, partition: int) -> None:
        """Seek an input partition back to its committed offset (after a lost transaction)."""
        tp = KafkaTP(self.input_topic, partition)
        try:
            committed = await self._consumer.committed(tp)
            if committed is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, committed)
        except kerr.KafkaError as exc:
            raise translate(exc, "reading the committed offset", partition=partition) from exc

    def restore(
        self, partition: int, start: int
    ) -> AsyncIterator[list[tuple[bytes, bytes | None]]]:
        """The changelog records of ``partition`` from offset ``start`` to its current end."""
        return read_changelog(
            self.connection, self.state_topic, partition, start, read_committed=self.exactly_once
        )

    async def state_end(self, partition: int) -> int:
        """The changelog's end offset for ``partition`` (a checkpoint for local stores)."""
        tp = KafkaTP(self.state_topic, partition)
        try:
            return int((await self._consumer.end_offsets([tp]))[tp])
        except kerr.KafkaError as exc:
            raise translate(exc, "reading the changelog's end", partition=partition) from exc

    # -- writing ---------------------------------------------------------------------------

    async def prepare_topic(self, topic: str) -> int:
        """Learn ``topic``'s partition count before writing to it."""
        try:
            parts = await self._producer.partitions_for(topic)
        except kerr.KafkaError as exc:
            raise translate(exc, "reading topic metadata", topic=topic) from exc
        count = len(parts)
        self._partitions[topic] = count
        return count

    def partition_for(self, topic: str, key: bytes | None) -> int:
        """The partition of ``key`` in ``topic`` (cached: keys repeat, murmur2 is Python)."""
        if key is None:
            return 0
        cache_key = (topic, key)
        part = self._part_cache.get(cache_key)
        if part is None:
            if len(self._part_cache) > _PARTITION_CACHE_LIMIT:
                self._part_cache.clear()
            part = self._part_cache[cache_key] = partition_for(key, self._partitions[topic])
        return part

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]],
        timestamp: int | None,
        source: int,
    ) -> None:
        """Buffer an output of a record read from input partition ``source``."""
        if self.exactly_once:
            self._txn.writer(source).append(topic, partition, key, value, headers, timestamp)
        else:
            self._writer.append(topic, partition, key, value, headers, timestamp)

    async def send_ahead(self) -> None:
        """At-least-once: hand the outputs buffered so far to the producer now, instead of
        when their commit starts (after the commit in flight); the commit still waits for
        their acknowledgements before it writes state and offsets. Outputs leave a stage a
        commit's round trips sooner. Exactly-once: nothing (outputs go in the transaction)."""
        if self.exactly_once or not self._writer.buffered:
            return
        batches = self._writer.take()
        self._ahead.append((batches, await self._writer.dispatch(batches)))

    def discard(self, partition: int) -> None:
        """Drop what is buffered for input partition ``partition`` (its transaction was lost;
        at-least-once: a failed commit, and every partition is read again)."""
        if self.exactly_once:
            self._txn.discard(partition)
        else:
            self._writer.discard()
            for _batches, futures in self._ahead:  # sent already: their outcome is moot
                abandon(futures)
            self._ahead = []
            self._state_writer.discard()

    async def read_from(self, partitions: list[int]) -> dict[int, tuple[int, str]]:
        """The committed offset and its metadata per partition, or the log start and ``""``
        where the group never committed (a new stage reads from the start).

        aiokafka's ``committed()`` drops the metadata; its coordinator's fetch keeps it.
        """
        tps = [KafkaTP(self.input_topic, p) for p in partitions]
        consumer = self._consumer
        try:
            found = await consumer._coordinator.fetch_committed_offsets(tps)
            starts = await consumer.beginning_offsets([tp for tp in tps if tp not in found])
        except kerr.KafkaError as exc:
            raise translate(exc, "reading committed offsets", group=self.group) from exc
        read = {tp.partition: (om.offset, om.metadata or "") for tp, om in found.items()}
        read.update((tp.partition, (offset, "")) for tp, offset in starts.items())
        return read

    async def commit(
        self,
        offsets: Mapping[int, int],
        state: Mapping[int, Mapping[bytes, bytes | None]],
        metadata: Mapping[int, str] | None = None,
    ) -> set[int]:
        """Make buffered outputs and ``state`` durable, then commit ``offsets``.

        Args:
            offsets: Next offset to read, per input partition.
            state: Changelog updates per input partition (None deletes a key).
            metadata: Committed with the offsets, per partition (see
                :mod:`pipeline.runtime.crashes`).

        Returns:
            Input partitions whose transaction was lost (EOS); the caller restores their
            state and processes them again from the committed offset.
        """
        if self.exactly_once:
            return await self._txn.commit(offsets, state, metadata or {})
        # This commit's outputs, taken before any await (records handled from now on belong
        # to the next commit): those sent ahead, and any still buffered.
        ahead, self._ahead = self._ahead, []
        rest = self._writer.take()
        for batches, futures in ahead:
            await self._writer.acknowledged(batches, futures)
        await self._writer.send(rest)
        for partition, updates in state.items():
            for key, value in updates.items():
                self._state_writer.append(self.state_topic, partition, key, value, (), None)
        await self._state_writer.flush()
        await self._commit_offsets(offsets, metadata or {})
        return set()

    async def _commit_offsets(
        self, offsets: Mapping[int, int], metadata: Mapping[int, str]
    ) -> None:
        if not offsets:
            return
        try:
            await self._consumer.commit(
                {KafkaTP(self.input_topic, p): (o, metadata.get(p, "")) for p, o in offsets.items()}
            )
        except kerr.CommitFailedError as exc:
            # The group rebalanced under us: the partitions are someone else's now. Their
            # outputs are durable, so the new owner's redelivery is a duplicate that the next
            # stage's dedup table drops: at-least-once holds.
            log.warning("group %s: commit failed after a rebalance: %s", self.group, exc)
        except kerr.KafkaError as exc:
            raise translate(exc, "committing offsets", group=self.group) from exc


async def read_changelog(
    conn: Connection, topic: str, partition: int, start: int, *, read_committed: bool
) -> AsyncIterator[list[tuple[bytes, bytes | None]]]:
    """The keyed records of a changelog partition from offset ``start`` to its current end,
    a fetched batch at a time (a million records are a few hundred batches, not a million
    steps of an async generator)."""
    reader = AIOKafkaConsumer(
        **conn.client_args(),
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # a checkpoint below the log start reads from it
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        max_poll_records=10_000,
        fetch_max_bytes=16 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    tp = KafkaTP(topic, partition)
    try:
        await reader.start()
        reader.assign([tp])
        end = (await reader.end_offsets([tp]))[tp]
        if start >= end:
            return
        reader.seek(tp, start)
        while await reader.position(tp) < end:
            fetched = (await reader.getmany(tp, timeout_ms=500)).get(tp)
            if not fetched:
                continue
            batch = [(r.key, r.value) for r in fetched if r.key is not None and r.offset < end]
            if batch:
                yield batch
            if fetched[-1].offset >= end - 1:
                return
    except kerr.KafkaError as exc:
        raise translate(exc, "restoring state", topic=topic, partition=partition) from exc
    finally:
        with contextlib.suppress(Exception):
            await reader.stop()
