"""Map, filter and flat-map: plain functions turned into stages with explicit schemas.

The :func:`pipeline.stage` decorator reads a function's result by its shape (a value, ``None``,
a list, an :class:`~pipeline.record.Emit`). These helpers say the intent instead, and hold the
function to it, so a mistake surfaces as a clear dead letter rather than as a silent filter:

- :func:`map_stage`: exactly one output per input. ``None`` or a list is a
  :class:`ResultError` (use :func:`filter_stage` or :func:`flat_map_stage`).
- :func:`filter_stage`: the input unchanged when the predicate holds, else filtered out
  (counted in the stage's ``filtered`` stat).
- :func:`flat_map_stage`: any iterable (list, generator, async generator) of outputs, zero
  or more; ``None`` or a bare dict is a :class:`ResultError`.

Functions may be sync or async, and take the value alone or ``(value, record)``.

Example:
    >>> from pipeline import Pipeline, SchemaStore
    >>> store = SchemaStore()
    >>> _ = store.add({"type": "record", "name": "shop.Line", "fields": [
    ...     {"name": "id", "type": "string"}, {"name": "qty", "type": "int"},
    ...     {"name": "unit", "type": "double"}, {"name": "total", "type": "double"}]})
    >>> price = map_stage("price", lambda o: {**o, "total": o["qty"] * o["unit"]},
    ...                   input="shop.Line", output="shop.Line")
    >>> some = filter_stage("some", lambda o: o["qty"] > 0, schema="shop.Line")
    >>> p = Pipeline("shop", source="shop.in", key="id", schemas=store) | some | price
    >>> p.sink_topic
    'shop.price'
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from typing import Any

from pipeline.errors import StageError
from pipeline.record import Emit, Record
from pipeline.stage import DedupPolicy, RetryPolicy, Stage, stage
from stages._common import check_callable, is_async, is_async_gen, with_record

__all__ = ["ResultError", "filter_stage", "flat_map_stage", "map_stage"]


class ResultError(StageError):
    """A transform function returned something its kind of stage cannot emit.

    Not retriable: it is a bug in the function; the record waits in the dead-letter topic for
    the fix and a replay.
    """

    retriable = False


def _one(stage_name: str, result: Any) -> Any:
    if type(result) is dict or isinstance(result, Emit):
        return result
    if result is None:
        raise ResultError(
            f"map_stage '{stage_name}': the function returned None; a map emits one value "
            f"per record (use filter_stage to drop records)"
        )
    if isinstance(result, list | tuple) or inspect.isgenerator(result):
        raise ResultError(
            f"map_stage '{stage_name}': the function returned a {type(result).__name__}; a "
            f"map emits one value per record (use flat_map_stage for several)"
        )
    return result


def map_stage(
    name: str,
    fn: Callable[..., Any],
    *,
    input: str,
    output: str,
    concurrency: int = 1,
    retry: RetryPolicy | None = None,
    dedup: DedupPolicy | None = None,
) -> Stage:
    """A stage that emits ``fn(value)`` for each record: one output per input.

    Args:
        name: Stage name.
        fn: ``fn(value)`` or ``fn(value, record)``, sync or async, returning the output value
            (or an :class:`~pipeline.record.Emit` to re-key it).
        input: Schema of the values read.
        output: Schema of the values written.
        concurrency: Records of different keys in flight at once (async ``fn`` only).
        retry: Retries of a failing call before the record is dead-lettered.
        dedup: Deduplication of the stage's input.

    Example:
        >>> s = map_stage("double", lambda v: {"n": v["n"] * 2}, input="t.N", output="t.N")
        >>> s({"n": 2})
        {'n': 4}
    """
    check_callable(name, "the map function", fn)
    call = with_record(fn)
    if is_async(fn):

        async def amap(value: Any, record: Record) -> Any:
            return _one(name, await call(value, record))

        wrapped: Callable[..., Any] = amap
    else:

        def smap(value: Any, record: Record) -> Any:
            return _one(name, call(value, record))

        wrapped = smap
    return _build(name, wrapped, input, output, concurrency, retry, dedup)


def filter_stage(
    name: str,
    predicate: Callable[..., Any],
    *,
    schema: str,
    concurrency: int = 1,
    retry: RetryPolicy | None = None,
    dedup: DedupPolicy | None = None,
) -> Stage:
    """A stage that passes a record unchanged when ``predicate`` holds, and drops it otherwise.

    Args:
        name: Stage name.
        predicate: ``predicate(value)`` or ``predicate(value, record)``, sync or async.
        schema: The values' schema (input and output).
        concurrency: Records of different keys in flight at once (async predicate only).
        retry: Retries of a failing call before the record is dead-lettered.
        dedup: Deduplication of the stage's input.

    Example:
        >>> s = filter_stage("big", lambda v: v["n"] > 9, schema="t.N")
        >>> s({"n": 10}), s({"n": 1})
        ({'n': 10}, None)
    """
    check_callable(name, "the filter predicate", predicate)
    call = with_record(predicate)
    if is_async(predicate):

        async def afilter(value: Any, record: Record) -> Any:
            return value if await call(value, record) else None

        wrapped: Callable[..., Any] = afilter
    else:

        def sfilter(value: Any, record: Record) -> Any:
            return value if call(value, record) else None

        wrapped = sfilter
    return _build(name, wrapped, schema, schema, concurrency, retry, dedup)


def _many(stage_name: str, result: Any) -> list[Any]:
    if result is None or isinstance(result, Mapping | str | bytes):
        raise ResultError(
            f"flat_map_stage '{stage_name}': the function returned "
            f"{'None' if result is None else type(result).__name__}, not an iterable of "
            f"values (return [] to emit nothing)"
        )
    if not isinstance(result, Iterable):
        raise ResultError(
            f"flat_map_stage '{stage_name}': the function returned a "
            f"{type(result).__name__}, not an iterable of values"
        )
    return list(result)


def flat_map_stage(
    name: str,
    fn: Callable[..., Any],
    *,
    input: str,
    output: str,
    concurrency: int = 1,
    retry: RetryPolicy | None = None,
    dedup: DedupPolicy | None = None,
) -> Stage:
    """A stage that emits every value of ``fn(value)``: zero, one or several per input.

    Outputs keep the input's key and sequence number and are numbered with the ``seq-part``
    header, so deduplication downstream tells them apart; an empty result counts as filtered.

    Args:
        name: Stage name.
        fn: ``fn(value)`` or ``fn(value, record)``; sync returning an iterable (or a
            generator function), or async returning an iterable (or an async generator).
        input: Schema of the values read.
        output: Schema of the values written.
        concurrency: Records of different keys in flight at once (async ``fn`` only).
        retry: Retries of a failing call before the record is dead-lettered (all outputs of
            a record are written together, or none).
        dedup: Deduplication of the stage's input.

    Example:
        >>> s = flat_map_stage("lines", lambda o: o["lines"], input="t.O", output="t.L")
        >>> s({"lines": [{"sku": "a"}, {"sku": "b"}]})
        [{'sku': 'a'}, {'sku': 'b'}]
    """
    check_callable(name, "the flat-map function", fn)
    call = with_record(fn)
    wrapped: Callable[..., Any]
    if is_async_gen(fn):

        async def agen(value: Any, record: Record) -> list[Any]:
            items: AsyncIterable[Any] = call(value, record)
            return [item async for item in items]

        wrapped = agen
    elif is_async(fn):

        async def aflat(value: Any, record: Record) -> list[Any]:
            return _many(name, await call(value, record))

        wrapped = aflat
    else:

        def sflat(value: Any, record: Record) -> list[Any]:
            return _many(name, call(value, record))

        wrapped = sflat
    return _build(name, wrapped, input, output, concurrency, retry, dedup)


def _build(
    name: str,
    fn: Callable[..., Any],
    input: str,
    output: str,
    concurrency: int,
    retry: RetryPolicy | None,
    dedup: DedupPolicy | None,
) -> Stage:
    return stage(
        name, input=input, output=output, concurrency=concurrency, retry=retry, dedup=dedup
    )(fn)
