"""stages.throttle on the TestDriver, on simulated time: per instance, per key, bursts."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import DefinitionError, Pipeline, SchemaStore
from pipeline.testing import TestDriver
from stages import RateLimiter, throttle
from stages.testing import SimulatedClock

SCHEMAS = SchemaStore.from_directory(Path(__file__).parent / "schemas_stages")
EVENT = "stages.test.Event"


def run(stage: Any, events: list[tuple[str, int]]) -> TestDriver:
    driver = TestDriver(Pipeline("t", source="t.in", key="id", schemas=SCHEMAS) | stage)
    for key, n in events:
        driver.send({"id": key, "n": n})
    driver.run()
    return driver


def test_per_instance_rate_on_simulated_time() -> None:
    clock = SimulatedClock()
    counts: Counter[str] = Counter()
    stage = throttle(
        "pace", schema=EVENT, rate=10, clock=clock.now, sleep=clock.sleep, counts=counts
    )
    events = [(f"k{i % 4}", i) for i in range(21)]
    driver = run(stage, events)
    assert sorted(o["n"] for o in driver.outputs()) == list(range(21))
    # 1 token at once, then one every 0.1 s: 20 waits, 2 simulated seconds, no real sleep.
    assert clock.now() == pytest.approx(2.0)
    assert counts["throttled"] == 20
    by_key: dict[str, list[int]] = {}
    for o in driver.outputs():
        by_key.setdefault(o["id"], []).append(o["n"])
    assert all(ns == sorted(ns) for ns in by_key.values())  # each key stays in order


def test_per_key_rate_lets_keys_proceed_independently() -> None:
    clock = SimulatedClock()
    stage = throttle("pace", schema=EVENT, rate=1, per_key=True, clock=clock.now, sleep=clock.sleep)
    driver = run(stage, [(k, i) for i in range(3) for k in ("a", "b", "c")])
    assert len(driver.outputs()) == 9
    # Each key: 3 records at 1/s = 2 s; the keys wait side by side, not one after another.
    assert clock.now() == pytest.approx(2.0)


def test_burst_then_steady_rate() -> None:
    clock = SimulatedClock()
    limiter = RateLimiter(2, burst=3, clock=clock.now, sleep=clock.sleep)
    assert [limiter.reserve() for _ in range(5)] == [0.0, 0.0, 0.0, 0.5, 1.0]
    clock.advance(100)  # a long quiet spell refills the bucket, but only up to the burst
    assert [limiter.reserve() for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]


def test_per_key_buckets_are_bounded() -> None:
    clock = SimulatedClock()
    limiter = RateLimiter(1, per_key=True, max_keys=2, clock=clock.now, sleep=clock.sleep)
    assert [limiter.reserve(k) for k in (b"a", b"a", b"b", b"c")] == [0.0, 1.0, 0.0, 0.0]
    assert limiter.reserve(b"a") == 0.0  # 'a' was forgotten (least recently used)
    assert limiter.reserve(b"c") == 1.0  # 'c' was not


async def test_real_time_sleeps_by_default() -> None:
    limiter = RateLimiter(100)
    began = time.monotonic()
    waited = [await limiter.acquire() for _ in range(6)]
    elapsed = time.monotonic() - began
    assert waited[0] == 0.0 and all(w > 0 for w in waited[1:])
    assert elapsed >= 0.045  # 5 tokens at 100/s, less timer slack


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0}, "rate must be > 0"),
        ({"rate": -3}, "rate must be > 0"),
        ({"rate": "fast"}, "rate must be a number"),
        ({"rate": 1, "burst": 0}, "burst must be a whole number >= 1"),
        ({"rate": 1, "concurrency": 0}, "concurrency must be at least 1"),
    ],
)
def test_bad_definitions_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        throttle("pace", schema=EVENT, **kwargs)
