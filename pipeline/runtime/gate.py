"""The gate in front of a stage function: is this record new, and what to remember once handled.

Dedup is checked *before* a record is handled and remembered only *after* it is (output
buffered, filtered, or dead-lettered), so the state table never runs ahead of the outputs:

- by sequence, per (key, writer) (:mod:`pipeline.runtime.writers`): ``seq <= last`` of the
  same writer is a duplicate; a skipped sequence is a counted gap;
- by event id, within the TTL (:mod:`pipeline.runtime.ids`);
- replayed records by their replay identity, and parked keys in park mode
  (:mod:`pipeline.runtime.parking`).

A *mark* says what to remember: ``False`` (nothing), a sequence position (``int``; the writer
comes with it to :meth:`Gate.remember`), an event id (``bytes``) or a
:class:`~pipeline.runtime.parking.ReplayMark`; ``None`` from :meth:`Gate.check`
means a duplicate (counted, dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.dsl import StageNode
from pipeline.runtime.deadletter import Parked, error_class
from pipeline.runtime.parking import Park, ReplayMark, admit_replayed, replay_identity, replay_of
from pipeline.runtime.state import DUPLICATE, GAP, PartitionTable, now_ms, position
from pipeline.runtime.stats import StageStats
from pipeline.stage import DedupMode

log = logging.getLogger("pipeline.runtime.handler")

_GAP_LOG_EVERY = 1000


class Gate:
    """Dedup and parks for one stage.

    Args:
        node: The stage (its dedup and dead-letter policies).
        stats: Where duplicates and gaps are counted.
        dead_letter: Writes a dead letter (parked records go through it).
    """

    def __init__(
        self,
        node: StageNode,
        stats: StageStats,
        dead_letter: Callable[[Any, BaseException, int], None],
    ) -> None:
        stage = node.stage
        self.name = node.name
        self.stats = stats
        self._dead_letter = dead_letter
        mode = stage.dedup.mode
        self._by_seq = mode in (DedupMode.AUTO, DedupMode.SEQUENCE)
        self._by_id = mode in (DedupMode.AUTO, DedupMode.EVENT_ID)
        self._parks = stage.on_dead_letter.parks
        self.active = self._by_seq or self._by_id or self._parks  # else the plain path
        # A record was handled that a second delivery would not find a duplicate (no dedup
        # for it): exactly-once key lanes must not commit its outputs ahead of its offset.
        self.unprotected = False
        # The check in front of each record: dedup, plus parks only in park mode.
        self.check = self._check_parked if self._parks else self._check

    def _check(
        self,
        msg: Any,
        table: PartitionTable,
        seq: int | None,
        part: int,
        eid: bytes | None,
        replay: bytes | None,
        writer: bytes,
    ) -> Any:
        """None for a duplicate; otherwise the mark to remember once the record is handled."""
        if replay is not None:
            return self._check_replayed(msg, table, seq, part, eid, writer)
        if self._by_seq and seq is not None and msg.key is not None:
            pos = position(seq, part)
            status = table.check_sequence(msg.key, writer, pos)
            if status == DUPLICATE:
                self.stats.duplicates += 1
                return None
            if status == GAP:
                self.stats.gaps += 1
                if self.stats.gaps % _GAP_LOG_EVERY == 1:
                    log.warning(
                        "stage %s: sequence gap for key %r of writer %r at seq %d (%d gaps so "
                        "far)", self.name, msg.key, writer, seq, self.stats.gaps,
                    )  # fmt: skip
            return pos
        if self._by_id and eid is not None:
            if table.seen_id(eid, now_ms()):
                self.stats.duplicates += 1
                return None
            return eid
        return False  # no dedup for this record

    def remember(self, msg: Any, table: PartitionTable, mark: Any, writer: bytes, now: int) -> None:
        """The record is handled: later copies of it are duplicates."""
        if mark is False:
            self.unprotected = True
            return
        kind = type(mark)
        if kind is int:
            table.remember_sequence(msg.key, writer, mark, now)
        elif kind is ReplayMark:
            if mark.identity is None and (mark.position is None or msg.key is None):
                self.unprotected = True
            mark.done(table, msg.key, now_ms())
        else:
            table.remember_id(mark, now_ms())

    def dead(
        self, msg: Any, exc: BaseException, table: Any, mark: Any, writer: bytes, now: int
    ) -> None:
        """The record was dead-lettered: remember it as handled, park its key (park mode)."""
        replay = ""
        if type(mark) is ReplayMark:
            replay = mark.replay  # not remembered: a later replay may process it
            self.unprotected = True
        else:
            self.remember(msg, table, mark, writer, now)
        if self._parks and msg.key is not None:
            park = Park(replay, msg.topic, msg.partition, msg.offset, error_class(exc))
            table.park(msg.key, park.encode())

    # -- replays and parked keys (see pipeline.runtime.parking) ------------------------------

    def _check_replayed(
        self,
        msg: Any,
        table: PartitionTable,
        seq: int | None,
        part: int,
        eid: bytes | None,
        writer: bytes,
    ) -> ReplayMark | None:
        """A replayed record: dedup by replay identity; then rule 3 (parking stages only)."""
        identity, pos = replay_identity(msg.key, writer, seq, part, eid, self._by_seq, self._by_id)
        if identity is not None and table.was_replayed(identity):
            self.stats.duplicates += 1
            return None
        replay = replay_of(msg.headers, self.name)
        if self._parks:
            park = admit_replayed(table, msg.key, replay)
            if park is not None:
                self._park(msg, park)  # not remembered: a later replay brings it back
                return None
        return ReplayMark(identity, pos, replay, writer)

    def _check_parked(
        self,
        msg: Any,
        table: PartitionTable,
        seq: int | None,
        part: int,
        eid: bytes | None,
        replay: bytes | None,
        writer: bytes,
    ) -> Any:
        """The check of a parking stage: dedup, then park the records of parked keys."""
        mark = self._check(msg, table, seq, part, eid, replay, writer)
        if mark is None or replay is not None or msg.key is None:
            return mark  # replayed records took their own path through the parks
        raw = table.parked(msg.key)
        if raw is None:
            return mark
        self._park(msg, Park.decode(raw))
        self.remember(msg, table, mark, writer, now_ms())  # handled: a redelivered copy is a dup
        return None

    def _park(self, msg: Any, park: Park) -> None:
        self._dead_letter(msg, Parked(park.reason()), 0)
