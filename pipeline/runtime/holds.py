"""Held records and the circuit breaker: a dependency that is down pauses a stage; a poison
record still goes to the dead-letter topic.

The rule is :class:`~pipeline.stage.BreakerPolicy`'s; this module keeps its state. A record
whose call still fails after its retries with a retriable error is *held* (not dead-lettered),
and later records of its key wait *behind* it, so the key keeps its order. Records of other
keys go on, and bring the verdict:

- a call succeeds: the held records were poison. The handler dead-letters them and handles the
  records behind them (:meth:`Holds.take`). A record held while the stage *probes* after a
  pause gets one more attempt first: the dependency may have come back between its failure and
  the success;
- ``keys`` different keys failed in a row with the same error class: the dependency is down,
  the breaker *trips*. The worker stops handling, commits exactly what is finished (never past
  a held record), rewinds its partitions to their committed offsets, forgets the holds (the
  records will be read again), pauses its partitions and waits ``probe_wait(n)``; then it
  resumes, and the records are handled again. While it waits it keeps polling, so it stays in
  its group; it reports not ready until a call succeeds;
- ``verdict_timeout`` passes first: the held records are treated as poison.

Commits never pass a held record: :meth:`Holds.first_offsets` caps them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from pipeline.runtime.deadletter import error_class
from pipeline.stage import BreakerPolicy


class Tripped(Exception):
    """Raised out of a batch when the breaker trips (inline worker); the worker pauses."""


class Held:
    """A held record: failed after its retries (``failed``), or waiting behind one."""

    __slots__ = ("attempts", "exc", "failed", "last_chance", "mark", "msg", "record", "table")

    def __init__(
        self,
        msg: Any,
        table: Any,
        *,
        failed: bool,
        exc: BaseException | None = None,
        attempts: int = 0,
        mark: Any = None,
        record: Any = None,
        last_chance: bool = False,
    ) -> None:
        self.msg = msg
        self.table = table
        self.failed = failed
        self.exc = exc
        self.attempts = attempts
        self.mark = mark
        self.record = record
        self.last_chance = last_chance  # held while probing: one more attempt on a success


class Holds:
    """The records a stage holds now, and the breaker's episode.

    Example:
        >>> from pipeline.runtime.transport import TopicPartition
        >>> class Msg:
        ...     def __init__(self, key, offset):
        ...         self.key, self.offset, self.partition = key, offset, 0
        >>> holds = Holds(BreakerPolicy(keys=2))
        >>> holds.hold(Msg(b"a", 5), None, ConnectionError(), 3, None, None)
        False
        >>> holds.blocks(Msg(b"a", 6)), holds.blocks(Msg(b"b", 7))
        (True, False)
        >>> holds.hold(Msg(b"b", 7), None, ConnectionError(), 3, None, None)
        True
        >>> holds.first_offsets()
        {0: 5}
    """

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.enabled = policy.enabled
        self.held: list[Held] = []
        self.tripped = False
        self.tripped_on: set[str] = set()  # error classes that ever tripped the breaker
        self.since: float | None = None  # when this episode's first record was held
        self._clock = clock
        self._keys: set[tuple[int, bytes]] = set()  # (partition, key) with a held record
        self._releasing: set[tuple[int, bytes]] = set()  # keys whose records are released now
        self._failing: dict[str, set[Hashable]] = {}  # error class -> keys failing in a row
        self.active = False  # whether any key waits (held records, or a release running)

    def _sync(self) -> None:
        # An attribute, not a property: the hot path reads it once per record.
        self.active = bool(self.held or self._releasing)

    def blocks(self, msg: Any) -> bool:
        """Whether ``msg`` must wait behind a held (or being released) record of its key."""
        if msg.key is None:
            return False
        pk = (msg.partition, msg.key)
        return pk in self._keys or pk in self._releasing

    def blocks_held(self, msg: Any) -> bool:
        """Whether ``msg`` must wait behind a *held* record of its key (for the releaser)."""
        return msg.key is not None and (msg.partition, msg.key) in self._keys

    def block(self, keys: set[tuple[int, bytes]]) -> None:
        """The (partition, key) pairs a release is handling now: their new records wait."""
        self._releasing = keys
        self._sync()

    def behind(self, msg: Any, table: Any) -> None:
        """Queue ``msg`` (not handled yet) behind the held record of its key."""
        self._insert(Held(msg, table, failed=False))
        self.active = True

    def _insert(self, held: Held) -> None:
        """Keep ``held`` in (partition, offset) order: per key, that is the key's order, so a
        release handles each key's records in the order they were written (records can arrive
        behind a key out of turn while a release runs)."""
        items, p, o = self.held, held.msg.partition, held.msg.offset
        i = len(items)
        while i and (items[i - 1].msg.partition, items[i - 1].msg.offset) > (p, o):
            i -= 1
        items.insert(i, held)

    def hold(
        self,
        msg: Any,
        table: Any,
        exc: BaseException,
        attempts: int,
        mark: Any,
        record: Any,
        *,
        last_chance: bool = False,
    ) -> bool:
        """Hold a record whose retries ran out; return whether the breaker trips now.

        ``last_chance``: it failed while the stage probes after a pause, when the dependency
        may be coming back just now; a success then gives it one more attempt instead of
        the poison verdict.
        """
        if self.since is None:
            self.since = self._clock()
        held = Held(msg, table, failed=True, exc=exc, attempts=attempts, mark=mark, record=record)
        held.last_chance = last_chance
        self._insert(held)
        ident: Hashable
        if msg.key is None:  # keyless records keep no order: they never block each other
            ident = (msg.partition, msg.offset)
        else:
            ident = msg.key
            self._keys.add((msg.partition, msg.key))
        self.active = True
        failing = self._failing.setdefault(error_class(exc), set())
        failing.add(ident)
        if len(failing) >= self.policy.keys:
            self.tripped = True
            self.tripped_on.add(error_class(exc))
        return self.tripped

    def overdue(self) -> bool:
        """Whether the held records waited ``verdict_timeout`` without a verdict."""
        since = self.since
        return (
            since is not None
            and not self.tripped
            and self._clock() - since >= self.policy.verdict_timeout
        )

    def first_offsets(self) -> dict[int, int]:
        """The lowest held offset per partition: no commit may pass it."""
        first: dict[int, int] = {}
        for h in self.held:
            p, o = h.msg.partition, h.msg.offset
            if p not in first or o < first[p]:
                first[p] = o
        return first

    def take(self) -> list[Held]:
        """Every held record, in the order held; the episode ends (the breaker closes)."""
        held = self.held
        self.held, self.tripped, self.since = [], False, None
        self._keys.clear()
        self._failing.clear()
        self._sync()
        return held

    def take_orphans(self) -> list[Held]:
        """Waiting records whose key has no held record any more (they arrived during a
        release); they can be handled now, in order."""
        heads = {(h.msg.partition, h.msg.key) for h in self.held if h.failed}
        orphans: list[Held] = []
        kept: list[Held] = []
        for h in self.held:
            waits = h.failed or (h.msg.partition, h.msg.key) in heads
            (kept if waits else orphans).append(h)
        if orphans:
            if kept:
                self.held = kept
            else:
                self.take()
        return orphans

    def drop(self, partitions: Iterable[int]) -> list[Held]:
        """Forget the held records of ``partitions`` (revoked: their next owner reads them)."""
        gone = set(partitions)
        dropped = [h for h in self.held if h.msg.partition in gone]
        if dropped:
            kept = [h for h in self.held if h.msg.partition not in gone]
            self.take()
            for h in kept:  # rebuild the episode from what is left
                if h.failed:
                    assert h.exc is not None
                    self.hold(
                        h.msg, h.table, h.exc, h.attempts, h.mark, h.record,
                        last_chance=h.last_chance,
                    )  # fmt: skip
                else:
                    self.behind(h.msg, h.table)
        return dropped
