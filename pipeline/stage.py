"""Stages: named, reusable filters, and the small policy objects that configure them.

A stage is a plain function, sync or async, that takes a decoded value (and, if it declares a
second parameter, the :class:`~pipeline.record.Record` as context) and returns

- a value: one output record with the input's key, sequence number and event id;
- ``None``: the record is filtered out (counted, never silently lost);
- a list, tuple or generator of values: several output records (flat-map);
- :class:`~pipeline.record.Emit`: an output with another key or extra headers.
"""

from __future__ import annotations

import enum
import inspect
import random
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DefinitionError
from pipeline.record import Record

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")

StageFn = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failing stage function is retried before dead-lettering.

    Args:
        max_attempts: Attempts in all, the first included (1 = no retry).
        initial_backoff: Seconds before the first retry.
        max_backoff: Upper bound of one wait.
        multiplier: Growth of the wait per attempt.
        jitter: Random share (0..1) taken off each wait, so retries of many records spread out.

    Example:
        >>> RetryPolicy(max_attempts=3, initial_backoff=0.1, jitter=0).backoff(2)
        0.2
    """

    max_attempts: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise DefinitionError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise DefinitionError("RetryPolicy backoffs must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise DefinitionError("RetryPolicy.jitter must be between 0 and 1")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        try:
            grown = self.initial_backoff * self.multiplier ** (attempt - 1)
        except OverflowError:  # a very late attempt: the cap applies
            grown = self.max_backoff
        base = min(self.max_backoff, grown)
        return base * (1 - self.jitter * random.random())


class DedupMode(enum.Enum):
    """How a stage recognises a record it has already processed."""

    AUTO = "auto"  # by sequence when records carry one, else by event id, else off
    SEQUENCE = "sequence"
    EVENT_ID = "event_id"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class DedupPolicy:
    """Deduplication of a stage's input through its keyed state table.

    By sequence, a record is a duplicate when *its writer* (the ``writer`` header a
    :class:`~pipeline.Publisher` stamps) already delivered that sequence for that key: many
    publishers may write the same keys at once. The table keeps the last position per (key,
    writer), at most ``max_writers`` writers per key: when a new writer arrives, writers idle for
    ``writer_ttl`` are forgotten first, then the least recently seen. A forgotten writer's
    retransmission of an old record is processed again (counted in ``writers_evicted`` when the
    bound, not the TTL, forgot it).

    By event id, an id seen within ``ttl`` is a duplicate; at most ``max_ids`` ids are kept per
    partition (the oldest go first, counted in ``ids_evicted``). Forgotten ids leave the
    compacted changelog too (tombstones).

    Example:
        >>> DedupPolicy.by_event_id(ttl=3600).mode
        <DedupMode.EVENT_ID: 'event_id'>
        >>> DedupPolicy.by_sequence(max_writers=8).max_writers
        8
    """

    mode: DedupMode = DedupMode.AUTO
    ttl: float = 7 * 24 * 3600.0  # seconds an event id is remembered (event-id mode)
    max_ids: int = 1_000_000  # bound on remembered event ids per partition (event-id mode)
    writer_ttl: float = 7 * 24 * 3600.0  # seconds an idle writer is remembered (sequence mode)
    max_writers: int = 32  # bound on writers remembered per key (sequence mode)

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.writer_ttl <= 0:
            raise DefinitionError("DedupPolicy: ttl and writer_ttl must be positive (seconds)")
        if self.max_ids < 1 or self.max_writers < 1:
            raise DefinitionError("DedupPolicy: max_ids and max_writers must be at least 1")

    @classmethod
    def by_sequence(cls, writer_ttl: float = 7 * 24 * 3600.0, max_writers: int = 32) -> DedupPolicy:
        """``seq <= last seq of the key's writer`` is a duplicate; a gap is counted, processed."""
        return cls(DedupMode.SEQUENCE, writer_ttl=writer_ttl, max_writers=max_writers)

    @classmethod
    def by_event_id(cls, ttl: float = 7 * 24 * 3600.0, max_ids: int = 1_000_000) -> DedupPolicy:
        """An event id seen within ``ttl`` seconds is a duplicate."""
        return cls(DedupMode.EVENT_ID, ttl=ttl, max_ids=max_ids)

    @classmethod
    def off(cls) -> DedupPolicy:
        """No deduplication."""
        return cls(DedupMode.OFF)


class AfterDeadLetter(enum.Enum):
    """What happens to the later records of a key once one of its records is dead-lettered."""

    CONTINUE = "continue"  # later records are processed as usual (the default)
    PARK = "park"  # later records join it in the dead-letter topic until a replay (key order)


@dataclass(frozen=True, slots=True)
class DeadLetterPolicy:
    """What a stage does with a key after one of its records was dead-lettered.

    By default the key's later records are processed as usual (``continue``): the dead letter
    is replayed later, out of order. With :meth:`park`, the key's later records are *parked*
    next to it in the dead-letter topic (error class ``Parked``) until a replay sends them
    through again in their original order; other keys are not affected. Parked keys live in
    the stage's state table, so they survive restarts and rebalances. The full rule is in
    :mod:`pipeline.runtime.parking`.

    Example:
        >>> DeadLetterPolicy.park().mode
        <AfterDeadLetter.PARK: 'park'>
        >>> DeadLetterPolicy().parks
        False
    """

    mode: AfterDeadLetter = AfterDeadLetter.CONTINUE

    @classmethod
    def proceed(cls) -> DeadLetterPolicy:
        """Keep processing the key's later records (the default)."""
        return cls(AfterDeadLetter.CONTINUE)

    @classmethod
    def park(cls) -> DeadLetterPolicy:
        """Park the key's later records in the dead-letter topic until they are replayed."""
        return cls(AfterDeadLetter.PARK)

    @property
    def parks(self) -> bool:
        """Whether keys are parked after a dead letter."""
        return self.mode is AfterDeadLetter.PARK


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a failing dependency pauses the stage instead of filling its dead-letter topic.

    A record whose call still fails after its retries with a *retriable* error is not
    dead-lettered at once: it is *held* (later records of its key wait behind it; other keys go
    on), until the evidence says what it is:

    - another call succeeds: the dependency works, so the held records are poison and go to the
      dead-letter topic as before (their keys' waiting records follow);
    - records of ``keys`` different keys fail in a row with the same error class and no call
      succeeds in between: the dependency is down. The breaker *opens*: the worker pauses its
      partitions (it stays in its group, commits nothing past a held record, reports not ready)
      and tries a held record again every ``probe_interval`` seconds, doubling up to
      ``max_probe_interval``; when a call succeeds it resumes, and every held record is handled
      again, nothing dead-lettered;
    - ``verdict_timeout`` seconds pass with neither: the held records are dead-lettered (a
      poison record at the end of a burst does not wait forever), and their keys' waiting
      records that fail too follow them without a new wait.

    Non-retriable errors (``StageError(retriable=False)``, undecodable records, outputs that
    break the schema) never wait: they go to the dead-letter topic at once. A burst of ``keys``
    different poison records in a row failing with the same retriable error looks like an
    outage: raise a non-retriable error for input you know is bad.

    Example:
        >>> BreakerPolicy().keys, BreakerPolicy.off().enabled
        (3, False)
    """

    keys: int = 3
    verdict_timeout: float = 60.0
    probe_interval: float = 1.0
    max_probe_interval: float = 30.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.keys < 1:
            raise DefinitionError("BreakerPolicy.keys must be at least 1")
        if min(self.verdict_timeout, self.probe_interval, self.max_probe_interval) <= 0:
            raise DefinitionError("BreakerPolicy times must be positive (seconds)")

    @classmethod
    def off(cls) -> BreakerPolicy:
        """Dead-letter every record whose retries run out, whatever the others do."""
        return cls(enabled=False)

    def probe_wait(self, probe: int) -> float:
        """Seconds before probe number ``probe`` (1-based) while the breaker is open."""
        return float(min(self.max_probe_interval, self.probe_interval * 2 ** min(probe - 1, 30)))


@dataclass(frozen=True, slots=True)
class CrashPolicy:
    """When a record that kills its worker process is dead-lettered instead of run again.

    A record can end its worker without an exception the stage could catch: ``os._exit``, a
    segfault in a C extension, the kernel's OOM killer, a ``BaseException`` such as
    ``SystemExit``. Restarted, the worker would read the same record again and die again,
    forever. So the worker counts *deliveries across restarts* in the committed offset's
    metadata (see :mod:`pipeline.runtime.crashes`): a record delivered ``max_deliveries`` times
    by workers that all died with it, two of them with it alone in hand, is dead-lettered with
    error class ``CrashLoop`` on the next start, and the records behind it flow.
    ``max_deliveries=None`` turns it off.

    An unrelated death (a SIGKILL while a batch was in flight) counts as a delivery of the
    records in flight, but only narrows the suspects down: the verdict needs two deaths with
    the same record alone in hand.

    Example:
        >>> CrashPolicy().max_deliveries, CrashPolicy.off().enabled
        (3, False)
    """

    max_deliveries: int | None = 3

    def __post_init__(self) -> None:
        if self.max_deliveries is not None and self.max_deliveries < 2:
            raise DefinitionError(
                "CrashPolicy.max_deliveries must be at least 2 (the first death only shows "
                "that one of the records in flight killed the worker, not which one), or None"
            )

    @classmethod
    def off(cls) -> CrashPolicy:
        """Never dead-letter a record for killing its worker."""
        return cls(max_deliveries=None)

    @property
    def enabled(self) -> bool:
        """Whether deliveries are counted across restarts."""
        return self.max_deliveries is not None


Setup = Callable[[], AbstractAsyncContextManager[Any]]


@dataclass(frozen=True, slots=True)
class Stage:
    """A named, reusable filter with declared Avro input and output schemas.

    Build one with the :func:`stage` decorator. A stage with ``output=None`` is a sink: it
    consumes and acts (e.g. calls a service) but writes no output topic.

    Example:
        >>> @stage(input="demo.Order", output="demo.Order")
        ... def double(order):
        ...     return {**order, "total": order["total"] * 2}
        >>> double.name, double.concurrency
        ('double', 1)
    """

    name: str
    fn: StageFn
    input: str
    output: str | None
    concurrency: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    dedup: DedupPolicy = field(default_factory=DedupPolicy)
    on_dead_letter: DeadLetterPolicy = field(default_factory=DeadLetterPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    crash: CrashPolicy = field(default_factory=CrashPolicy)
    compensate: StageFn | None = None  # undoes the stage's work for a record dead-lettered later
    setup: Setup | None = None
    is_async: bool = False
    wants_record: bool = False
    reads: tuple[str, ...] = ()  # other topics it reads (a table's): its ACLs grant them

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise DefinitionError(
                f"stage name {self.name!r} is not valid: use letters, digits, '_' or '-', "
                f"starting with a letter (it becomes part of topic and group names)"
            )
        if self.concurrency < 1:
            raise DefinitionError(f"stage '{self.name}': concurrency must be at least 1")
        if self.compensate is not None and not callable(self.compensate):
            raise DefinitionError(f"stage '{self.name}': compensate must be a function")
        if self.setup is not None and not callable(self.setup):
            raise DefinitionError(
                f"stage '{self.name}': setup must be a function that returns an async context "
                f"manager (e.g. one decorated with @contextlib.asynccontextmanager)"
            )
        if self.concurrency > 1 and not self.is_async:
            raise DefinitionError(
                f"stage '{self.name}': concurrency={self.concurrency} needs an async function "
                f"(a sync function blocks the event loop, so it could not overlap anything)"
            )

    def __call__(self, value: Any, record: Record | None = None) -> Any:
        """Call the function as the worker does (handy in plain unit tests)."""
        if self.wants_record:
            return self.fn(value, record if record is not None else Record(None, value))
        return self.fn(value)

    def invoker(self) -> Callable[[Any, Record], Any] | Callable[[Any, Record], Awaitable[Any]]:
        """The one adapter through which the worker calls user code: ``f(value, record)``.

        Generator functions are run to the end inside the call, so that an exception they
        raise is retried and dead-lettered like any other.
        """
        fn = self.fn
        call: Callable[[Any, Record], Any] = (
            fn if self.wants_record else (lambda value, _record: fn(value))
        )
        if inspect.isgeneratorfunction(fn):
            return lambda value, record: list(call(value, record))
        if inspect.isasyncgenfunction(fn):

            async def collect(value: Any, record: Record) -> list[Any]:
                return [item async for item in call(value, record)]

            return collect
        return call


def stage(
    name: str | None = None,
    *,
    input: str,
    output: str | None,
    concurrency: int = 1,
    retry: RetryPolicy | None = None,
    dedup: DedupPolicy | None = None,
    on_dead_letter: DeadLetterPolicy | None = None,
    breaker: BreakerPolicy | None = None,
    crash: CrashPolicy | None = None,
    compensate: StageFn | None = None,
    setup: Setup | None = None,
    reads: tuple[str, ...] = (),
) -> Callable[[StageFn], Stage]:
    """Turn a function into a :class:`Stage`.

    Args:
        name: Stage name (default: the function's name); part of topic and group names.
        input: Full name of the Avro schema the stage reads.
        output: Full name of the Avro schema it writes, or ``None`` for a sink.
        concurrency: Records of different keys processed at once (async functions only);
            each key keeps its order.
        retry: Retries before a failing record is dead-lettered.
        dedup: How duplicates are recognised.
        on_dead_letter: What happens to a key's later records once one of its records is
            dead-lettered: processed as usual (default) or parked until a replay.
        breaker: When failures of many keys in a row pause the stage instead of
            dead-lettering (see :class:`BreakerPolicy`).
        crash: When a record that kills its worker process again and again is dead-lettered
            (see :class:`CrashPolicy`).
        compensate: Undoes what the stage did for a record that a *later* stage of the
            pipeline dead-letters: called (sync or async) with that record's value as the
            failing stage read it, and its :class:`~pipeline.record.Record` (the ``dlq.*``
            headers say where and why), once per dead-lettered record, the later stages'
            compensations first (see :mod:`pipeline.runtime.compensation`).
        setup: Opens what the stage needs once per worker, e.g. a client: a function returning
            an async context manager. The worker enters it before it joins the group (retrying
            with backoff while it fails, consuming nothing), exits it when it stops, and hands
            what it yields to the stage as ``record.resource``.
        reads: Topics the stage reads besides its input (e.g. a table's compacted topic), so
            that ``pipeline acl`` grants its principal READ on them.

    Example:
        >>> import contextlib
        >>> @contextlib.asynccontextmanager
        ... async def client():
        ...     yield {"connected": True}          # e.g. an HTTP client, a database pool
        >>> @stage(input="demo.Order", output="demo.Order", setup=client)
        ... async def call(order, record):
        ...     assert record.resource["connected"]
        ...     return order
        >>> call.setup is client
        True
    """

    def wrap(fn: StageFn) -> Stage:
        return Stage(
            name=name or fn.__name__,
            fn=fn,
            input=input,
            output=output,
            concurrency=concurrency,
            retry=retry or RetryPolicy(),
            dedup=dedup or DedupPolicy(),
            on_dead_letter=on_dead_letter or DeadLetterPolicy(),
            breaker=breaker or BreakerPolicy(),
            crash=crash or CrashPolicy(),
            compensate=compensate,
            setup=setup,
            is_async=inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn),
            wants_record=positional_arity(fn) >= 2,
            reads=tuple(reads),
        )

    return wrap


def positional_arity(fn: StageFn) -> int:
    """How many positional arguments ``fn`` takes (2 or more: it wants the record too)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in kinds)
