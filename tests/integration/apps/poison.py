"""A one-stage pipeline whose stage fails on purpose, for the dead-letter tests.

Run by ``pipeline run`` in child processes. Environment (read here, by the test app, not by the
framework):

- ``POISON_PIPELINE``: the pipeline name; ``POISON_DELIVERY``: at_least_once | exactly_once;
- ``POISON_FIXED=1``: the "bug" is fixed: ``fail`` and ``fatal`` records succeed;
- ``POISON_PARK=1``: the stage parks a key after a dead letter;
- ``POISON_CONCURRENCY``: > 1 makes the stage async with that many key lanes;
- ``POISON_ATTEMPTS``, ``POISON_BACKOFF``, ``POISON_MAX_BACKOFF``: its retry policy.

What the stage does with an event depends on its ``payload``: ``fail`` raises ``ValueError``
every time, ``fatal`` raises a non-retriable ``StageError``, ``flaky`` raises twice and then
succeeds, ``storm`` always raises (to keep one key retrying); anything else passes.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline import (
    BreakerPolicy,
    Pipeline,
    RetryPolicy,
    SchemaStore,
    StageError,
    TopicPolicy,
    stage,
)
from pipeline.stage import DeadLetterPolicy

SCHEMAS = Path(__file__).parent / "schemas"
EVENT = "test.chain.Event"
LEGACY = "test.poison.Legacy"
#: A writer schema the stage knows but cannot read as an Event (``n`` is a string here).
LEGACY_SCHEMA = {
    "type": "record",
    "name": "Legacy",
    "namespace": "test.poison",
    "fields": [{"name": "key", "type": "string"}, {"name": "n", "type": "string"}],
}

_attempts: Counter[tuple[str, int]] = Counter()  # flaky records: attempts so far, per event


def schemas() -> SchemaStore:
    store = SchemaStore.from_directory(SCHEMAS)
    store.add(LEGACY_SCHEMA)
    return store


def _check(event: dict[str, Any]) -> dict[str, Any]:
    payload = event["payload"]
    fixed = os.environ.get("POISON_FIXED") == "1"
    if payload == "fail" and not fixed:
        raise ValueError(f"cannot handle event {event['n']} (always fails)")
    if payload == "fatal" and not fixed:
        raise StageError(f"event {event['n']} is fatal", retriable=False)
    if payload == "storm":
        raise ConnectionError(f"event {event['n']}: service unavailable")
    if payload == "flaky":
        ident = (event["key"], event["n"])
        _attempts[ident] += 1
        if _attempts[ident] <= 2:
            raise TimeoutError(f"event {event['n']}: attempt {_attempts[ident]} timed out")
    event["hops"] += 1
    return event


def build(name: str | None = None) -> Pipeline:
    env = os.environ
    name = name or env.get("POISON_PIPELINE", "poison")
    concurrency = int(env.get("POISON_CONCURRENCY", "1"))
    options: dict[str, Any] = {
        "input": EVENT,
        "output": EVENT,
        "concurrency": concurrency,
        "retry": RetryPolicy(
            max_attempts=int(env.get("POISON_ATTEMPTS", "3")),
            initial_backoff=float(env.get("POISON_BACKOFF", "0.01")),
            max_backoff=float(env.get("POISON_MAX_BACKOFF", "0.05")),
            multiplier=1.5,
            jitter=0.0,
        ),
        "on_dead_letter": DeadLetterPolicy.park()
        if env.get("POISON_PARK") == "1"
        else DeadLetterPolicy.proceed(),
        # How long a failed record with no other key to judge it by waits for a verdict.
        "breaker": BreakerPolicy(verdict_timeout=float(env.get("POISON_VERDICT_S", "60"))),
    }
    if concurrency > 1:

        async def work_async(event: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(0)
            return _check(event)

        work = stage("work", **options)(work_async)
    else:

        def work_sync(event: dict[str, Any]) -> dict[str, Any]:
            return _check(event)

        work = stage("work", **options)(work_sync)
    return (
        Pipeline(
            name,
            source=f"{name}.in",
            key="key",
            schemas=schemas(),
            topics=TopicPolicy(3),
            delivery=env.get("POISON_DELIVERY", "at_least_once"),
        )
        | work
    )
