"""What sequence dedup remembers of one key: the last position of each writer that wrote it.

A sequence number belongs to the *writer* that issued it (a :class:`~pipeline.Publisher`, one
replica of an application): two replicas publishing the same key count independently, so the
last position is kept per (key, writer), as Kafka's idempotent producer keeps its sequence per
producer id. A record is a duplicate when its writer already delivered that position for that
key; a skipped sequence is a gap of that writer.

A key's entry is kept small, and bounded:

- one writer (the common case): a tuple ``(writer, position, seen_ms)``;
- several: a dict ``writer -> (position, seen_ms)``, at most ``max_writers`` of them. When a
  new writer arrives, writers idle for longer than ``ttl_ms`` are forgotten first, then the
  least recently seen ones until there is room. A forgotten writer's later records count as
  new: a retransmission of a record it sent before it was forgotten gets through.

Entries go to the changelog encoded by :func:`encode` (at most once per key per commit) and
come back through :func:`decode` on restore, where expired writers are dropped too, so the
changelog forgets what memory forgot.

Example:
    >>> entry, forgotten = updated(None, b"w1", 5, 1000, 10_000, 2)
    >>> entry, _ = updated(entry, b"w2", 7, 1001, 10_000, 2)
    >>> last_of(entry, b"w1"), last_of(entry, b"w2"), last_of(entry, b"w3")
    (5, 7, None)
    >>> decode(encode(entry)) == entry
    True
"""

from __future__ import annotations

import hashlib
from typing import Any

Entry = Any  # tuple[bytes, int, int] | dict[bytes, tuple[int, int]]

_MAX_WRITER_BYTES = 64
_MANY, _ONE = 1, 2  # the first byte of an encoded entry
ONE_WRITER = _ONE  # a one-writer entry starts with it (read by a restore's fast path)


def writer_id(raw: bytes) -> bytes:
    """A writer id as the table keeps it: long foreign ids are shortened to a digest."""
    if len(raw) <= _MAX_WRITER_BYTES:
        return raw
    return b"#" + hashlib.blake2b(raw, digest_size=16).digest()


def last_of(entry: Entry, writer: bytes) -> int | None:
    """The last position ``writer`` delivered for the key, or ``None``."""
    if type(entry) is tuple:
        return entry[1] if entry[0] == writer else None
    found = entry.get(writer)
    return None if found is None else found[0]


def updated(
    entry: Entry | None, writer: bytes, pos: int, now: int, ttl_ms: int, max_writers: int
) -> tuple[Entry, int]:
    """The entry after ``writer`` delivered ``pos``; and how many writers the bound evicted.

    Writers that merely expired (idle past ``ttl_ms``) are not counted as evicted.
    """
    if entry is None or (type(entry) is tuple and entry[0] == writer):
        return (writer, pos, now), 0
    if type(entry) is dict and writer in entry:
        entry[writer] = (pos, now)  # the caller stores it back (a RocksDB get is a copy)
        return entry, 0
    writers: dict[bytes, tuple[int, int]] = (
        {entry[0]: (entry[1], entry[2])} if type(entry) is tuple else dict(entry)
    )
    horizon = now - ttl_ms
    writers = {w: ps for w, ps in writers.items() if ps[1] > horizon}
    evicted = 0
    while len(writers) >= max_writers:
        oldest = min(writers, key=lambda w: writers[w][1])
        del writers[oldest]
        evicted += 1
    if not writers:
        return (writer, pos, now), evicted
    writers[writer] = (pos, now)
    return writers, evicted


def expired(entry: Entry, now: int, ttl_ms: int) -> Entry | None:
    """``entry`` without writers idle past ``ttl_ms`` (``None`` when none is left)."""
    horizon = now - ttl_ms
    if type(entry) is tuple:
        return entry if entry[2] > horizon else None
    live = {w: ps for w, ps in entry.items() if ps[1] > horizon}
    if not live:
        return None
    if len(live) == 1:
        ((w, (p, s)),) = live.items()
        return (w, p, s)
    return live


_HEADS: dict[bytes, bytes] = {}  # writer -> b"\x02" + len + writer (writers are few)


def head_of(writer: bytes) -> bytes:
    """The start of a one-writer entry's encoding (cached: writers are few)."""
    if len(_HEADS) > 10_000:
        _HEADS.clear()
    head = _HEADS[writer] = bytes((_ONE, len(writer))) + writer
    return head


def encode(entry: Entry) -> bytes:
    """The changelog value of an entry (at most once per key per commit: kept cheap).

    One writer (format 2): ``0x02, len(writer), writer, seen (8 bytes), position``; several
    (format 1): ``0x01`` then per writer ``len(writer), writer, len(position), position,
    seen (8 bytes)``. Positions are signed big-endian integers.
    """
    if type(entry) is tuple:
        writer: bytes
        pos: int
        seen: int
        writer, pos, seen = entry
        head = _HEADS.get(writer) or head_of(writer)
        return (
            head
            + seen.to_bytes(8, "big")
            + pos.to_bytes(pos.bit_length() // 8 + 1, "big", signed=True)
        )
    out = bytearray((_MANY,))
    for writer, (pos, seen) in entry.items():
        raw_pos = pos.to_bytes(pos.bit_length() // 8 + 1, "big", signed=True)
        out.append(len(writer))
        out += writer
        out.append(len(raw_pos))
        out += raw_pos
        out += seen.to_bytes(8, "big")
    return bytes(out)


def decode(raw: bytes) -> Entry:
    """An entry from its changelog value.

    Raises:
        ValueError: The value is not in this format (a changelog written by another version).
    """
    if not raw:
        raise ValueError("not a writer-positions entry")
    if raw[0] == _ONE:
        size = raw[1]
        end = 2 + size
        writer = raw[2:end]
        seen = int.from_bytes(raw[end : end + 8], "big")
        return (writer, int.from_bytes(raw[end + 8 :], "big", signed=True), seen)
    if raw[0] != _MANY:
        raise ValueError("not a writer-positions entry")
    writers: dict[bytes, tuple[int, int]] = {}
    i, n = 1, len(raw)
    while i < n:
        size = raw[i]
        writer = raw[i + 1 : i + 1 + size]
        i += 1 + size
        size = raw[i]
        pos = int.from_bytes(raw[i + 1 : i + 1 + size], "big", signed=True)
        i += 1 + size
        seen = int.from_bytes(raw[i : i + 8], "big")
        i += 8
        writers[writer] = (pos, seen)
    if len(writers) == 1:
        ((w, (p, s)),) = writers.items()
        return (w, p, s)
    return writers
