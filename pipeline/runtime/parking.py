"""Replayed records and parked keys: the rule that keeps a key's order around dead letters.

A stage's ``on_dead_letter`` policy (:class:`~pipeline.stage.DeadLetterPolicy`) says what
happens to the later records of a key once one of its records is dead-lettered: they are
processed as usual (*continue*, the default), or *parked*.

**Parking** (``DeadLetterPolicy.park()``):

1. When a record of key K is dead-lettered (for any reason: undecodable, failed after its
   retries, unencodable output), K is *parked*: the stage's state table gets
   ``\\x03 + K -> park`` through its changelog, so the park survives restarts and rebalances.
   The park names the dead letter (input topic/partition/offset, error class) and the replay
   it happened in (``""`` when it was not a replayed record).
2. While K is parked, every later record of K goes to the dead-letter topic untouched, in
   offset order, with error class ``Parked`` and a message naming the dead letter that parked
   K. Other keys are not affected. Records without a key are never parked.
3. A replay (``pipeline dlq replay``, :mod:`pipeline.dlq`) re-publishes dead letters to the
   stage's input with ``dlq.replayed = R``, a replay id unique to that run and ordered by its
   start time (:func:`new_replay_id`), and ``dlq.replayed.stage`` = the stage. When a record of
   replay R reaches that stage (and is not a duplicate, see below):

   a. K is not parked: the record is processed;
   b. K's park predates R (made outside a replay, or in a replay whose id sorts before R): K is
      unparked and the record processed. If it is dead-lettered again, K is parked again,
      now under R;
   c. K is parked under R (or under a later replay): the record is parked again. So once a
      replayed record fails again, the rest of replay R for K queues up behind it, in order.

   Replaying a parked key's dead letters therefore sends them through in their original order
   as long as the replay includes its ``Parked`` records (no ``--where`` that drops them), and
   the key stays parked, in order, at the first record that still fails.
4. A record replayed to an *upstream* stage reaches this stage as that stage's output, still
   marked ``dlq.replayed`` but for another stage: here it is a new record (parked if K is).

**Deduplication of replayed records.** Dead-lettered and parked records are remembered by the
dedup table like any handled record, so a redelivered copy does not create a second dead
letter. A replayed copy carries the same ``seq`` and ``event-id``, and in *continue* mode later
records of its key may have passed already, so the sequence table would call it a duplicate.
Replayed records are therefore deduplicated by a *replay identity* instead (the key, writer
and sequence position, else the event id; ``\\x04`` in the state table), which is remembered only
once the record is processed (output or filtered): a second replay of the same dead letter is
then a counted duplicate, while a record that failed again can be replayed again. With
``DedupPolicy.off()`` every replay is processed again.

**Limits.** A replay re-publishes the dead letters present when it started; a record parked
after that (e.g. a new record of K that arrives while the replay is in flight) waits for the
next replay. Re-published records are new input offsets: the ``dlq.offset`` of a dead letter
that failed again names the replayed copy.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pipeline.runtime.deadletter import REPLAYED, REPLAYED_STAGE
from pipeline.runtime.state import PartitionTable, encode_position, position


def new_replay_id() -> str:
    """A replay id: unique, and ordered by the time the replay started.

    Example:
        >>> a = new_replay_id()
        >>> len(a), a < "99999999T000000.000Z"
        (27, True)
    """
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}.{int(now * 1000) % 1000:03d}Z-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class Park:
    """Why a key is parked: the dead letter that parked it, and the replay it happened in.

    Example:
        >>> p = Park(replay="", topic="in", partition=1, offset=7, error="ValueError")
        >>> Park.decode(p.encode()) == p
        True
    """

    replay: str  # "" when the dead-lettered record was not replayed to this stage
    topic: str
    partition: int
    offset: int
    error: str

    def encode(self) -> bytes:
        fields = [self.replay, self.topic, self.partition, self.offset, self.error]
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Park:
        replay, topic, partition, offset, error = json.loads(raw)
        return cls(str(replay), str(topic), int(partition), int(offset), str(error))

    def reason(self) -> str:
        """The message of the records parked behind this dead letter."""
        where = f" in replay {self.replay}" if self.replay else ""
        return (
            f"key parked: its record {self.topic}/{self.partition}@{self.offset} was "
            f"dead-lettered ({self.error}){where}; replay the dead letters to resume"
        )


class ReplayMark:
    """What to remember once a replayed record is processed (the handler's dedup mark).

    Example:
        >>> table = PartitionTable(0, {})
        >>> ReplayMark(b"e-1", None, "r1").done(table, b"k", now_ms=5)
        >>> table.was_replayed(b"e-1")
        True
    """

    __slots__ = ("identity", "position", "replay", "writer")

    def __init__(
        self, identity: bytes | None, pos: int | None, replay: str, writer: bytes = b""
    ) -> None:
        self.identity = identity
        self.position = pos
        self.replay = replay  # "" unless the record is replayed to this stage
        self.writer = writer

    def done(self, table: PartitionTable, key: bytes | None, now_ms: int) -> None:
        """The record is processed: later replays of it are duplicates."""
        if self.identity is not None:
            table.remember_replayed(self.identity, now_ms)
        if self.position is not None and key is not None:
            last = table.last_position(key, self.writer)
            if last is None or self.position > last:  # never move the sequence table back
                table.remember_sequence(key, self.writer, self.position, now_ms)


def replay_identity(
    key: bytes | None,
    writer: bytes,
    seq: int | None,
    part: int,
    eid: bytes | None,
    by_seq: bool,
    by_id: bool,
) -> tuple[bytes | None, int | None]:
    """The replay identity of a record and its sequence position (``None`` when unknown)."""
    if by_seq and seq is not None and key is not None:
        pos = position(seq, part)
        ident = len(key).to_bytes(4, "big") + key + bytes((len(writer),)) + writer
        return b"s" + ident + encode_position(pos), pos
    if by_id and eid is not None:
        return b"e" + eid, None
    return None, None


def replay_of(headers: Any, stage: str) -> str:
    """The id of the replay ``headers`` mark as replayed to ``stage``, else ``""``."""
    found = dict(headers)
    if found.get(REPLAYED_STAGE) != stage.encode():
        return ""
    return bytes(found.get(REPLAYED, b"")).decode("utf-8", "replace")


def admit_replayed(table: PartitionTable, key: bytes | None, replay: str) -> Park | None:
    """Rule 3 for a replayed record of a parking stage: ``None`` to process it (unparking its
    key when the park predates this replay), else the park to keep it behind."""
    if key is None:
        return None
    raw = table.parked(key)
    if raw is None:
        return None
    park = Park.decode(raw)
    if replay and park.replay < replay:
        table.unpark(key)
        return None
    return park
