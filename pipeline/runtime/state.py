"""Keyed state tables: a local store per input partition, backed by a compacted changelog.

A stage's table lives in a local store (a dict by default; RocksDB through ``rocksdict`` for
state larger than memory) and in the changelog topic ``P.S.state``, co-partitioned with the
input: the state of input partition p is in changelog partition p. It is restored from the
changelog before partition p is processed, and dropped when p is revoked.

Changelog keys start with one byte that says what they hold:

- ``\\x00`` + record key: the last (sequence, part) processed for the key (dedup by sequence);
- ``\\x01`` + event id: when the event was seen (dedup by event id, with a TTL);
- ``\\x02`` + record key: the stage's own value for the key (``record.state``), JSON;
- ``\\x03`` + record key: the key is *parked* after a dead letter (see
  :mod:`pipeline.runtime.parking`); the value says which dead letter and in which replay;
- ``\\x04`` + replay identity: a replayed record was processed (a later replay of the same
  dead letter is a duplicate); the value is when, in ms.

Parks and replay marks are kept in the local store (not only in memory), so a persistent store
restored from a checkpoint still has them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Protocol, cast

from pipeline.stage import DedupMode, DedupPolicy

log = logging.getLogger(__name__)

SEQ_PREFIX = b"\x00"
ID_PREFIX = b"\x01"
USER_PREFIX = b"\x02"
PARK_PREFIX = b"\x03"
REPLAY_PREFIX = b"\x04"

NEW, DUPLICATE, GAP = 0, 1, 2
_PART_BITS = 64


def position(seq: int, part: int) -> int:
    """Orders (sequence, part) pairs as one integer: flat-map outputs share a sequence."""
    return (seq << _PART_BITS) | part


def encode_position(pos: int) -> bytes:
    return pos.to_bytes(pos.bit_length() // 8 + 1, "big", signed=True)


def decode_position(raw: bytes) -> int:
    return int.from_bytes(raw, "big", signed=True)


class StoreFactory(Protocol):
    """Opens the local store of one partition of one stage's table."""

    persistent: bool  # whether the store outlives the process (then it keeps checkpoints)

    def open(self, table: str, partition: int) -> MutableMapping[bytes, Any]: ...

    def checkpoint(self, table: str, partition: int) -> int:
        """The changelog offset the local store already holds (0: restore everything)."""
        ...

    def save_checkpoint(self, table: str, partition: int, offset: int) -> None: ...

    def close(self, table: str, partition: int, store: MutableMapping[bytes, Any]) -> None: ...


class MemoryStores:
    """Local stores in memory: always restored in full from the changelog."""

    persistent = False

    def open(self, table: str, partition: int) -> MutableMapping[bytes, Any]:
        return {}

    def checkpoint(self, table: str, partition: int) -> int:
        return 0

    def save_checkpoint(self, table: str, partition: int, offset: int) -> None:
        return None

    def close(self, table: str, partition: int, store: MutableMapping[bytes, Any]) -> None:
        return None


class RocksStores:
    """Local stores in RocksDB (``rocksdict``), for state larger than memory.

    A checkpoint file beside each store records the changelog offset it holds, so a restart
    restores only what it missed. Deleting the directory is safe: the table is rebuilt from
    the changelog.
    """

    persistent = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, table: str, partition: int) -> Path:
        return self.directory / table / str(partition)

    def open(self, table: str, partition: int) -> MutableMapping[bytes, Any]:
        """Open the store; without a checkpoint its contents are unknown, so start empty."""
        from rocksdict import Rdict

        path = self._path(table, partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.parent / f"{partition}.checkpoint").exists():
            shutil.rmtree(path, ignore_errors=True)  # no checkpoint: contents unknown, rebuild
        return cast("MutableMapping[bytes, Any]", Rdict(str(path)))

    def checkpoint(self, table: str, partition: int) -> int:
        # Read once and delete: while the store is open it runs ahead of any checkpoint, so a
        # crash must find none and rebuild; a clean close writes a fresh one.
        file = self._path(table, partition).parent / f"{partition}.checkpoint"
        try:
            offset = int(file.read_text())
        except (OSError, ValueError):
            return 0
        file.unlink(missing_ok=True)
        return offset

    def save_checkpoint(self, table: str, partition: int, offset: int) -> None:
        file = self._path(table, partition).parent / f"{partition}.checkpoint"
        tmp = file.with_suffix(".tmp")
        tmp.write_text(str(offset))
        tmp.replace(file)

    def close(self, table: str, partition: int, store: MutableMapping[bytes, Any]) -> None:
        store.close()  # type: ignore[attr-defined]


class PartitionTable:
    """The state of one input partition: dedup positions, event ids, user values."""

    __slots__ = ("dirty", "ids", "max_ids", "partition", "store", "ttl_ms")

    def __init__(
        self, partition: int, store: MutableMapping[bytes, Any], ttl_ms: int, max_ids: int
    ) -> None:
        self.partition = partition
        self.store = store
        self.ids: OrderedDict[bytes, int] = OrderedDict()  # event id -> ms seen, oldest first
        self.ttl_ms = ttl_ms
        self.max_ids = max_ids
        self.dirty: dict[bytes, bytes | None] = {}  # changelog key -> value (None: delete)

    def check_sequence(self, key: bytes, pos: int) -> int:
        """Classify a (sequence, part) position: NEW, DUPLICATE or GAP (a skipped sequence)."""
        last = self.store.get(SEQ_PREFIX + key)
        if last is None:
            return NEW
        if pos <= last:
            return DUPLICATE
        return GAP if (pos >> _PART_BITS) > (last >> _PART_BITS) + 1 else NEW

    def remember_sequence(self, key: bytes, pos: int) -> None:
        """The record at ``pos`` is handled: later copies of it are duplicates."""
        skey = SEQ_PREFIX + key
        self.store[skey] = pos
        self.dirty[skey] = encode_position(pos)

    def seen_id(self, event_id: bytes, now_ms: int) -> bool:
        """Whether ``event_id`` was handled within the TTL."""
        seen = self.ids.get(event_id)
        return seen is not None and now_ms - seen < self.ttl_ms

    def remember_id(self, event_id: bytes, now_ms: int) -> None:
        """The event is handled: later copies within the TTL are duplicates."""
        ids = self.ids
        ids[event_id] = now_ms
        ids.move_to_end(event_id)
        self.dirty[ID_PREFIX + event_id] = now_ms.to_bytes(8, "big")
        self._expire(now_ms)

    def _expire(self, now_ms: int) -> None:
        ids = self.ids
        while ids:
            oldest, seen = next(iter(ids.items()))
            if len(ids) <= self.max_ids and now_ms - seen < self.ttl_ms:
                break
            del ids[oldest]

    def get(self, key: bytes) -> Any:
        raw = self.store.get(USER_PREFIX + key)
        return None if raw is None else json.loads(raw)

    def set(self, key: bytes, value: Any) -> None:
        raw = json.dumps(value, separators=(",", ":")).encode()
        self.store[USER_PREFIX + key] = raw
        self.dirty[USER_PREFIX + key] = raw

    def delete(self, key: bytes) -> None:
        self.store.pop(USER_PREFIX + key, None)
        self.dirty[USER_PREFIX + key] = None

    def apply(self, ckey: bytes, value: bytes | None, now_ms: int) -> None:
        """Apply one changelog record during restore."""
        prefix, rest = ckey[:1], ckey[1:]
        if prefix == ID_PREFIX:
            if value is None:
                self.ids.pop(rest, None)
                return
            seen = int.from_bytes(value, "big")
            if now_ms - seen < self.ttl_ms:
                self.ids[rest] = seen
                self.ids.move_to_end(rest)
                if len(self.ids) > self.max_ids:
                    self.ids.popitem(last=False)
            return
        if value is None:
            self.store.pop(ckey, None)
        elif prefix == SEQ_PREFIX:
            self.store[ckey] = decode_position(value)
        else:  # user values, parks and replay marks are kept as the changelog holds them
            self.store[ckey] = value

    def parked(self, key: bytes) -> bytes | None:
        """The park of ``key`` (encoded by :mod:`pipeline.runtime.parking`), or ``None``."""
        raw: bytes | None = self.store.get(PARK_PREFIX + key)
        return raw

    def park(self, key: bytes, park: bytes) -> None:
        """Park ``key``: its later records go to the dead-letter topic until a replay."""
        self.store[PARK_PREFIX + key] = park
        self.dirty[PARK_PREFIX + key] = park

    def unpark(self, key: bytes) -> None:
        """Let ``key``'s records through again."""
        self.store.pop(PARK_PREFIX + key, None)
        self.dirty[PARK_PREFIX + key] = None

    def was_replayed(self, identity: bytes) -> bool:
        """Whether a replayed record with this identity was processed already."""
        return self.store.get(REPLAY_PREFIX + identity) is not None

    def remember_replayed(self, identity: bytes, now_ms: int) -> None:
        """A replayed record is processed: a later replay of the same record is a duplicate."""
        raw = now_ms.to_bytes(8, "big")
        self.store[REPLAY_PREFIX + identity] = raw
        self.dirty[REPLAY_PREFIX + identity] = raw

    def last_position(self, key: bytes) -> int | None:
        """The last (sequence, part) position handled for ``key``, or ``None``."""
        last: int | None = self.store.get(SEQ_PREFIX + key)
        return last

    def take_dirty(self) -> dict[bytes, bytes | None]:
        dirty, self.dirty = self.dirty, {}
        return dirty


class StateTable:
    """A stage's keyed table: one :class:`PartitionTable` per owned input partition."""

    def __init__(self, name: str, policy: DedupPolicy, stores: StoreFactory | None = None) -> None:
        self.name = name
        self.policy = policy
        self.stores = stores or MemoryStores()
        self.partitions: dict[int, PartitionTable] = {}

    @property
    def dedup(self) -> DedupMode:
        return self.policy.mode

    def open(self, partition: int) -> tuple[PartitionTable, int]:
        """Open a partition's store; return it and the changelog offset to restore from."""
        store = self.stores.open(self.name, partition)
        table = PartitionTable(partition, store, int(self.policy.ttl * 1000), self.policy.max_ids)
        self.partitions[partition] = table
        return table, self.stores.checkpoint(self.name, partition)

    def close(self, partition: int) -> None:
        table = self.partitions.pop(partition, None)
        if table is not None:
            self.stores.close(self.name, partition, table.store)

    def saved(self, partition: int, offset: int) -> None:
        """The changelog of ``partition`` is durable up to ``offset`` (next offset to read)."""
        self.stores.save_checkpoint(self.name, partition, offset)


def now_ms() -> int:
    return int(time.time() * 1000)
