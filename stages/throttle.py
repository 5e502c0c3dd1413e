"""Rate limiting: a token bucket per stage instance or per key, waiting with asyncio sleeps.

:class:`RateLimiter` is a token bucket: ``rate`` tokens a second, up to ``burst`` saved up.
Taking a token when none is left *reserves* the next one and sleeps until it is due, so
concurrent callers queue in time instead of all waking at once. It takes its clock and its
sleep as arguments: tests pass a :class:`~stages.testing.SimulatedClock` and never sleep.

:func:`throttle` is a stage that passes each record unchanged once the limiter lets it
through. Two things decide what its rate means:

- *Per instance*: each running instance of the stage has its own bucket, so N instances
  pass up to N x ``rate`` records a second. Use ``per_key=True`` to limit each key instead.
- *Visibility*: the worker makes outputs durable when it commits. With ``concurrency=1`` that
  is once per fetched batch (up to thousands of records), so the output topic would see the
  records in bursts; the default ``concurrency=16`` runs the worker's key lanes, which flush
  every ``flush_interval_ms`` and so keep the output as smooth as the limit. The throttle
  queues the records of each key in order, and different keys in the order of their tokens.

To protect a service, limiting the stage that calls it is more direct than a throttle stage
in front of it (its consumer would read the throttled topic as fast as it can): pass a
:class:`RateLimiter` to :func:`stages.io.http_post` (``limiter=``).

Example:
    >>> polite = throttle("polite", schema="shop.Order", rate=50, burst=10)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from pipeline.errors import DefinitionError
from pipeline.record import Record
from pipeline.stage import DedupPolicy, Stage, stage
from stages._common import bump, check_positive

__all__ = ["RateLimiter", "throttle"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class RateLimiter:
    """A token bucket (one, or one per key) that makes callers wait for their turn.

    Args:
        rate: Tokens per second.
        burst: Tokens that can be saved up and spent at once (at least 1).
        per_key: One bucket per key instead of one for all.
        max_keys: Buckets kept with ``per_key``; the least recently used is forgotten
            beyond it (its key starts again with a full bucket).
        clock: Monotonic seconds (``time.monotonic``).
        sleep: Waits (``asyncio.sleep``).

    Example:
        >>> from stages.testing import SimulatedClock
        >>> clock = SimulatedClock()
        >>> limiter = RateLimiter(2, clock=clock.now, sleep=clock.sleep)
        >>> [limiter.reserve() for _ in range(3)]   # 1 token now, then one every 0.5 s
        [0.0, 0.5, 1.0]
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: int = 1,
        per_key: bool = False,
        max_keys: int = 100_000,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0:
            raise DefinitionError(f"RateLimiter: rate must be a number > 0, got {rate!r}")
        self.rate = float(rate)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise DefinitionError(f"RateLimiter: burst must be a whole number >= 1, got {burst!r}")
        if max_keys < 1:
            raise DefinitionError(f"RateLimiter: max_keys must be at least 1, got {max_keys!r}")
        if not callable(clock) or not callable(sleep):
            raise DefinitionError("RateLimiter: clock and sleep must be callable")
        self.burst = burst
        self.per_key = per_key
        self.max_keys = max_keys
        self._clock = clock
        self._sleep = sleep
        # key -> (tokens, at): tokens left (negative: reserved ahead) at clock time ``at``
        self._buckets: OrderedDict[bytes | None, tuple[float, float]] = OrderedDict()

    def reserve(self, key: bytes | None = None) -> float:
        """Take a token now; return how many seconds to wait until it is due (0: at once)."""
        if not self.per_key:
            key = None
        now = self._clock()
        buckets = self._buckets
        tokens, at = buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate) - 1.0
        buckets[key] = (tokens, now)
        if self.per_key:
            buckets.move_to_end(key)
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        return 0.0 if tokens >= 0 else -tokens / self.rate

    async def acquire(self, key: bytes | None = None) -> float:
        """Wait for a token; return the seconds waited."""
        wait = self.reserve(key)
        if wait > 0:
            await self._sleep(wait)
        return wait


def throttle(
    name: str,
    *,
    schema: str,
    rate: float,
    burst: int = 1,
    per_key: bool = False,
    concurrency: int = 16,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    dedup: DedupPolicy | None = None,
    counts: Counter[str] | None = None,
) -> Stage:
    """A stage that passes records unchanged at no more than ``rate`` a second.

    Args:
        name: Stage name.
        schema: The records' schema (input and output).
        rate: Records per second, per instance (or per key with ``per_key``).
        burst: Records that may pass at once after a quiet spell.
        per_key: Limit each key on its own.
        concurrency: Key lanes of the worker (see the module doc on visibility).
        clock: Monotonic seconds; inject a simulated clock in tests.
        sleep: The wait; inject the simulated clock's in tests.
        dedup: Deduplication of the stage's input.
        counts: If given, counts ``throttled`` (records that had to wait).

    Raises:
        DefinitionError: A non-positive rate, a burst below 1, a bad concurrency.

    Example:
        >>> from stages.testing import SimulatedClock
        >>> clock = SimulatedClock()
        >>> s = throttle("t", schema="t.E", rate=10, clock=clock.now, sleep=clock.sleep)
        >>> s.is_async, s.concurrency
        (True, 16)
    """
    check_positive(name, "rate", rate)
    limiter = RateLimiter(rate, burst=burst, per_key=per_key, clock=clock, sleep=sleep)

    async def pace(value: Any, record: Record) -> Any:
        if await limiter.acquire(record.key):
            bump(counts, "throttled")
        return value

    return stage(name, input=schema, output=schema, concurrency=concurrency, dedup=dedup)(pace)
