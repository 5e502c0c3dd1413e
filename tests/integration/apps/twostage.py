"""A two-stage pipeline for crash, state and zombie tests, run by ``pipeline run``.

Environment (read here, by the test app, not by the framework):
``TWO_PIPELINE`` (name), ``TWO_DELIVERY`` (at_least_once | exactly_once),
``TWO_CONCURRENCY`` (> 1: the first stage is async, in key lanes, and its records finish out
of order: each waits 0-3 ms).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

from pipeline import Pipeline, TopicPolicy, stage

SCHEMAS = Path(__file__).parent / "schemas"
EVENT = "test.chain.Event"


SLOW_S = float(os.environ.get("TWO_SLOW_MS", "0")) / 1000  # per record, for the zombie test


@stage(input=EVENT, output=EVENT)
def mark(event: dict[str, Any]) -> dict[str, Any]:
    if SLOW_S:
        time.sleep(SLOW_S)
    event["hops"] += 1
    return event


CONCURRENCY = int(os.environ.get("TWO_CONCURRENCY", "1"))


@stage(input=EVENT, output=EVENT, concurrency=max(CONCURRENCY, 2), name="mark")
async def mark_in_lanes(event: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(random.random() * 0.003)  # an I/O call: later records overtake
    event["hops"] += 1
    return event


@stage(input=EVENT, output=EVENT)
def count(event: dict[str, Any], record: Any) -> dict[str, Any]:
    # Uses the state table too: a per-key running count survives restarts via the changelog.
    seen = record.state.get(0) + 1
    record.state.set(seen)
    event["hops"] += 1
    return event


def build(name: str | None = None, delivery: str | None = None) -> Pipeline:
    name = name or os.environ.get("TWO_PIPELINE", "two")
    delivery = delivery or os.environ.get("TWO_DELIVERY", "at_least_once")
    return (
        Pipeline(
            name,
            source=f"{name}.in",
            key="key",
            schemas=SCHEMAS,
            topics=TopicPolicy(3),
            delivery=delivery,
        )
        | (mark_in_lanes if CONCURRENCY > 1 else mark)
        | count
    )
