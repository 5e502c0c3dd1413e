"""The @stage decorator, Stage validation and RetryPolicy."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from pipeline import DefinitionError, Record, RetryPolicy, Stage, stage
from pipeline.stage import DedupMode, DedupPolicy

ORDER = "test.worker.Order"


def test_decorator_defaults() -> None:
    @stage(input=ORDER, output=ORDER)
    def enrich(order: dict[str, Any]) -> dict[str, Any]:
        return order

    assert isinstance(enrich, Stage)
    assert enrich.name == "enrich"
    assert (enrich.input, enrich.output) == (ORDER, ORDER)
    assert enrich.concurrency == 1
    assert enrich.retry == RetryPolicy()
    assert enrich.dedup.mode is DedupMode.AUTO
    assert (enrich.is_async, enrich.wants_record) == (False, False)
    assert enrich({"x": 1}) == {"x": 1}  # still callable as the plain function


def test_explicit_name_and_policies() -> None:
    retry = RetryPolicy(max_attempts=7)

    @stage("price-v2", input=ORDER, output=None, retry=retry, dedup=DedupPolicy.off())
    def price(order: dict[str, Any]) -> None:
        return None

    assert price.name == "price-v2"
    assert price.output is None
    assert price.retry is retry
    assert price.dedup.mode is DedupMode.OFF


@pytest.mark.parametrize("name", ["", "1abc", "has space", "dots.not.ok", "slash/no", "x" * 64])
def test_invalid_names_are_refused_with_the_name_in_the_message(name: str) -> None:
    with pytest.raises(DefinitionError, match="is not valid") as info:
        stage(name, input=ORDER, output=ORDER)(lambda v: v)
    if name:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", ["a", "A_b-9", "x" * 63])
def test_valid_names(name: str) -> None:
    assert stage(name, input=ORDER, output=ORDER)(lambda v: v).name == name


def test_lambda_without_a_name_gets_a_clear_error() -> None:
    with pytest.raises(DefinitionError, match="'<lambda>' is not valid"):
        stage(input=ORDER, output=ORDER)(lambda v: v)


def test_sync_function_with_concurrency_is_refused() -> None:
    with pytest.raises(DefinitionError, match="concurrency=4 needs an async function"):

        @stage(input=ORDER, output=ORDER, concurrency=4)
        def blocking(order: dict[str, Any]) -> dict[str, Any]:
            return order


def test_concurrency_below_one_is_refused() -> None:
    with pytest.raises(DefinitionError, match="concurrency must be at least 1"):

        @stage(input=ORDER, output=ORDER, concurrency=0)
        async def none_at_all(order: dict[str, Any]) -> dict[str, Any]:
            return order


def test_async_functions_are_detected_and_may_run_concurrently() -> None:
    @stage(input=ORDER, output=ORDER, concurrency=8)
    async def fetch(order: dict[str, Any]) -> dict[str, Any]:
        return order

    assert fetch.is_async
    assert fetch.concurrency == 8
    assert asyncio.run(fetch({"a": 1})) == {"a": 1}


def test_async_partial_is_detected() -> None:
    async def scale(factor: int, order: dict[str, Any]) -> dict[str, Any]:
        return {**order, "n": order["n"] * factor}

    s = Stage("scale", functools.partial(scale, 3), ORDER, ORDER, is_async=True)
    assert asyncio.run(s({"n": 2})) == {"n": 6}


def test_wants_record_follows_the_number_of_parameters() -> None:
    @stage(input=ORDER, output=ORDER)
    def one(value: dict[str, Any]) -> Any:
        return value

    @stage(input=ORDER, output=ORDER)
    def two(value: dict[str, Any], record: Record) -> Any:
        return (value, record.key)

    @stage(input=ORDER, output=ORDER)
    def star(*args: Any) -> Any:
        return args

    @stage(input=ORDER, output=ORDER)
    def keyword_only(value: dict[str, Any], *, extra: int = 0) -> Any:
        return value

    assert [s.wants_record for s in (one, two, star, keyword_only)] == [
        False,
        True,
        True,
        False,
    ]
    record = Record(b"k", {"v": 1})
    assert two.invoker()({"v": 1}, record) == ({"v": 1}, b"k")
    assert one.invoker()({"v": 1}, record) == {"v": 1}  # the adapter drops the record
    assert two({"v": 2}) == ({"v": 2}, None)  # direct call: a keyless record is made up


def test_wants_record_for_a_bound_method() -> None:
    class Enricher:
        def __init__(self) -> None:
            self.calls = 0

        def enrich(self, value: dict[str, Any]) -> dict[str, Any]:
            self.calls += 1
            return value

    e = Enricher()
    s = stage("enrich", input=ORDER, output=ORDER)(e.enrich)
    assert not s.wants_record  # ``self`` is bound, not a second parameter
    s.invoker()({"a": 1}, Record(None, {}))
    assert e.calls == 1


# -- RetryPolicy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
        ({"initial_backoff": -1}, "backoffs must be >= 0"),
        ({"max_backoff": -0.1}, "backoffs must be >= 0"),
        ({"multiplier": 0.5}, "multiplier >= 1"),
        ({"jitter": 1.5}, "jitter must be between 0 and 1"),
        ({"jitter": -0.1}, "jitter must be between 0 and 1"),
    ],
)
def test_retry_policy_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        RetryPolicy(**kwargs)


def test_backoff_grows_by_the_multiplier_up_to_the_maximum() -> None:
    policy = RetryPolicy(initial_backoff=0.1, multiplier=3, max_backoff=2.0, jitter=0)
    assert [policy.backoff(a) for a in range(1, 6)] == pytest.approx([0.1, 0.3, 0.9, 2.0, 2.0])


def test_jitter_only_takes_off_a_bounded_share() -> None:
    policy = RetryPolicy(initial_backoff=1.0, multiplier=2, max_backoff=100, jitter=0.25)
    for attempt in (1, 2, 3):
        base = 2.0 ** (attempt - 1)
        waits = [policy.backoff(attempt) for _ in range(300)]
        assert all(0.75 * base <= w <= base for w in waits)
        assert len(set(waits)) > 1  # actually random, not a constant share


def test_full_jitter_can_reach_zero_but_never_negative() -> None:
    policy = RetryPolicy(initial_backoff=1.0, jitter=1.0)
    assert all(0 <= policy.backoff(1) <= 1.0 for _ in range(200))


def test_zero_backoff_policy() -> None:
    assert RetryPolicy(initial_backoff=0, max_attempts=1).backoff(1) == 0


def test_backoff_of_a_late_attempt_is_capped_not_an_overflow() -> None:
    policy = RetryPolicy(max_attempts=5000, initial_backoff=0.1, max_backoff=30, jitter=0)
    assert policy.backoff(1100) == 30
