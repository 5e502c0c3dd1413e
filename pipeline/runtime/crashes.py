"""Crash-loop protection: deliveries counted across worker restarts.

A record can kill its worker process where no ``except`` sees it: ``os._exit``, a segfault in
a C extension, the OOM killer, a ``BaseException``. The restarted worker reads the same record
again from the committed offset and dies again, forever, while every record behind it waits.
Kafka keeps no delivery count, so the worker keeps one where Kafka already stores something
per partition and group: the *metadata* of the committed offset (OffsetCommit and
TxnOffsetCommit both carry it). No extra topic, no extra write on the hot path::

    pipeline.crash/2 <end> <deaths> <alone> <live|stopped>

reads "from the committed offset up to ``end`` (exclusive), records are (``live``) or will only
be handled after a new mark (``stopped``); each of them was in the hands of ``deaths`` workers
that died, ``alone`` of them with that one record alone in hand" (``pipeline.crash/1`` marks,
without ``alone``, are still read). Every ordinary commit at offset ``o`` writes
``o + window 0 0 live``: the records handled next lie in the window (the window is larger than
what a worker holds between two commits). A worker that stops cleanly, or gives a partition up
in a rebalance, writes nothing (or ``stopped``). So a worker that takes a partition and reads
``live`` knows that the previous owner died with records of that range in hand: one more death
for each of them.

Such a range is *suspect*; the new owner handles it with a mark committed before each chunk:

1. first evidence (one death; most often an unrelated kill, e.g. a deployment's SIGKILL):
   chunks of 1, 2, 4, ... up to 64 records, and each chunk that dies is read back as a narrower
   range with one more death;
2. repeated evidence (two deaths or more): one record per chunk, a commit before each, until
   the range is passed;
3. a single record with ``max_deliveries`` deaths, two of them (one when ``max_deliveries`` is
   1) with it alone in hand, is dead-lettered (error class ``CrashLoop``) without being called,
   and the partition goes on with the next one.

A record never reached in a range that died gets the range's deaths too: an unrelated kill
counts as a delivery of whatever was in flight, as a visibility timeout counts one in a queue.
Deaths in a range only narrow it down; the verdict needs two deaths with the record alone in
hand, so unrelated kills (a deployment's, an OOM of a neighbour) that happen to land while the
range is narrowed never condemn an innocent record. A poison record is thus dead-lettered after
``max_deliveries`` deaths when it is first in its chunks (3 by default), one or two more when
the first deaths land on chunks of several records (4 at most by default).

Offsets committed by someone else (``pipeline dlq``, a reset tool) carry other metadata: no
mark, no suspicion.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.stage import CrashPolicy

if TYPE_CHECKING:
    from pipeline.runtime.commits import Commits
    from pipeline.runtime.handler import RecordHandler
    from pipeline.runtime.lanes import KeyLanes
    from pipeline.runtime.state import PartitionTable

log = logging.getLogger(__name__)

_PREFIX = "pipeline.crash/2"
_PREFIX_V1 = "pipeline.crash/1"
#: The largest chunk of a suspect range: a chunk that dies is handled one record at a time next
#: (a commit each, a transaction under exactly-once), so chunks stay small; the range itself is
#: about two fetches, so that is a few hundred marks after a death, not one per record.
MAX_CHUNK = 64


class CrashLoop(Exception):  # named as the error class operators see: "CrashLoop"
    """Why a record was dead-lettered: workers died with it in hand ``max_deliveries`` times."""


@dataclass(frozen=True, slots=True)
class Mark:
    """What a committed offset's metadata says about the records from it on."""

    end: int  # the range ends before this offset
    deaths: int  # deaths each record of the range was in hand for
    live: bool  # whether records of the range may be in a worker's hands now
    alone: int = 0  # deaths of a single-record range with that record alone in hand

    def encode(self) -> str:
        """The metadata string committed with the offset."""
        state = "live" if self.live else "stopped"
        return f"{_PREFIX} {self.end} {self.deaths} {self.alone} {state}"

    @classmethod
    def decode(cls, metadata: str | None) -> Mark | None:
        """The mark in ``metadata``; ``None`` for anything else (another tool's commit).

        Example:
            >>> Mark.decode(Mark(120, 1, True).encode())
            Mark(end=120, deaths=1, live=True, alone=0)
            >>> Mark.decode("pipeline.crash/1 120 2 stopped")
            Mark(end=120, deaths=2, live=False, alone=0)
            >>> Mark.decode("") is None
            True
        """
        parts = (metadata or "").split()
        if len(parts) == 4 and parts[0] == _PREFIX_V1:  # written before ``alone`` was counted
            parts = [_PREFIX, parts[1], parts[2], "0", parts[3]]
        if len(parts) != 5 or parts[0] != _PREFIX or parts[4] not in ("live", "stopped"):
            return None
        try:
            end, deaths, alone = int(parts[1]), int(parts[2]), int(parts[3])
        except ValueError:
            return None
        return cls(end, max(0, deaths), parts[4] == "live", max(0, alone))


@dataclass(slots=True)
class Suspect:
    """A partition's range that was in the hands of a worker that died."""

    end: int  # exclusive
    deaths: int
    alone: int = 0  # deaths with the range's one record alone in hand
    doomed: int | None = None  # the offset of a record to dead-letter without a call
    chunk: int = 1  # records in the next chunk (doubles while deaths == 1)
    chunk_end: int = -1  # the current chunk ends before this offset


# Commit ``offset`` of ``partition`` with ``metadata``, and everything handled so far; False
# when it cannot be committed now (a held record of the partition comes first).
MarkFn = Callable[[int, int, str], Awaitable[bool]]
HandleFn = Callable[[list[Any]], Awaitable[None]]
DoomFn = Callable[[Any, CrashLoop, int], Awaitable[None]]


class CrashGuard:
    """Counts deliveries across restarts for one worker's input partitions.

    Args:
        policy: How many deaths condemn a record.
        window: Offsets past a commit that a worker may hold before its next commit.
        stage: The stage's name, for log lines.
    """

    def __init__(self, policy: CrashPolicy, window: int, stage: str) -> None:
        self.policy = policy
        self.window = window
        self.stage = stage
        self.suspects: dict[int, Suspect] = {}

    @property
    def enabled(self) -> bool:
        """Whether marks are written and read."""
        return self.policy.enabled

    # -- what commits write ----------------------------------------------------------------

    def mark(self, partition: int, offset: int) -> str:
        """The metadata of an ordinary commit of ``partition`` at ``offset``."""
        s = self.suspects.get(partition)
        if s is None or offset >= s.end:
            return Mark(offset + self.window, 0, True).encode()
        if offset < s.chunk_end:  # inside a chunk: its records go on without a new mark
            return Mark(s.chunk_end, s.deaths, True, s.alone).encode()
        # At a chunk boundary: the next record is handled only after its chunk's mark.
        return Mark(s.end, s.deaths, False, s.alone).encode()

    def marks(self, offsets: Mapping[int, int]) -> dict[int, str]:
        """:meth:`mark` for each partition of ``offsets``."""
        return {p: self.mark(p, o) for p, o in offsets.items()}

    def clean(self, offsets: Mapping[int, int]) -> dict[int, str]:
        """The metadata of a clean stop (or a rebalance) at ``offsets``: nothing in hand."""
        marks = {}
        for p, o in offsets.items():
            s = self.suspects.get(p)
            if s is not None and o < s.end and s.deaths:
                marks[p] = Mark(s.end, s.deaths, False, s.alone).encode()  # not passed: keep
            else:
                marks[p] = ""
        return marks

    # -- what a new owner reads ------------------------------------------------------------

    def taken(self, read_from: Mapping[int, tuple[int, str]]) -> dict[int, str]:
        """Partitions taken over, with the offset each is read from and its metadata.

        Returns:
            The metadata to commit at those offsets before any record is handled: the first
            batch must be covered by a live mark too (a worker that dies before its first
            commit would leave no trace), and a suspect range is marked stopped until its
            first chunk's mark (a death before that was not with its records in hand).
        """
        marks = {}
        for partition, (offset, metadata) in read_from.items():
            self.suspects.pop(partition, None)
            mark = Mark.decode(metadata)
            deaths = 0 if mark is None else mark.deaths + (1 if mark.live else 0)
            if mark is None or mark.end <= offset or not deaths:
                marks[partition] = Mark(offset + self.window, 0, True).encode()
                continue
            single = mark.end - offset == 1
            # A death with one record alone in hand: the strong evidence a verdict needs.
            alone = (mark.alone if single else 0) + (1 if single and mark.live else 0)
            s = Suspect(mark.end, deaths, alone)
            limit = self.policy.max_deliveries
            if limit is not None and single and deaths >= limit and alone >= min(2, limit):
                s.doomed = offset
            self.suspects[partition] = s
            marks[partition] = Mark(mark.end, deaths, False, alone).encode()
            log.warning(
                "stage %s: partition %d: a worker died with offsets %d..%d in hand (%d "
                "death(s) each); handling them %s",
                self.stage, partition, offset, mark.end - 1, deaths,
                "with a crash-loop verdict first" if s.doomed is not None
                else "one at a time" if deaths > 1 else "in growing chunks",
            )  # fmt: skip
        return marks

    def forget(self, partitions: Sequence[int] | set[int]) -> None:
        """Partitions that are not ours any more."""
        for p in partitions:
            self.suspects.pop(p, None)

    # -- handling a suspect range ----------------------------------------------------------

    async def handle(
        self, partition: int, msgs: list[Any], handle: HandleFn, mark: MarkFn, doom: DoomFn
    ) -> list[Any]:
        """Handle the records of ``msgs`` that lie in ``partition``'s suspect range, a mark
        committed before each chunk; return the records after the range (handled as usual)."""
        s = self.suspects[partition]
        i, n = 0, len(msgs)
        while i < n:
            first = msgs[i].offset
            if first >= s.end:
                break
            if s.doomed is not None:
                if first == s.doomed:
                    await doom(msgs[i], self._verdict(s.deaths), s.deaths)
                    self.suspects.pop(partition, None)
                    return msgs[i + 1 :]
                s.doomed = None  # gone from the log meanwhile
            if first >= s.chunk_end:  # a new chunk: its mark is durable before any call
                s.chunk_end = min(first + s.chunk, s.end)
                if s.deaths == 1:
                    s.chunk = min(2 * s.chunk, MAX_CHUNK)
                alone = s.alone if s.chunk_end - first == 1 else 0
                live = Mark(s.chunk_end, s.deaths, True, alone).encode()
                if not await mark(partition, first, live):
                    # A held record comes first (the breaker): the rest of the range is one
                    # chunk, handled as usual under the ordinary commits' live marks.
                    s.chunk_end = s.end
                    return msgs[i:]
            j = i
            while j < n and msgs[j].offset < s.chunk_end:
                j += 1
            await handle(msgs[i:j])
            i = j
        if i < n or (i and msgs[i - 1].offset + 1 >= s.end):
            self.suspects.pop(partition, None)  # passed
        return msgs[i:]

    def _verdict(self, deaths: int) -> CrashLoop:
        return CrashLoop(
            f"{deaths} worker(s) died with this record in hand (max_deliveries="
            f"{self.policy.max_deliveries}): it is not run again; replay it once the stage "
            f"survives it"
        )


async def handle_inline(
    guard: CrashGuard,
    handler: RecordHandler,
    commits: Commits,
    partition: int,
    msgs: list[Any],
    table: PartitionTable,
    handled: dict[int, int],
) -> list[Any]:
    """The inline worker's part of a batch in a suspect range: a mark before each chunk, with
    the partitions handled earlier in the batch (``handled``) committed along; returns the
    records to handle as usual (none when the partition's transaction was lost)."""
    lost = False

    async def handle(chunk: list[Any]) -> None:
        if handler.is_async:
            for msg in chunk:
                await handler.handle_one(msg, table)
        else:
            await handler.handle_sync_batch(chunk, table)

    async def mark(p: int, offset: int, metadata: str) -> bool:
        nonlocal lost
        if not commits.markable(p, offset):
            return False
        gone = await commits.mark(
            commits.offsets({q: o for q, o in handled.items() if q != p}), p, offset, metadata
        )
        for q in gone:  # read again from the log: what was handled of them is void
            handled.pop(q, None)
        lost = p in gone
        return not lost

    async def doom(msg: Any, exc: CrashLoop, deaths: int) -> None:
        handler.condemn(msg, table, exc, deaths)

    rest = await guard.handle(partition, msgs, handle, mark, doom)
    return [] if lost else rest


async def handle_in_lanes(
    guard: CrashGuard,
    handler: RecordHandler,
    commits: Commits,
    lanes: KeyLanes,
    partition: int,
    msgs: list[Any],
    table: PartitionTable,
) -> list[Any]:
    """:func:`handle_inline` for the key-lane worker: the lanes are drained first, then the
    suspect records are handled one chunk at a time, in offset order."""
    tracker = commits.tracker
    lost = False
    await lanes.wait_idle()
    await commits.flush_finished()

    async def handle(chunk: list[Any]) -> None:
        for msg in chunk:
            tracker.started(partition, msg.offset)
            if await handler.handle_one(msg, table):
                tracker.finished(partition, msg.offset)

    async def mark(p: int, offset: int, metadata: str) -> bool:
        nonlocal lost
        if not commits.markable(p, offset):
            return False
        lost = p in await commits.mark_finished(p, offset, metadata)
        return not lost

    async def doom(msg: Any, exc: CrashLoop, deaths: int) -> None:
        tracker.started(partition, msg.offset)
        handler.condemn(msg, table, exc, deaths)
        tracker.finished(partition, msg.offset)

    rest = await guard.handle(partition, msgs, handle, mark, doom)
    return [] if lost else rest
