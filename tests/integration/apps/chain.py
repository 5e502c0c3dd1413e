"""A three-stage pipeline for integration tests, run by ``pipeline run`` in child processes.

The pipeline name comes from ``CHAIN_PIPELINE`` so that each test gets its own topics;
``CHAIN_DELIVERY`` (at_least_once | exactly_once) picks the delivery mode.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from pipeline import Pipeline, TopicPolicy, stage

SCHEMAS = Path(__file__).parent / "schemas"
EVENT = "test.chain.Event"


@stage(input=EVENT, output=EVENT)
def first(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


@stage(input=EVENT, output=EVENT)
def second(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


@stage(input=EVENT, output=EVENT, concurrency=16)
async def third(event: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    event["hops"] += 1
    return event


def build(name: str | None = None) -> Pipeline:
    name = name or os.environ.get("CHAIN_PIPELINE", "chain")
    delivery = os.environ.get("CHAIN_DELIVERY", "at_least_once")
    return (
        Pipeline(
            name,
            source=f"{name}.in",
            key="key",
            schemas=SCHEMAS,
            topics=TopicPolicy(3),
            delivery=delivery,
        )
        | first
        | second
        | third
    )
