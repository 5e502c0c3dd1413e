"""Partition state: a stage's state for *any* key of the partition a record came from.

:attr:`Record.state <pipeline.record.Record.state>` gives stage code the state of the record's
own key. A stage that aggregates across keys (a window that closes when any later record of the
partition passes its end) also needs the state of other keys of the same input partition, and
of keys it makes up itself (an index of open windows). All of them live in the partition's
state table, restored from the same changelog partition before the partition is processed, so
they survive restarts and rebalances together.

Only two kinds of key belong here: keys that live on the record's partition (keys the stage
has seen in it), and synthetic keys the stage names itself (they then belong to the
partition, wherever they would hash). A key of another partition would be invisible to the
instance that owns that partition.
"""

from __future__ import annotations

from pipeline.record import KeyState, Record

__all__ = ["partition_state"]


def partition_state(record: Record, key: bytes) -> KeyState:
    """The stage's state for ``key`` in the state table of ``record``'s input partition.

    Args:
        record: A record the worker handed to stage code (it carries the partition's table).
        key: Any key of that partition, or a synthetic key of the stage's own.

    Raises:
        RuntimeError: ``record`` was not handed out by a stage worker (it has no table).

    Example:
        >>> def count_all(value, record):                          # doctest: +SKIP
        ...     total = partition_state(record, b"\\x00total")
        ...     total.set(total.get(0) + 1)
    """
    table = record._table
    if table is None:
        raise RuntimeError("partition state is available to stage code run by a worker only")
    return KeyState(table, key)
