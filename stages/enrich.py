"""Enrichment: join each record with a row of a table (customers by customer id, ...).

:func:`enrich` looks up a field of the record (``on="customer_id"``) in a
:class:`~stages.table.Table` - a :class:`~stages.table.KafkaTable` loaded from a compacted
topic, or a :class:`~stages.table.MemoryTable` - and merges the row into the value as
:class:`Merge` says. What happens when there is no row is :class:`Missing`'s choice:
dead-letter the record (:class:`MissingEntry`, the default), drop it (counted as filtered),
or carry on with default values.

The table is loaded before the stage consumes: the worker's setup waits for it (up to
``ready_timeout`` seconds) before it joins its group, so the first records do not wait for a
load (a Kafka table reads its topic to the end first). Every call still checks: no record is
ever enriched from a half-loaded table. If the table is not ready within ``ready_timeout``
seconds of a call, the call raises the retriable :class:`~stages.table.TableUnavailable`: the
record is retried with the stage's backoff, then dead-lettered.

Example:
    >>> add_customer = enrich(                                     # doctest: +SKIP
    ...     "customer", customers, on="customer_id",
    ...     input="shop.Order", output="shop.CustomerOrder",
    ...     merge=Merge.fields("tier", customer_name="name"),
    ...     missing=Missing.default({"tier": "basic", "name": "?"}),
    ... )
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DefinitionError, PipelineError, StageError
from pipeline.stage import DedupPolicy, RetryPolicy, Stage, stage
from stages._common import bump, check_positive, field_getter
from stages.table import Table, TableUnavailable

__all__ = ["Merge", "Missing", "MissingEntry", "OnMissing", "enrich"]

log = logging.getLogger(__name__)


class MissingEntry(StageError):
    """The table has no row for the record's lookup key (``Missing.dead_letter()``).

    Not retriable by default: the row would have to appear in the table, and a replay of the
    dead letter after it does is the explicit way to get there.
    """

    retriable = False


@dataclass(frozen=True, slots=True)
class Merge:
    """How a table row is combined with the record's value.

    Build one with :meth:`fields`, :meth:`nested` or :meth:`using`.

    Example:
        >>> Merge.fields("tier", customer_name="name").apply({"id": 1}, {"name": "Ada",
        ...                                                              "tier": "gold"})
        {'id': 1, 'tier': 'gold', 'customer_name': 'Ada'}
        >>> Merge.nested("customer").apply({"id": 1}, {"name": "Ada"})
        {'id': 1, 'customer': {'name': 'Ada'}}
    """

    pairs: tuple[tuple[str, str], ...] = ()  # (output field, table field)
    into: str | None = None
    fn: Callable[[Any, Any], Any] | None = None

    @classmethod
    def fields(cls, *names: str, **renamed: str) -> Merge:
        """Copy row fields into the value: ``names`` as they are, ``out=table_field`` renamed.

        A field the row lacks is written as ``None``.
        """
        pairs = (*((n, n) for n in names), *renamed.items())
        if not pairs:
            raise DefinitionError("Merge.fields needs at least one field")
        for out, src in pairs:
            if not isinstance(out, str) or not isinstance(src, str) or not out or not src:
                raise DefinitionError(f"Merge.fields: {out!r} <- {src!r} is not a field name")
        return cls(pairs=pairs)

    @classmethod
    def nested(cls, into: str) -> Merge:
        """Put the whole row into field ``into`` (a nested record in the output schema)."""
        if not isinstance(into, str) or not into:
            raise DefinitionError(f"Merge.nested: {into!r} is not a field name")
        return cls(into=into)

    @classmethod
    def using(cls, fn: Callable[[Any, Any], Any]) -> Merge:
        """Combine with ``fn(value, row)``, which returns the output value."""
        if not callable(fn):
            raise DefinitionError(f"Merge.using needs a function (value, row) -> value, got {fn!r}")
        return cls(fn=fn)

    def apply(self, value: Any, row: Any) -> Any:
        """The output value for ``value`` joined with ``row``."""
        if self.fn is not None:
            return self.fn(value, row)
        if self.into is not None:
            return {**value, self.into: row}
        if not isinstance(row, Mapping):
            raise StageError(
                f"Merge.fields needs rows that are records (dicts), got {type(row).__name__}",
                retriable=False,
            )
        out = dict(value)
        for name, source in self.pairs:
            out[name] = row.get(source)
        return out


class OnMissing(enum.Enum):
    """What :func:`enrich` does with a record whose key has no row.

    Example:
        >>> OnMissing("drop") is Missing.drop().action
        True
    """

    DEAD_LETTER = "dead_letter"
    DROP = "drop"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class Missing:
    """The enrich stage's answer to a missing row (or a null lookup key).

    Example:
        >>> Missing.default({"tier": "basic"}).action
        <OnMissing.DEFAULT: 'default'>
    """

    action: OnMissing = OnMissing.DEAD_LETTER
    row: Any = field(default=None)

    @classmethod
    def dead_letter(cls) -> Missing:
        """Dead-letter the record as :class:`MissingEntry` (the default)."""
        return cls(OnMissing.DEAD_LETTER)

    @classmethod
    def drop(cls) -> Missing:
        """Filter the record out (counted in the stage's ``filtered`` stat)."""
        return cls(OnMissing.DROP)

    @classmethod
    def default(cls, row: Any) -> Missing:
        """Merge ``row`` as if the table had held it."""
        if row is None:
            raise DefinitionError("Missing.default needs a row to merge, not None")
        return cls(OnMissing.DEFAULT, row)


def _missing(name: str, missing: Missing | str) -> Missing:
    if isinstance(missing, Missing):
        return missing
    if missing == OnMissing.DEAD_LETTER.value:
        return Missing.dead_letter()
    if missing == OnMissing.DROP.value:
        return Missing.drop()
    raise DefinitionError(
        f"stage '{name}': missing={missing!r} is not 'dead_letter', 'drop' or a Missing "
        f"(Missing.default(row) for defaults)"
    )


def enrich(
    name: str,
    table: Table,
    *,
    on: str | Callable[[Any], Any],
    input: str,
    output: str,
    merge: Merge,
    missing: Missing | str = "dead_letter",
    ready_timeout: float = 60.0,
    concurrency: int = 1,
    retry: RetryPolicy | None = None,
    dedup: DedupPolicy | None = None,
    counts: Counter[str] | None = None,
) -> Stage:
    """A stage that joins each record with its row in ``table``.

    Args:
        name: Stage name.
        table: Where rows come from (:class:`~stages.table.KafkaTable`,
            :class:`~stages.table.MemoryTable`, or any :class:`~stages.table.Table`).
        on: The lookup key: a field name, a dotted path, or a function of the value. Its
            value is looked up as text (``str(value)``).
        input: Schema of the values read.
        output: Schema of the enriched values.
        merge: How the row is combined with the value.
        missing: ``"dead_letter"`` (default), ``"drop"``, or :meth:`Missing.default`.
        ready_timeout: Seconds the first record waits for the table to load.
        concurrency: Records of different keys in flight at once.
        retry: Retries (of :class:`~stages.table.TableUnavailable`, say) before a record is
            dead-lettered.
        dedup: Deduplication of the stage's input.
        counts: If given, counts ``enriched``, ``missing`` and ``defaulted`` (in this process).

    Raises:
        DefinitionError: ``table`` is not a table, ``merge`` not a :class:`Merge`, an
            unknown ``missing``, or a bad ``on`` or ``ready_timeout``.

    Example:
        >>> from stages.table import MemoryTable
        >>> s = enrich("cust", MemoryTable({"c1": {"tier": "gold"}}), on="cid",
        ...            input="t.O", output="t.E", merge=Merge.fields("tier"))
        >>> import asyncio
        >>> asyncio.run(s({"cid": "c1"}))
        {'cid': 'c1', 'tier': 'gold'}
    """
    if not isinstance(table, Table):
        raise DefinitionError(
            f"stage '{name}': {table!r} is not a table (KafkaTable, MemoryTable, or an "
            f"object with name, ready, wait_ready() and get())"
        )
    if not isinstance(merge, Merge):
        raise DefinitionError(f"stage '{name}': merge must be a Merge (Merge.fields(...), ...)")
    policy = _missing(name, missing)
    key_of = field_getter(name, on)
    timeout = check_positive(name, "ready_timeout", ready_timeout)
    where = on if isinstance(on, str) else "the lookup key"

    async def join(value: Any) -> Any:
        if not table.ready:
            try:
                async with asyncio.timeout(timeout):
                    await table.wait_ready()
            except TimeoutError:
                raise TableUnavailable(
                    f"table {table.name} was not ready within {timeout:g}s"
                ) from None
        key = key_of(value)
        row = None if key is None else table.get(str(key))
        if row is None:
            bump(counts, "missing")
            if policy.action is OnMissing.DROP:
                return None
            if policy.action is OnMissing.DEAD_LETTER:
                raise MissingEntry(f"no row for {where}={key!r} in table {table.name}")
            bump(counts, "defaulted")
            return merge.apply(value, policy.row)
        bump(counts, "enriched")
        return merge.apply(value, row)

    @contextlib.asynccontextmanager
    async def load_first() -> AsyncIterator[None]:
        # The worker's setup: load the table before consuming, so the first records do not
        # wait for it. A table that does not load is each record's error, as before.
        if not table.ready:
            try:
                async with asyncio.timeout(timeout):
                    await table.wait_ready()
            except (TimeoutError, PipelineError) as exc:
                log.warning(
                    "stage %s: table %s not loaded before consuming (%s); records wait for "
                    "it up to %gs each", name, table.name, exc or "timed out", timeout,
                )  # fmt: skip
        yield None

    # A table loaded from a topic (KafkaTable, or one with a ``topic``): the stage's
    # principal needs READ on it (``pipeline acl``).
    topic = getattr(table, "topic", None)
    return stage(
        name,
        input=input,
        output=output,
        concurrency=concurrency,
        retry=retry,
        dedup=dedup,
        reads=(topic,) if isinstance(topic, str) else (),
        setup=load_first,
    )(join)
