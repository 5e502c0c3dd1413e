"""Helpers the stage factories share: argument checks, calling user functions, counting."""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from pipeline.errors import DefinitionError
from pipeline.record import Record

# Route and rule names travel in headers and topic names: keep them to a safe alphabet.
_SAFE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")

Call = Callable[[Any, Record], Any]


def check_callable(stage: str, what: str, fn: object) -> None:
    """Raise :class:`DefinitionError` unless ``fn`` is callable."""
    if not callable(fn):
        raise DefinitionError(f"stage '{stage}': {what} must be callable, got {fn!r}")


def check_safe_name(stage: str, what: str, name: object) -> str:
    """Return ``name`` if it may be part of a topic name and a header; else raise."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise DefinitionError(
            f"stage '{stage}': {what} {name!r} is not valid: use letters, digits, '_' or '-', "
            f"starting with a letter"
        )
    return name


def check_positive(stage: str, what: str, value: float, *, zero: bool = False) -> float:
    """Return ``value`` if it is a number > 0 (or >= 0 with ``zero``); else raise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DefinitionError(f"stage '{stage}': {what} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise DefinitionError(f"stage '{stage}': {what} must be {bound}, got {value!r}")
    return float(value)


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns an awaitable or an async iterator."""
    call = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def is_async_gen(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is an async generator function (or an object whose ``__call__`` is)."""
    call = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
    return inspect.isasyncgenfunction(call)


def with_record(fn: Callable[..., Any]) -> Call:
    """``fn`` as ``f(value, record)``: the record is passed only if ``fn`` takes two
    positional parameters (the rule :func:`pipeline.stage` applies)."""
    if _positional_arity(fn) >= 2:
        return fn
    return lambda value, _record: fn(value)


def _positional_arity(fn: Callable[..., Any]) -> int:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: value only
        return 1
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in params if p.kind in kinds)  # as @stage counts them


def field_getter(stage: str, field: str | Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A function that reads ``field`` from a value: a name, a dotted path, or a callable.

    A missing field (or a path through a missing or non-dict value) reads as ``None``.
    """
    if callable(field):
        return field
    if not isinstance(field, str) or not field or any(not p for p in field.split(".")):
        raise DefinitionError(
            f"stage '{stage}': field {field!r} must be a field name, a dotted path "
            f"('customer.id') or a function of the value"
        )
    path = field.split(".")
    if len(path) == 1:
        name = path[0]
        return lambda value: value.get(name) if isinstance(value, dict) else None

    def get(value: Any) -> Any:
        for part in path:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value

    return get


def bump(counts: Counter[str] | None, key: str, n: int = 1) -> None:
    """Add ``n`` to ``counts[key]`` when the caller asked for counts."""
    if counts is not None:
        counts[key] += n
