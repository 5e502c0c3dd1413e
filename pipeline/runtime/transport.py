"""The interface between a stage worker and the log it reads and writes.

:class:`~pipeline.runtime.kafka.KafkaTransport` implements it on aiokafka; an in-memory
implementation runs the same worker in tests without a broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from pipeline.errors import OffsetOutOfRangeError


class TopicPartition(NamedTuple):
    """A partition of a topic (field-compatible with aiokafka's)."""

    topic: str
    partition: int


class InMessage(Protocol):
    """A consumed record as the transport delivers it (aiokafka's ConsumerRecord fits)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


RebalanceCallback = Callable[[set[Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Batching:
    """Batch sizes on the worker's hot path.

    Example:
        >>> Batching(max_records=500).max_records
        500
    """

    max_records: int = 5000  # records per fetch
    fetch_wait_ms: int = 100  # how long a fetch may wait for records
    # How much a fetch waits for (up to fetch_wait_ms): 1 answers as soon as any record is
    # there (latency first); more trades up to fetch_wait_ms per hop for fewer, larger
    # batches at low rates (CPU per record at a trickle: see bench trickle).
    fetch_min_bytes: int = 1
    max_batch_bytes: int = 256 * 1024  # producer batch per partition
    linger_ms: int = 5
    flush_interval_ms: int = 20  # concurrency > 1: how often finished records are flushed
    # concurrency = 1: how long a commit may run while the next batches are handled before a
    # handled batch waits for it; under at-least-once, how often a commit starts (outputs
    # leave at once either way; exactly-once commits as soon as it can). See Commits.may_pass.
    commit_overlap_ms: int = 100
    commit_interval_ms: int = 100


class Transport(Protocol):
    """What a stage worker needs from the log.

    Input partitions are numbers: a stage reads one topic. Writes are buffered per *source*
    (the input partition the record came from) so that exactly-once transports can commit
    each input partition's outputs, state and offset in one transaction.
    """

    async def start(self, on_revoked: RebalanceCallback, on_assigned: RebalanceCallback) -> None:
        """Connect, join the group, subscribe to the input topic."""

    async def stop(self) -> None:
        """Leave the group and close; nothing buffered is committed."""

    async def claim(self, partition: int) -> None:
        """Take ownership of an input partition (exactly-once: fence older owners)."""

    async def release(self, partition: int) -> None:
        """Give up an input partition."""

    async def fetch(self, timeout_ms: int, max_records: int) -> Mapping[Any, list[Any]]:
        """Return the next records by partition (empty when none within ``timeout_ms``).

        Raises:
            OffsetOutOfRangeError: A position is outside its partition's log; nothing was
                skipped (the worker's :class:`~pipeline.runtime.offsets.OffsetReset` decides).
        """

    async def lag(self) -> dict[int, int]:
        """Records behind the end per owned input partition (where known)."""
        ...

    def member(self) -> bool:
        """Whether the consumer group still knows this instance."""
        ...

    def connected(self) -> bool:
        """Whether a broker is reachable now (as far as the client knows)."""
        ...

    def assignment(self) -> set[Any]:
        """The input partitions (topic-partition pairs) this worker owns now."""

    async def rewind(self, partition: int) -> None:
        """Read an input partition again from its committed offset."""

    def seek(self, partition: int, offset: int) -> None:
        """Read an input partition from ``offset`` next."""

    async def out_of_range(self, partitions: list[int]) -> list[OffsetOutOfRangeError]:
        """Those of ``partitions`` whose *committed* offset is outside the log now."""

    def pause(self) -> None:
        """Fetch nothing from the owned partitions (fetches still keep the member alive)."""

    def resume(self) -> None:
        """Fetch from every owned partition again."""

    def restore(
        self, partition: int, start: int
    ) -> AsyncIterator[list[tuple[bytes, bytes | None]]]:
        """The state changelog records of ``partition`` from ``start`` to its current end,
        in batches (as fetched), keyed records only."""

    async def state_end(self, partition: int) -> int:
        """The end offset of the state changelog's ``partition``."""

    async def prepare_topic(self, topic: str) -> int:
        """Learn ``topic``'s partition count before writing to it; return it."""

    def partition_for(self, topic: str, key: bytes | None) -> int:
        """The partition ``key`` belongs to in ``topic`` (murmur2, as the Java client)."""

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
        """Buffer one output of a record read from input partition ``source``."""

    async def send_ahead(self) -> None:
        """Start sending the outputs buffered so far, before their commit (at-least-once; a
        transport may do nothing). The commit still makes them durable first."""

    def discard(self, partition: int) -> None:
        """Drop outputs buffered for records of input partition ``partition`` (EOS; after its
        transaction was lost and the partition rewound)."""

    async def read_from(self, partitions: list[int]) -> dict[int, tuple[int, str]]:
        """Where each of ``partitions`` is read from: its committed offset and the metadata
        committed with it, or the log's start and ``""`` when the group never committed it."""
        ...

    async def commit(
        self,
        offsets: Mapping[int, int],
        state: Mapping[int, Mapping[bytes, bytes | None]],
        metadata: Mapping[int, str] | None = None,
    ) -> set[int]:
        """Make buffered outputs, then ``state``, durable; then commit ``offsets`` (with
        ``metadata``, per partition, where given).

        Returns:
            Input partitions whose (exactly-once) transaction was lost; they were rewound.
        """
