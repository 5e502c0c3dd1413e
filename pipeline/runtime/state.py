"""Keyed state tables: a local store per input partition, backed by a compacted changelog.

A stage's table lives in a local store (a dict by default; RocksDB through ``rocksdict`` for
state larger than memory) and in the changelog topic ``P.S.state``, co-partitioned with the
input: the state of input partition p is in changelog partition p. It is restored from the
changelog before partition p is processed, and dropped when p is revoked.

Changelog keys start with one byte that says what they hold:

- ``\\x00`` + record key: the last (sequence, part) each writer delivered for the key (dedup
  by sequence, per writer; see :mod:`pipeline.runtime.writers`);
- ``\\x01`` + event id: when the event was seen (dedup by event id, with a TTL; an id that
  expires gets a tombstone, see :mod:`pipeline.runtime.ids`);
- ``\\x02`` + record key: the stage's own value for the key (``record.state``), JSON;
- ``\\x03`` + record key: the key is *parked* after a dead letter (see
  :mod:`pipeline.runtime.parking`); the value says which dead letter and in which replay;
- ``\\x04`` + replay identity: a replayed record was processed (a later replay of the same
  dead letter is a duplicate); the value is when, in ms.

Parks and replay marks are kept in the local store (not only in memory), so a persistent store
restored from a checkpoint still has them. A persistent store holds writer entries in their
changelog encoding (bytes: no pickling); a memory store holds them decoded (tuples, dicts),
except the one-writer entries a restore wrote as it read them, decoded when their key is
looked up (a restore of a million keys decodes none of them). (``\\x06`` and ``\\x07`` keys
are the event-id time index and count of a RocksDB store; they never reach the changelog.)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from pipeline.runtime import writers
from pipeline.runtime.ids import ID_PREFIX, IdSet, MemoryIds, StoreIds, discard
from pipeline.stage import DedupMode, DedupPolicy

if TYPE_CHECKING:
    from pipeline.runtime.stats import StageStats

log = logging.getLogger(__name__)

__all__ = [
    "DUPLICATE", "GAP", "ID_PREFIX", "NEW", "PARK_PREFIX", "REPLAY_PREFIX", "SEQ_PREFIX",
    "USER_PREFIX", "MemoryStores", "PartitionTable", "RocksStores", "StateTable",
    "StoreFactory", "now_ms", "position",
]  # fmt: skip

SEQ_PREFIX = b"\x00"
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

    def put_many(self, store: MutableMapping[bytes, Any], items: dict[bytes, Any]) -> None:
        """Write ``items`` to ``store`` (a restore's batch)."""


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

    def put_many(self, store: MutableMapping[bytes, Any], items: dict[bytes, Any]) -> None:
        store.update(items)


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
        from rocksdict import Rdict, WriteOptions

        path = self._path(table, partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.parent / f"{partition}.checkpoint").exists():
            shutil.rmtree(path, ignore_errors=True)  # no checkpoint: contents unknown, rebuild
        store = Rdict(str(path))
        # No write-ahead log: the changelog is the durable copy. A crash leaves no checkpoint,
        # so the store is rebuilt; a clean close flushes the memtables (see close()).
        options: Any = WriteOptions()  # its stub declares a method; at run time a property
        options.disable_wal = True
        store.set_write_options(options)
        return cast("MutableMapping[bytes, Any]", store)

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
        store.flush()  # type: ignore[attr-defined]  # without a WAL, unflushed data would go
        store.close()  # type: ignore[attr-defined]

    def put_many(self, store: MutableMapping[bytes, Any], items: dict[bytes, Any]) -> None:
        """One RocksDB ``WriteBatch`` (WAL off, as every write of these stores): a restore
        writes a fetched batch at once instead of a put per record."""
        from rocksdict import WriteBatch, WriteOptions

        batch = WriteBatch()
        for key, value in items.items():
            batch.put(key, value)
        options: Any = WriteOptions()
        options.disable_wal = True
        store.write(batch, options)  # type: ignore[attr-defined]


class PartitionTable:
    """The state of one input partition: writer positions, event ids, user values, parks.

    Args:
        partition: The input partition.
        store: Its local store.
        policy: The stage's dedup policy (TTLs and bounds).
        stats: Where forgotten writers and ids are counted (optional).
        persistent: Whether the store is RocksDB (event ids then live in it too).
        put_many: Writes many entries to the store at once (its factory's ``put_many``;
            ``store.update`` by default).
    """

    __slots__ = (
        "_put_many",
        "_seq_dirty",
        "dirty",
        "encoded",
        "ids",
        "max_writers",
        "partition",
        "stats",
        "store",
        "writer_ttl_ms",
    )

    def __init__(
        self,
        partition: int,
        store: MutableMapping[bytes, Any],
        policy: DedupPolicy | None = None,
        stats: StageStats | None = None,
        *,
        persistent: bool = False,
        put_many: Callable[[MutableMapping[bytes, Any], dict[bytes, Any]], None] | None = None,
    ) -> None:
        policy = policy or DedupPolicy()
        self._put_many = put_many or _update
        self.encoded = persistent  # writer entries kept as bytes (see the module's docstring)
        self.partition = partition
        self.store = store
        self.stats = stats
        ttl_ms, max_ids = int(policy.ttl * 1000), policy.max_ids
        self.ids: IdSet = (
            StoreIds(store, ttl_ms, max_ids) if persistent else MemoryIds(ttl_ms, max_ids)
        )
        self.writer_ttl_ms = int(policy.writer_ttl * 1000)
        self.max_writers = policy.max_writers
        self.dirty: dict[bytes, bytes | None] = {}  # changelog key -> value (None: delete)
        self._seq_dirty: dict[bytes, Any] = {}  # changelog key -> writers entry, encoded late

    @property
    def pending(self) -> bool:
        """Whether changes wait for the next commit."""
        return bool(self.dirty or self._seq_dirty)

    # -- sequence dedup, per (key, writer) ------------------------------------------------

    def check_sequence(self, key: bytes, writer: bytes, pos: int) -> int:
        """Classify ``writer``'s (sequence, part) position for ``key``: NEW, DUPLICATE or GAP."""
        entry = self.store.get(SEQ_PREFIX + key)
        if entry is None:
            return NEW
        if type(entry) is bytes:  # a persistent store's
            entry = writers.decode(entry)
        if type(entry) is tuple:  # one writer (inlined: this runs once per record)
            if entry[0] != writer:
                return NEW
            last = entry[1]
        else:
            last = writers.last_of(entry, writer)
            if last is None:
                return NEW
        if pos <= last:
            return DUPLICATE
        return GAP if (pos >> _PART_BITS) > (last >> _PART_BITS) + 1 else NEW

    def remember_sequence(self, key: bytes, writer: bytes, pos: int, now_ms: int) -> None:
        """``writer``'s record at ``pos`` is handled: later copies of it are duplicates."""
        skey = SEQ_PREFIX + key
        store = self.store
        entry = store.get(skey)
        if type(entry) is bytes:  # a persistent store's
            entry = writers.decode(entry)
        if entry is None or (type(entry) is tuple and entry[0] == writer):
            entry = (writer, pos, now_ms)  # the common case, inlined
        else:
            entry, evicted = writers.updated(
                entry, writer, pos, now_ms, self.writer_ttl_ms, self.max_writers
            )
            if evicted and self.stats is not None:
                self.stats.writers_evicted += evicted
        if self.encoded:
            entry = writers.encode(entry)
        store[skey] = entry
        self._seq_dirty[skey] = entry

    def last_position(self, key: bytes, writer: bytes) -> int | None:
        """The last (sequence, part) position ``writer`` delivered for ``key``, or ``None``."""
        entry = self.store.get(SEQ_PREFIX + key)
        if type(entry) is bytes:  # a persistent store's
            entry = writers.decode(entry)
        return None if entry is None else writers.last_of(entry, writer)

    # -- event-id dedup ---------------------------------------------------------------------

    def seen_id(self, event_id: bytes, now_ms: int) -> bool:
        """Whether ``event_id`` was handled within the TTL."""
        return self.ids.seen(event_id, now_ms)

    def remember_id(self, event_id: bytes, now_ms: int) -> None:
        """The event is handled: later copies within the TTL are duplicates."""
        ids, dirty = self.ids, self.dirty
        evicted = ids.evicted
        gone = ids.add(event_id, now_ms)
        dirty[ID_PREFIX + event_id] = now_ms.to_bytes(8, "big")
        for old in gone:  # the changelog forgets what memory forgot
            dirty[ID_PREFIX + old] = None
        if ids.evicted != evicted and self.stats is not None:
            self.stats.ids_evicted += ids.evicted - evicted

    # -- the stage's own values ---------------------------------------------------------------

    def get(self, key: bytes) -> Any:
        raw = self.store.get(USER_PREFIX + key)
        return None if raw is None else json.loads(raw)

    def set(self, key: bytes, value: Any) -> None:
        raw = json.dumps(value, separators=(",", ":")).encode()
        self.store[USER_PREFIX + key] = raw
        self.dirty[USER_PREFIX + key] = raw

    def delete(self, key: bytes) -> None:
        discard(self.store, USER_PREFIX + key)
        self.dirty[USER_PREFIX + key] = None

    # -- restore ----------------------------------------------------------------------------

    def apply_many(self, records: Sequence[tuple[bytes, bytes | None]], now_ms: int) -> None:
        """Apply a batch of changelog records in order, as :meth:`apply` does one by one.

        Entries to keep are collected and written at once at the end (a RocksDB write batch:
        a restore's main cost was a put per record); a tombstone or an expired entry first
        drops a collected one of its key, so the last record of a key wins, as in the log.
        """
        puts: dict[bytes, Any] = {}
        store, encoded = self.store, self.encoded
        decode, expired, ttl = writers.decode, writers.expired, self.writer_ttl_ms
        horizon, one = now_ms - ttl, writers.ONE_WRITER
        for ckey, value in records:
            head = ckey[:1]
            if head == SEQ_PREFIX and value is not None:
                if len(value) > 1 and value[0] == one:
                    # A one-writer entry kept as read: only its "seen" time is looked at (a
                    # memory store decodes it when its key is next looked up).
                    end = 2 + value[1]
                    if int.from_bytes(value[end : end + 8], "big") > horizon:
                        puts[ckey] = value
                        continue
                    self.dirty[ckey] = None  # idle past the writers' TTL: forgotten
                    puts.pop(ckey, None)
                    discard(store, ckey)
                    continue
                try:
                    entry = expired(decode(value), now_ms, ttl)
                except (ValueError, IndexError):
                    entry = None  # not this format (an older changelog): the key starts afresh
                if entry is not None:
                    puts[ckey] = writers.encode(entry) if encoded else entry
                    continue
                self.dirty[ckey] = None
            elif head == ID_PREFIX:
                self.apply(ckey, value, now_ms)
                continue
            elif value is not None:  # user values, parks and replay marks: as they are
                puts[ckey] = value
                continue
            puts.pop(ckey, None)  # a tombstone, or an expired writers entry: gone
            discard(store, ckey)
        if puts:
            self._put_many(store, puts)

    def apply(self, ckey: bytes, value: bytes | None, now_ms: int) -> None:
        """Apply one changelog record during restore.

        What expired while the stage was down (event ids past their TTL, idle writers) is
        dropped here and gets a tombstone at the next commit.
        """
        prefix, rest = ckey[:1], ckey[1:]
        if prefix == ID_PREFIX:
            seen = None if value is None else int.from_bytes(value, "big")
            for old in self.ids.load(rest, seen, now_ms):
                self.dirty[ID_PREFIX + old] = None
            return
        if value is None:
            discard(self.store, ckey)
        elif prefix == SEQ_PREFIX:
            try:
                entry = writers.expired(writers.decode(value), now_ms, self.writer_ttl_ms)
            except (ValueError, IndexError):
                entry = None  # not this format (an older changelog): the key starts afresh
            if entry is None:
                discard(self.store, ckey)
                self.dirty[ckey] = None
            else:
                self.store[ckey] = writers.encode(entry) if self.encoded else entry
        else:  # user values, parks and replay marks are kept as the changelog holds them
            self.store[ckey] = value

    # -- parks and replays (see pipeline.runtime.parking) ----------------------------------

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
        discard(self.store, PARK_PREFIX + key)
        self.dirty[PARK_PREFIX + key] = None

    def was_replayed(self, identity: bytes) -> bool:
        """Whether a replayed record with this identity was processed already."""
        return self.store.get(REPLAY_PREFIX + identity) is not None

    def remember_replayed(self, identity: bytes, now_ms: int) -> None:
        """A replayed record is processed: a later replay of the same record is a duplicate."""
        raw = now_ms.to_bytes(8, "big")
        self.store[REPLAY_PREFIX + identity] = raw
        self.dirty[REPLAY_PREFIX + identity] = raw

    def take_dirty(self) -> dict[bytes, bytes | None]:
        """The changelog updates since the last call (writer entries encoded once per key)."""
        dirty, self.dirty = self.dirty, {}
        if self._seq_dirty:
            # writers.encode, with its one-writer case inlined: this runs once per key per
            # commit, and the entries of a batch share their "seen" time.
            heads, head_of, encode = writers._HEADS, writers.head_of, writers.encode
            last_seen, seen_raw = -1, b""
            for skey, entry in self._seq_dirty.items():
                if type(entry) is bytes:  # a persistent store's: encoded already
                    dirty[skey] = entry
                elif type(entry) is tuple:
                    writer, pos, seen = entry
                    if seen != last_seen:
                        last_seen, seen_raw = seen, seen.to_bytes(8, "big")
                    dirty[skey] = (
                        (heads.get(writer) or head_of(writer))
                        + seen_raw
                        + pos.to_bytes(pos.bit_length() // 8 + 1, "big", signed=True)
                    )
                else:
                    dirty[skey] = encode(entry)
            self._seq_dirty = {}
        return dirty


class StateTable:
    """A stage's keyed table: one :class:`PartitionTable` per owned input partition."""

    def __init__(
        self,
        name: str,
        policy: DedupPolicy,
        stores: StoreFactory | None = None,
        stats: StageStats | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.stores = stores or MemoryStores()
        self.stats = stats
        self.partitions: dict[int, PartitionTable] = {}

    @property
    def dedup(self) -> DedupMode:
        return self.policy.mode

    def open(self, partition: int) -> tuple[PartitionTable, int]:
        """Open a partition's store; return it and the changelog offset to restore from."""
        stores = self.stores
        store = stores.open(self.name, partition)
        offset = stores.checkpoint(self.name, partition)
        table = PartitionTable(
            partition,
            store,
            self.policy,
            self.stats,
            persistent=stores.persistent,
            put_many=stores.put_many,
        )
        self.partitions[partition] = table
        return table, offset

    def close(self, partition: int) -> None:
        table = self.partitions.pop(partition, None)
        if table is not None:
            table.ids.close()
            self.stores.close(self.name, partition, table.store)

    def saved(self, partition: int, offset: int) -> None:
        """The changelog of ``partition`` is durable up to ``offset`` (next offset to read)."""
        self.stores.save_checkpoint(self.name, partition, offset)


def _update(store: MutableMapping[bytes, Any], items: dict[bytes, Any]) -> None:
    store.update(items)


def now_ms() -> int:
    return int(time.time() * 1000)
