"""Validation: business rules on top of the schema, with a dead-letter or a rejected stream.

The schema part of validation is already done when a stage sees a value: the worker decodes
each record with the stage's input schema, and bytes that do not decode are dead-lettered as
``DecodeError`` before any stage code runs. :func:`validate` adds *rules*, named predicates of
the value (``Rule("total is positive", lambda o: o["total"] > 0)``). Every rule is evaluated,
so a record that breaks three rules says so once, not three times across three fixes.

Where an invalid record goes is the choice between two designs:

- **Dead letter** (default). The stage raises :class:`ValidationFailed`, a non-retriable
  :class:`~pipeline.errors.StageError`, so the record goes at once to the stage's dead-letter
  topic ``P.S.dlq`` with ``dlq.error.class = ValidationFailed`` and a message that lists the
  failed rules. The stage's stats count it under ``dead_by_error["ValidationFailed"]``. Use it
  when an invalid record is a fault to look at, fix and replay.
- **Rejected stream** (``rejected="rejected"``). Invalid records are a normal business
  outcome that someone consumes (tell the customer, fix the data upstream). The stage then
  routes instead of failing: every record goes to its output tagged with the
  :data:`~stages.route.ROUTE_HEADER` - ``valid`` or ``rejected`` - and rejected ones also
  carry :data:`FAILED_HEADER`, a JSON list of ``{"rule", "message"}``. Keep the main line
  with ``| take_route("valid", ...)`` and read the rejected stream from
  ``branch(p, "<stage>", "rejected")`` (topic ``P.S.rejected``); see :mod:`stages.route`,
  whose routing design this reuses rather than writing a second topic behind the worker's
  back. The dead-letter topic keeps meaning "needs a fix and a replay".

A rule that raises (``KeyError`` on a missing field, ``TypeError`` on a null) has failed: the
record is invalid, and the message says what the rule raised.

Example:
    >>> from pipeline import Pipeline, SchemaStore
    >>> store = SchemaStore()
    >>> _ = store.add({"type": "record", "name": "shop.Order", "fields": [
    ...     {"name": "id", "type": "string"}, {"name": "total", "type": "double"},
    ...     {"name": "currency", "type": "string"}]})
    >>> check = validate("check", schema="shop.Order", rules=[
    ...     Rule("total is positive", lambda o: o["total"] > 0),
    ...     Rule("currency known", lambda o: o["currency"] in {"EUR", "USD"},
    ...          "currency must be EUR or USD"),
    ... ])
    >>> p = Pipeline("shop", source="shop.in", key="id", schemas=store) | check
    >>> p.node("check").dlq_topic
    'shop.check.dlq'
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import DefinitionError, StageError
from pipeline.record import Emit
from pipeline.stage import DedupPolicy, Stage, stage
from stages._common import bump, check_safe_name
from stages.route import ROUTE_HEADER

__all__ = ["FAILED_HEADER", "Rule", "ValidationFailed", "validate"]

#: Header of a rejected record: JSON list of ``{"rule": name, "message": text}``.
FAILED_HEADER = "validation.failed"


@dataclass(frozen=True, slots=True)
class Rule:
    """A named predicate a valid value satisfies.

    Args:
        name: What the rule checks, as people say it (``"total is positive"``).
        check: Predicate of the decoded value; a falsy result or an exception fails it.
        message: Why a failing value is wrong (default: ``"<name> does not hold"``).

    Example:
        >>> Rule("total is positive", lambda o: o["total"] > 0).failure({"total": -1})
        'total is positive does not hold'
        >>> Rule("has total", lambda o: o["total"]).failure({})
        "has total raised KeyError: 'total'"
    """

    name: str
    check: Callable[[Any], object]
    message: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise DefinitionError(f"Rule name must be a non-empty string, got {self.name!r}")
        if not callable(self.check):
            raise DefinitionError(f"Rule '{self.name}': check must be callable")

    def failure(self, value: Any) -> str | None:
        """Why ``value`` fails this rule, or ``None`` when it holds."""
        try:
            ok = self.check(value)
        except Exception as exc:
            return f"{self.name} raised {type(exc).__name__}: {exc}"
        if ok:
            return None
        return self.message or f"{self.name} does not hold"


class ValidationFailed(StageError):
    """A value broke one or more rules; dead-lettered at once (retrying cannot fix data).

    Attributes:
        rules: Names of the failed rules, in rule order.
        messages: Why each failed, in the same order.

    Example:
        >>> err = ValidationFailed([("total is positive", "total must be > 0")])
        >>> err.rules, str(err)
        (('total is positive',), 'failed 1 rule(s): total is positive (total must be > 0)')
    """

    retriable = False

    def __init__(self, failures: Sequence[tuple[str, str]]) -> None:
        self.rules = tuple(rule for rule, _ in failures)
        self.messages = tuple(message for _, message in failures)
        listed = "; ".join(f"{rule} ({message})" for rule, message in failures)
        super().__init__(f"failed {len(failures)} rule(s): {listed}")


class _Validator:
    """The validate stage's function; ``routes`` is set in rejected-stream mode."""

    def __init__(
        self,
        rules: tuple[Rule, ...],
        valid: str | None,
        rejected: str | None,
        counts: Counter[str] | None,
    ) -> None:
        self._rules = rules
        self._counts = counts
        self._rejected = rejected
        self._valid_tag = [(ROUTE_HEADER, valid.encode())] if valid else []
        self.routes: tuple[str, ...] | None = (valid, rejected) if valid and rejected else None

    def __call__(self, value: Any) -> Any:
        failures = []
        for rule in self._rules:
            why = rule.failure(value)
            if why is not None:
                failures.append((rule.name, why))
        counts = self._counts
        if not failures:
            bump(counts, "valid")
            return Emit(value, headers=self._valid_tag) if self._rejected else value
        if counts is not None:
            counts["invalid"] += 1
            for failed, _ in failures:
                counts[f"failed:{failed}"] += 1
        if self._rejected is None:
            raise ValidationFailed(failures)
        detail = json.dumps([{"rule": r, "message": m} for r, m in failures])
        return Emit(
            value,
            headers=[(ROUTE_HEADER, self._rejected.encode()), (FAILED_HEADER, detail.encode())],
        )


def validate(
    name: str,
    *,
    schema: str,
    rules: Iterable[Rule],
    rejected: str | None = None,
    valid: str = "valid",
    dedup: DedupPolicy | None = None,
    counts: Counter[str] | None = None,
) -> Stage:
    """A stage that passes values satisfying every rule and diverts the others.

    Args:
        name: Stage name.
        schema: The values' schema (input and output: validation does not change values).
        rules: The rules, evaluated in order, all of them.
        rejected: Route invalid records to this route of a rejected stream instead of
            dead-lettering them (see the module doc); valid ones get route ``valid``.
        valid: Route name of valid records in rejected-stream mode.
        dedup: Deduplication of the stage's input.
        counts: If given, counts ``valid``, ``invalid`` and ``failed:<rule name>`` (in this
            process; a retried or redelivered record counts again).

    Raises:
        DefinitionError: No rules, two rules with one name, a rule that is not a
            :class:`Rule`, or a route name that cannot be a topic name.

    Example:
        >>> s = validate("v", schema="t.Order", rules=[Rule("n>0", lambda o: o["n"] > 0)])
        >>> s({"n": 2})
        {'n': 2}
        >>> s({"n": 0})
        Traceback (most recent call last):
        ...
        stages.validate.ValidationFailed: failed 1 rule(s): n>0 (n>0 does not hold)
    """
    listed = tuple(rules)
    if not listed:
        raise DefinitionError(f"stage '{name}': validate needs at least one Rule")
    seen: set[str] = set()
    for rule in listed:
        if not isinstance(rule, Rule):
            raise DefinitionError(f"stage '{name}': {rule!r} is not a Rule")
        if rule.name in seen:
            raise DefinitionError(f"stage '{name}': two rules are named '{rule.name}'")
        seen.add(rule.name)
    if rejected is not None:
        check_safe_name(name, "rejected route", rejected)
        check_safe_name(name, "valid route", valid)
        if rejected == valid:
            raise DefinitionError(f"stage '{name}': the valid and rejected routes are equal")
    validator = _Validator(listed, valid if rejected else None, rejected, counts)
    return stage(name, input=schema, output=schema, dedup=dedup)(validator)
