"""Exactly-once: one transactional producer per input partition of a stage.

The transactional id is ``<group>.<topic>.<partition>``. Claiming a partition starts its
producer, which fences any older instance (a zombie) still holding that id and completes or
aborts its open transaction, so the changelog read next is final. Outputs, changelog and the
offset of a partition commit in one transaction.

What can go wrong, and what happens:

- the producer is fenced (another instance claimed the partition), or aiokafka's transaction
  manager is in its fatal state: :class:`~pipeline.errors.FencedError`, on whatever step sees
  it first (a new transaction, a send, the commit); the worker stops;
- the commit's outcome is unknown (a timeout, a lost connection): never abort blindly. While
  the worker is still a member of its group, the producer is recreated (which completes or
  aborts the pending transaction) and the partition rewound to its committed offset. When the
  group has forgotten this member (its session expired), recreating the producer would fence
  the instance that owns the partition now, so the worker stops instead;
- another broker error: the transaction is aborted and the partition rewound.

A released producer is closed without waiting for what it buffered: an uncommitted
transaction is void, and a fenced producer could otherwise wait out its delivery timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kerr
from aiokafka.structs import TopicPartition as KafkaTP

from pipeline.errors import AuthorizationError, BrokerError, FencedError
from pipeline.runtime.kafka import FENCED, BatchWriter, translate

log = logging.getLogger("pipeline.runtime.kafka_transport")

_UNKNOWN_OUTCOME = (
    kerr.KafkaTimeoutError,
    kerr.RequestTimedOutError,
    kerr.KafkaConnectionError,
    kerr.NodeNotReadyError,
)
_CLOSE_TIMEOUT = 10.0


async def stop_within(client: Any, seconds: float, what: str) -> None:
    """``await client.stop()``, given up after ``seconds`` (logged): stopping is best effort,
    and a client stuck in a broker exchange (a zombie's consumer in a rejoin) must not keep a
    stopping stage alive."""
    try:
        await asyncio.wait_for(client.stop(), seconds)
    except TimeoutError:
        log.warning("%s did not stop within %.0fs; leaving it", what, seconds)
    except Exception as exc:
        log.debug("stopping %s: %s", what, exc)


async def close_producer(producer: AIOKafkaProducer) -> None:
    """Stop ``producer`` without delivering what it buffered (within a bounded time)."""
    with contextlib.suppress(Exception):
        producer._message_accumulator.fail_all(kerr.ProducerClosed())
    await stop_within(producer, _CLOSE_TIMEOUT, "a transactional producer")


class PartitionProducers:
    """The transactional producers of one stage worker, one per owned input partition.

    Args:
        new_producer: Makes the producer of an input partition (its transactional id).
        input_topic: The topic the stage reads.
        group: The stage's consumer group.
        state_topic: The stage's changelog.
        rewind: Seeks an input partition back to its committed offset.
        member: Whether the worker is still a member of its group.
    """

    def __init__(
        self,
        new_producer: Callable[[int], AIOKafkaProducer],
        *,
        input_topic: str,
        group: str,
        state_topic: str,
        rewind: Callable[[int], Awaitable[None]],
        member: Callable[[], bool],
    ) -> None:
        self._new_producer = new_producer
        self.input_topic = input_topic
        self.group = group
        self.state_topic = state_topic
        self._rewind = rewind
        self._member = member
        self._owned: dict[int, tuple[AIOKafkaProducer, BatchWriter]] = {}

    def __contains__(self, partition: int) -> bool:
        return partition in self._owned

    def partitions(self) -> list[int]:
        return list(self._owned)

    def writer(self, partition: int) -> BatchWriter:
        """Where outputs of records read from ``partition`` are buffered."""
        return self._owned[partition][1]

    async def claim(self, partition: int) -> None:
        """Start the producer of ``partition`` (fencing any older holder of its id)."""
        if partition in self._owned:
            return
        producer = self._new_producer(partition)
        try:
            await producer.start()
        except kerr.KafkaError as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise translate(exc, "starting a transactional producer", partition=partition) from exc
        self._owned[partition] = (producer, BatchWriter(producer))

    async def release(self, partition: int) -> None:
        """Close the producer of ``partition``; nothing of an open transaction commits."""
        entry = self._owned.pop(partition, None)
        if entry is not None:
            await close_producer(entry[0])

    def discard(self, partition: int) -> None:
        """Drop what is buffered for ``partition`` (its transaction was lost)."""
        entry = self._owned.get(partition)
        if entry is not None:
            entry[1].discard()

    async def commit(
        self,
        offsets: Mapping[int, int],
        state: Mapping[int, Mapping[bytes, bytes | None]],
        metadata: Mapping[int, str],
    ) -> set[int]:
        """One transaction per partition: its outputs, its changelog updates, its offset.

        Returns:
            Partitions whose transaction was lost (rewound; the caller restores their state).
        """
        # Take every partition's snapshot before the first await: records handled while the
        # transactions run belong to the next commit.
        snapshots = {}
        for partition in sorted(self._owned):  # offsets of released partitions are void
            writer = self._owned[partition][1]
            for key, value in state.get(partition, {}).items():
                writer.append(self.state_topic, partition, key, value, (), None)
            snapshots[partition] = writer.take()
        lost = set()
        for partition, batches in snapshots.items():
            if not batches and partition not in offsets:
                continue
            offset = offsets.get(partition)
            marked = None if offset is None else (offset, metadata.get(partition, ""))
            if not await self._commit_one(partition, marked, batches):
                lost.add(partition)
        return lost

    async def _commit_one(
        self, partition: int, offset: tuple[int, str] | None, batches: list[tuple[Any, str, int]]
    ) -> bool:
        entry = self._owned.get(partition)
        if entry is None:  # released meanwhile (revoked): its new owner reads it again
            return False
        producer, writer = entry
        ok = False
        try:
            ok = await self._transaction(producer, writer, batches, partition, offset)
            return ok
        finally:
            if not ok:  # nothing buffered for a lost transaction may leak into the next
                writer.discard()

    async def _transaction(
        self,
        producer: AIOKafkaProducer,
        writer: BatchWriter,
        batches: list[tuple[Any, str, int]],
        partition: int,
        offset: tuple[int, str] | None,
    ) -> bool:
        try:
            if producer._txn_manager.is_fatal_error():  # fenced earlier, e.g. by a send
                raise kerr.ProducerFenced()
            await producer.begin_transaction()
            await writer.send(batches)
            if offset is not None:
                await producer.send_offsets_to_transaction(
                    {KafkaTP(self.input_topic, partition): offset}, self.group
                )
            await producer.commit_transaction()
            return True
        except (*FENCED, FencedError) as exc:
            raise self.fenced(partition) from exc
        except BrokerError as exc:
            # aiokafka's "not in transaction" on a send right after begin_transaction: its
            # transaction manager was reset under us. A zombie (fenced, or forgotten by its
            # group) stops; a member abandons this transaction and reads the partition again.
            if isinstance(exc, AuthorizationError):  # an ACL denied a write: nothing commits
                with contextlib.suppress(Exception):
                    await producer.abort_transaction()
                raise
            if not isinstance(exc.__cause__, kerr.IllegalOperation):
                raise
            if producer._txn_manager.is_fatal_error() or not self._member():
                raise self.fenced(partition) from exc
            log.warning("partition %d: transaction abandoned after %s", partition, exc)
            with contextlib.suppress(kerr.KafkaError):
                await producer.abort_transaction()
            await self._rewind(partition)
            return False
        except AssertionError as exc:  # aiokafka's state machine, after a fatal error
            if producer._txn_manager.is_fatal_error():
                raise self.fenced(partition) from exc
            raise BrokerError(
                f"transaction of partition {partition} in an invalid state: {exc}",
                partition=partition, group=self.group,
            ) from exc  # fmt: skip
        except _UNKNOWN_OUTCOME as exc:
            return await self._unknown_outcome(partition, exc)
        except kerr.KafkaError as exc:
            log.warning("partition %d: aborting transaction after %s", partition, exc)
            with contextlib.suppress(kerr.KafkaError):
                await producer.abort_transaction()
            await self._rewind(partition)
            if not getattr(exc, "retriable", False) and not isinstance(exc, kerr.InvalidTxnState):
                raise BrokerError(f"transaction failed: {exc}", partition=partition) from exc
            return False

    async def _unknown_outcome(self, partition: int, exc: BaseException) -> bool:
        """The commit may or may not have happened: never abort blindly."""
        if not self._member():
            raise FencedError(
                f"the outcome of a transaction of partition {partition} of {self.input_topic} "
                f"is unknown ({exc}) and the group no longer knows this instance (its session "
                f"expired): it stops rather than start a new producer that would fence the "
                f"instance that owns the partition now",
                partition=partition, group=self.group,
            ) from exc  # fmt: skip
        # A new producer with the same transactional id completes or aborts it; then we
        # rewind to whatever offset is committed.
        log.warning(
            "partition %d: transaction outcome unknown (%s); recreating producer", partition, exc
        )
        await self.release(partition)
        await self.claim(partition)
        await self._rewind(partition)
        return False

    def fenced(self, partition: int) -> FencedError:
        return FencedError(
            f"another instance took over partition {partition} of {self.input_topic}: this "
            f"one was fenced as a zombie (it was silent past its session timeout, or another "
            f"process uses the same group). It stops; nothing of its open transaction is "
            f"committed, and its partitions are processed by the instance that fenced it",
            partition=partition, group=self.group,
        )  # fmt: skip

    async def close(self) -> None:
        for partition in list(self._owned):
            await self.release(partition)
