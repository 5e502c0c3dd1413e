"""A three-stage pipeline whose middle stage kills its own process on one record, for the
crash-loop tests. Run by ``pipeline up`` / ``pipeline run`` in child processes.

Environment (read here, by the test app): ``CRASHY_PIPELINE`` (the pipeline name),
``CRASHY_DELIVERY`` (at_least_once | exactly_once), ``CRASHY_CONCURRENCY`` (> 1: an async
middle stage with that many key lanes). An event whose ``payload`` is ``crash`` makes the
middle stage call ``os._exit(1)``: no exception, no cleanup, as a segfault or the OOM killer.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pipeline import Pipeline, TopicPolicy, stage
from tests.integration.apps.chain import EVENT, SCHEMAS


def _hop(event: dict[str, Any]) -> dict[str, Any]:
    if event["payload"] == "crash":
        os._exit(1)
    event["hops"] += 1
    return event


@stage(input=EVENT, output=EVENT)
def enter(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


@stage(input=EVENT, output=EVENT)
def sink(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


def build(name: str | None = None) -> Pipeline:
    env = os.environ
    name = name or env.get("CRASHY_PIPELINE", "crashy")
    concurrency = int(env.get("CRASHY_CONCURRENCY", "1"))
    if concurrency > 1:

        async def hop_async(event: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(0)
            return _hop(event)

        hop = stage("hop", input=EVENT, output=EVENT, concurrency=concurrency)(hop_async)
    else:
        hop = stage("hop", input=EVENT, output=EVENT)(_hop)
    return (
        Pipeline(
            name,
            source=f"{name}.in",
            key="key",
            schemas=SCHEMAS,
            topics=TopicPolicy(3),
            delivery=env.get("CRASHY_DELIVERY", "at_least_once"),
        )
        | enter
        | hop
        | sink
    )
