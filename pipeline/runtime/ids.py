"""What event-id dedup remembers: the ids seen within a TTL, at most ``max_ids`` of them.

Two sets with one interface, chosen by the table's local store:

- :class:`MemoryIds`: an insertion-ordered dict, oldest first (the default, in-memory state);
- :class:`StoreIds`: the ids live in the local store itself (RocksDB with ``--state-dir``), with
  a time index beside them, so a million ids cost disk, not Python objects.

Both bound what they hold: an id older than the TTL, or the oldest one when there are more
than ``max_ids``, is forgotten. Every forgotten id is handed back to the caller, which writes a
tombstone for it to the changelog: the compacted changelog then holds at most the live ids,
and a restore reads back only those (ids that expired while the stage was down are dropped on
restore, with a tombstone too).

Example:
    >>> ids = MemoryIds(ttl_ms=1000, max_ids=2)
    >>> ids.add(b"a", 0), ids.add(b"b", 1), ids.add(b"c", 2)
    ((), (), (b'a',))
    >>> ids.seen(b"b", 5), ids.seen(b"a", 5), ids.evicted
    (True, False, 1)
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any, Protocol

ID_PREFIX = b"\x01"  # + event id -> ms seen: in the store and in the changelog
TIME_PREFIX = b"\x06"  # + ms seen (8 bytes) + event id: the store's time index, never logged
COUNT_KEY = b"\x07ids"  # how many ids the store holds, saved on a clean close

_NONE: tuple[bytes, ...] = ()


def discard(store: MutableMapping[bytes, Any], key: bytes) -> None:
    """Delete ``key`` if present, in a dict or a RocksDB store (which has no ``pop``)."""
    with contextlib.suppress(KeyError):  # a dict's; RocksDB ignores a missing key
        del store[key]


class IdSet(Protocol):
    """Event ids seen within the TTL (see the module docstring)."""

    evicted: int  # ids forgotten because of ``max_ids`` (not because they expired)

    def seen(self, event_id: bytes, now: int) -> bool: ...

    def add(self, event_id: bytes, now: int) -> tuple[bytes, ...]:
        """Remember ``event_id``; return the ids forgotten to make room or by age."""
        ...

    def load(self, event_id: bytes, seen: int | None, now: int) -> tuple[bytes, ...]:
        """Apply one changelog record (``None``: a tombstone); return ids to tombstone."""
        ...

    def __len__(self) -> int: ...

    def close(self) -> None:
        """The store is about to close cleanly (persist what a reopen needs)."""
        ...


class MemoryIds:
    """Event ids in an insertion-ordered dict, oldest first."""

    __slots__ = ("_ids", "evicted", "max_ids", "ttl_ms")

    def __init__(self, ttl_ms: int, max_ids: int) -> None:
        self._ids: OrderedDict[bytes, int] = OrderedDict()
        self.ttl_ms = ttl_ms
        self.max_ids = max_ids
        self.evicted = 0

    def seen(self, event_id: bytes, now: int) -> bool:
        seen = self._ids.get(event_id)
        return seen is not None and now - seen < self.ttl_ms

    def add(self, event_id: bytes, now: int) -> tuple[bytes, ...]:
        ids = self._ids
        ids[event_id] = now
        ids.move_to_end(event_id)
        seen = next(iter(ids.values()))
        if len(ids) <= self.max_ids and now - seen < self.ttl_ms:
            return _NONE  # the common case: nothing to forget
        return self._expire(now)

    def _expire(self, now: int) -> tuple[bytes, ...]:
        ids, gone = self._ids, []
        while ids:
            oldest, seen = next(iter(ids.items()))
            if now - seen < self.ttl_ms:
                if len(ids) <= self.max_ids:
                    break
                self.evicted += 1
            del ids[oldest]
            gone.append(oldest)
        return tuple(gone)

    def load(self, event_id: bytes, seen: int | None, now: int) -> tuple[bytes, ...]:
        if seen is None:
            self._ids.pop(event_id, None)
            return _NONE
        if now - seen >= self.ttl_ms:
            self._ids.pop(event_id, None)
            return (event_id,)  # expired while nobody was looking: forget it in the log too
        self._ids[event_id] = seen
        self._ids.move_to_end(event_id)
        return self._expire(now) if len(self._ids) > self.max_ids else _NONE

    def __len__(self) -> int:
        return len(self._ids)

    def close(self) -> None:
        return None


class StoreIds:
    """Event ids in the table's local store (RocksDB), with a time index for expiry.

    ``ID_PREFIX + id -> seen`` answers lookups; ``TIME_PREFIX + seen + id`` keeps them in age
    order, so the oldest are found by a range scan instead of a Python structure.
    """

    __slots__ = ("_count", "_looked_up", "_oldest", "evicted", "max_ids", "store", "ttl_ms")

    def __init__(self, store: MutableMapping[bytes, Any], ttl_ms: int, max_ids: int) -> None:
        self.store = store
        self.ttl_ms = ttl_ms
        self.max_ids = max_ids
        self.evicted = 0
        count = store.get(COUNT_KEY)
        self._count = int(count) if count is not None else 0
        self._oldest: int | None = None  # unknown: look on the next add
        # The last lookup: the gate asks seen() and, once the record is handled, add() for the
        # same id; a RocksDB read saved per record.
        self._looked_up: tuple[bytes, Any] = (b"", None)

    def seen(self, event_id: bytes, now: int) -> bool:
        seen = self.store.get(ID_PREFIX + event_id)
        self._looked_up = (event_id, seen)
        return seen is not None and now - int(seen) < self.ttl_ms

    def _put(self, event_id: bytes, now: int) -> None:
        store, key = self.store, ID_PREFIX + event_id
        looked_up, before = self._looked_up
        if looked_up != event_id:
            before = store.get(key)
        self._looked_up = (b"", None)
        if before is None:
            self._count += 1
        else:
            discard(store, TIME_PREFIX + int(before).to_bytes(8, "big") + event_id)
        store[key] = now
        store[TIME_PREFIX + now.to_bytes(8, "big") + event_id] = b""
        if self._oldest is not None and now < self._oldest:
            self._oldest = now

    def _drop(self, event_id: bytes) -> None:
        self._looked_up = (b"", None)
        store, key = self.store, ID_PREFIX + event_id
        before = store.get(key)
        if before is not None:
            del store[key]
            discard(store, TIME_PREFIX + int(before).to_bytes(8, "big") + event_id)
            self._count -= 1

    def add(self, event_id: bytes, now: int) -> tuple[bytes, ...]:
        self._put(event_id, now)
        oldest = self._oldest
        if self._count <= self.max_ids and oldest is not None and now - oldest < self.ttl_ms:
            return _NONE
        return self._expire(now)

    def _expire(self, now: int) -> tuple[bytes, ...]:
        gone: list[bytes] = []
        oldest = None
        items: Any = self.store.items  # rocksdict's items() takes a start key
        scan = items(from_key=TIME_PREFIX)
        for key, _ in scan:
            if not key.startswith(TIME_PREFIX):
                break
            seen = int.from_bytes(key[1:9], "big")
            if now - seen < self.ttl_ms:
                if self._count - len(gone) <= self.max_ids:
                    oldest = seen
                    break
                self.evicted += 1
            gone.append(key[9:])
        for event_id in gone:
            self._drop(event_id)
        self._oldest = oldest if oldest is not None else (now if self._count else None)
        return tuple(gone)

    def load(self, event_id: bytes, seen: int | None, now: int) -> tuple[bytes, ...]:
        if seen is None:
            self._drop(event_id)
            return _NONE
        if now - seen >= self.ttl_ms:
            self._drop(event_id)
            return (event_id,)
        self._put(event_id, seen)
        return self._expire(now) if self._count > self.max_ids else _NONE

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        self.store[COUNT_KEY] = self._count
