"""Dead letters as values: reading their headers, filtering them, planning a replay (no I/O).

:class:`Replay` decides what one replay run re-publishes; :mod:`pipeline.dlq.kafka` feeds it
from the broker, and tests feed it from the in-memory broker.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError
from pipeline.runtime import deadletter as dl
from pipeline.runtime.parking import new_replay_id

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One record of a dead-letter topic, with its ``dlq.*`` headers read out.

    Example:
        >>> r = DeadLetterRecord(0, 5, b"k", b"v", (("dlq.error.class", b"ValueError"),))
        >>> r.error_class, r.origin
        ('ValueError', None)
    """

    partition: int  # where it is in the dead-letter topic
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    timestamp: int = 0

    @classmethod
    def of(cls, record: Any) -> DeadLetterRecord:
        """From a consumed record (aiokafka's, or the memory broker's)."""
        return cls(
            record.partition, record.offset, record.key, record.value,
            tuple(record.headers), record.timestamp,
        )  # fmt: skip

    def header(self, name: str) -> str:
        """The last value of header ``name`` as text (``""`` if absent)."""
        found = b""
        for k, v in self.headers:
            if k == name:
                found = v
        return found.decode("utf-8", "replace")

    @property
    def error_class(self) -> str:
        return self.header(dl.ERROR_CLASS) or "(no dlq headers)"

    @property
    def error_message(self) -> str:
        return self.header(dl.ERROR_MESSAGE)

    @property
    def stage(self) -> str:
        return self.header(dl.STAGE)

    @property
    def attempts(self) -> int:
        return _int(self.header(dl.ATTEMPTS), 0)

    @property
    def trace(self) -> str:
        return self.header(dl.TRACEBACK)

    @property
    def receipt(self) -> tuple[int, int] | None:
        """For a replay receipt: the dead letter it says was replayed (partition, offset)."""
        text = self.header(dl.RECEIPT)
        part, sep, off = text.partition("@")
        if not sep or _int(part, -1) < 0 or _int(off, -1) < 0:
            return None
        return int(part), int(off)

    def receipt_of(self, replay_id: str) -> ReplayItem:
        """The receipt that says this dead letter was replayed by run ``replay_id``."""
        headers = [
            (dl.RECEIPT, f"{self.partition}@{self.offset}".encode()),
            (dl.REPLAYED, replay_id.encode()),
            (dl.ERROR_CLASS, self.error_class.encode()),
        ]
        return ReplayItem(self.key, None, headers, self.partition)

    @property
    def origin(self) -> tuple[str, int, int] | None:
        """The input topic, partition and offset the record was dead-lettered from."""
        topic, part, off = self.header(dl.TOPIC), self.header(dl.PARTITION), self.header(dl.OFFSET)
        if not topic or _int(part, -1) < 0 or _int(off, -1) < 0:
            return None
        return topic, int(part), int(off)


@dataclass(frozen=True, slots=True)
class Where:
    """Which dead letters to replay or show: ``field=value`` terms that must all match.

    A term's value may list alternatives separated by commas. Fields: ``error_class``, ``key``,
    ``stage``, ``topic`` and ``partition`` (the original input topic and partition), and ``at``
    (``PARTITION@OFFSET`` in the dead-letter topic: one dead letter).

    Example:
        >>> w = Where.parse(["error_class=ValueError,KeyError"])
        >>> w.matches(DeadLetterRecord(0, 0, b"k", b"v", (("dlq.error.class", b"KeyError"),)))
        True
        >>> Where.parse([]).matches(DeadLetterRecord(0, 0, None, None))
        True
    """

    terms: tuple[tuple[str, frozenset[str]], ...] = ()

    FIELDS = ("error_class", "key", "stage", "topic", "partition", "at")

    @classmethod
    def parse(cls, expressions: Iterable[str]) -> Where:
        """Parse ``--where`` options.

        Raises:
            ConfigError: Not ``field=value``, or an unknown field (the message lists them).
        """
        terms = []
        for expr in expressions:
            name, sep, value = expr.partition("=")
            name = name.strip()
            if not sep or not name or not value.strip():
                raise ConfigError(
                    f"--where {expr!r} is not FIELD=VALUE (e.g. error_class=KeyError)"
                )
            if name not in cls.FIELDS:
                raise ConfigError(
                    f"--where {expr!r}: unknown field '{name}'; fields: {', '.join(cls.FIELDS)}"
                )
            terms.append((name, frozenset(v.strip() for v in value.split(",") if v.strip())))
        return cls(tuple(terms))

    def matches(self, record: DeadLetterRecord) -> bool:
        return all(_field(record, name) in allowed for name, allowed in self.terms)

    def __str__(self) -> str:
        return " and ".join(f"{n}={','.join(sorted(v))}" for n, v in self.terms) or "all"


def _field(record: DeadLetterRecord, name: str) -> str:
    if name == "error_class":
        return record.error_class
    if name == "key":
        return (record.key or b"").decode("utf-8", "replace")
    if name == "stage":
        return record.stage
    if name == "at":
        return f"{record.partition}@{record.offset}"
    return record.header(dl.TOPIC if name == "topic" else dl.PARTITION)


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """A dead letter as it is re-published to the stage's input.

    Example:
        >>> ReplayItem(b"k", b"v", [("dlq.replayed", b"r1")], partition=2).partition
        2
    """

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    partition: int | None  # the original input partition, when the dead letter says


@dataclass(slots=True)
class ReplayReport:
    """What a replay did: ``read`` dead letters, ``matched`` the filter, of which ``replayed``
    were re-published and ``skipped`` were copies of a dead letter replayed in this run.

    Example:
        >>> ReplayReport("r1", "enrich", "orders.in", read=3, matched=2, replayed=2).skipped
        0
    """

    replay_id: str
    stage: str
    topic: str  # the stage's input topic
    read: int = 0
    matched: int = 0
    replayed: int = 0
    skipped: int = 0
    dry_run: bool = False
    by_class: Counter[str] = field(default_factory=Counter)  # replayed, by error class

    def as_dict(self) -> dict[str, object]:
        return {
            "replay_id": self.replay_id, "stage": self.stage, "topic": self.topic,
            "read": self.read, "matched": self.matched, "replayed": self.replayed,
            "skipped": self.skipped, "dry_run": self.dry_run, "by_class": dict(self.by_class),
        }  # fmt: skip


class Replay:
    """Decides, dead letter by dead letter, what one replay run re-publishes (no I/O).

    Args:
        stage: The stage the dead letters belong to (and are replayed to).
        topic: The stage's input topic.
        where: Which dead letters to replay.
        replay_id: This run's id (default: a new one).

    Example:
        >>> run = Replay("enrich", "orders.in", Where(), replay_id="r1")
        >>> item = run.offer(DeadLetterRecord(0, 0, b"k", b"v", (("dlq.error.class", b"E"),)))
        >>> item.headers, run.report.replayed
        ([('dlq.replayed', b'r1'), ('dlq.replayed.stage', b'enrich')], 1)
    """

    def __init__(self, stage: str, topic: str, where: Where, replay_id: str | None = None) -> None:
        self.where = where
        self.report = ReplayReport(replay_id or new_replay_id(), stage, topic)
        self._seen: set[tuple[str, int, int]] = set()

    def offer(self, record: DeadLetterRecord) -> ReplayItem | None:
        """The record to re-publish for this dead letter, or ``None`` (unmatched, a copy, or
        a replay receipt)."""
        report = self.report
        if record.receipt is not None:
            return None
        report.read += 1
        if not self.where.matches(record):
            return None
        report.matched += 1
        origin = record.origin or ("(dead-letter topic)", record.partition, record.offset)
        if origin in self._seen:
            report.skipped += 1
            return None
        self._seen.add(origin)
        report.replayed += 1
        report.by_class[record.error_class] += 1
        headers = dl.replay_headers(record.headers, replay_id=report.replay_id, stage=report.stage)
        partition = record.origin[1] if record.origin else None
        return ReplayItem(record.key, record.value, headers, partition)


@dataclass(slots=True)
class DlqSummary:
    """Counts of a stage's dead letters by error class, overall and per partition.

    Example:
        >>> summary = DlqSummary("enrich", "orders.enrich.dlq")
        >>> summary.add(DeadLetterRecord(1, 0, b"k", b"v", (("dlq.error.class", b"KeyError"),)))
        >>> summary.as_dict()["by_partition"]
        {'1': {'KeyError': 1}}
    """

    stage: str
    topic: str
    total: int = 0
    by_class: Counter[str] = field(default_factory=Counter)
    by_partition: dict[int, Counter[str]] = field(default_factory=dict)
    replayed_by_class: Counter[str] = field(default_factory=Counter)  # from replay receipts
    _receipts: set[tuple[int, int]] = field(default_factory=set)

    def add(self, record: DeadLetterRecord) -> None:
        receipt = record.receipt
        if receipt is not None:  # not a dead letter: a mark that one was replayed
            if receipt not in self._receipts:  # (replayed twice: counted once)
                self._receipts.add(receipt)
                self.replayed_by_class[record.error_class] += 1
            return
        self.total += 1
        self.by_class[record.error_class] += 1
        self.by_partition.setdefault(record.partition, Counter())[record.error_class] += 1

    @property
    def replayed(self) -> int:
        return sum(self.replayed_by_class.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "stage": self.stage, "topic": self.topic, "total": self.total,
            "replayed": self.replayed,
            "by_class": dict(self.by_class),
            "replayed_by_class": dict(self.replayed_by_class),
            "by_partition": {str(p): dict(c) for p, c in sorted(self.by_partition.items())},
        }  # fmt: skip


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default
