"""Record: what a stage sees of one Kafka record, and what it may emit.

A record's Kafka key is its *sequence key* (e.g. an order id); partitions keep per-key order.
Three framework headers travel with it from publisher to sink:

- ``seq``: a per-key sequence number (8 bytes, big-endian, signed), counted per writer;
- ``writer``: who issued the sequence number (each :class:`~pipeline.Publisher` has its own
  identity, so many publishers can write the same keys; dedup keeps a position per writer);
- ``event-id``: a unique event id (bytes; the publisher sets 16 random bytes).

A stage that emits several values for one input marks them with ``seq-part`` (0, 1, ...), so
that sequence-based deduplication downstream can tell them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SEQ_HEADER = "seq"
WRITER_HEADER = "writer"
ID_HEADER = "event-id"
PART_HEADER = "seq-part"
TRACE_HEADER = "traceparent"  # W3C trace context (pipeline.ops.tracing)
JOB_HEADER = "job-id"  # the job a record belongs to (pipeline.jobs)
CALLBACK_HEADER = "job-callback"  # where the job's end is POSTed (pipeline.jobs)

Headers = Sequence[tuple[str, bytes]]


def encode_seq(seq: int) -> bytes:
    """The ``seq`` header value for ``seq``."""
    return seq.to_bytes(8, "big", signed=True)


def decode_seq(raw: bytes) -> int:
    """The sequence number in a ``seq`` header value."""
    return int.from_bytes(raw, "big", signed=True)


class Record:
    """One decoded input record, handed to stage functions that ask for a context.

    Attributes:
        key: The sequence key (Kafka record key), as bytes.
        value: The decoded value (a dict for Avro records).
        seq: The per-key sequence number, or ``None`` when the record carries none.
        id: The event id, or ``None``.
        resource: What the stage's ``setup`` yielded (a client, a pool), or ``None``.
        headers: All Kafka headers, as received.
        timestamp: Kafka timestamp (ms since the epoch).
        topic, partition, offset: Where the record came from.

    Example:
        >>> r = Record(b"order-1", {"total": 3}, seq=7)
        >>> r.key_str, r.seq
        ('order-1', 7)
    """

    __slots__ = (
        "_table",
        "headers",
        "id",
        "key",
        "offset",
        "partition",
        "resource",
        "seq",
        "timestamp",
        "topic",
        "value",
    )

    def __init__(
        self,
        key: bytes | None,
        value: Any,
        *,
        seq: int | None = None,
        id: bytes | None = None,
        headers: Headers = (),
        timestamp: int = 0,
        topic: str = "",
        partition: int = -1,
        offset: int = -1,
    ) -> None:
        self.key = key
        self.value = value
        self.seq = seq
        self.id = id
        self.headers = headers
        self.timestamp = timestamp
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self._table: Any = None  # the stage's state table partition, set by the worker
        self.resource: Any = None  # what the stage's setup yielded, set by the worker

    @property
    def state(self) -> KeyState:
        """The stage's own state for this record's key (kept in the state table).

        Example:
            >>> def count(order, record):            # doctest: +SKIP
            ...     n = (record.state.get() or 0) + 1
            ...     record.state.set(n)
        """
        if self._table is None or self.key is None:
            raise RuntimeError("state is available to stage code for keyed records only")
        return KeyState(self._table, self.key)

    @property
    def key_str(self) -> str | None:
        """The key decoded as UTF-8 (keys are text in most pipelines)."""
        return None if self.key is None else self.key.decode("utf-8", "replace")

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or ``None``."""
        found = None
        for k, v in self.headers:
            if k == name:
                found = v
        return found

    def __repr__(self) -> str:
        return (
            f"Record(key={self.key!r}, seq={self.seq}, value={self.value!r}, "
            f"at={self.topic}/{self.partition}@{self.offset})"
        )


class KeyState:
    """Get, set or delete the stage's JSON-serialisable value for one key."""

    __slots__ = ("_key", "_table")

    def __init__(self, table: Any, key: bytes) -> None:
        self._table = table
        self._key = key

    def get(self, default: Any = None) -> Any:
        value = self._table.get(self._key)
        return default if value is None else value

    def set(self, value: Any) -> None:
        self._table.set(self._key, value)

    def delete(self) -> None:
        self._table.delete(self._key)


class Emit:
    """An output value with a different key or extra headers than the input's.

    Return ``Emit(value, key=b"...")`` from a stage to re-key on purpose; a plain value keeps
    the input's key, sequence number and event id. A re-keyed output carries no sequence number
    (the input's belongs to another key) and an event id derived from the input's and the new
    key, so deduplication downstream still recognises a replay. A list of values or ``Emit``
    objects fans out.

    Example:
        >>> Emit({"sku": "a"}, key=b"sku-a").key
        b'sku-a'
    """

    __slots__ = ("headers", "key", "value")

    def __init__(
        self, value: Any, *, key: bytes | str | None = None, headers: Headers = ()
    ) -> None:
        self.value = value
        self.key = key.encode() if isinstance(key, str) else key
        self.headers = headers
