"""A three-stage pipeline that tracks jobs, for the job tests. Run by ``pipeline run`` in child
processes.

Environment (read here, by the test app): ``JOBS_PIPELINE`` (the pipeline name),
``JOBS_DELIVERY`` (at_least_once | exactly_once), ``JOBS_FIXED=1``: the "bug" in ``check`` is
fixed (an event whose payload is ``fail`` passes instead of being dead-lettered).
"""

from __future__ import annotations

import os
from typing import Any

from pipeline import Pipeline, StageError, TopicPolicy, stage
from tests.integration.apps.chain import EVENT, SCHEMAS


@stage(input=EVENT, output=EVENT)
def enter(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


@stage(input=EVENT, output=EVENT)
def check(event: dict[str, Any]) -> dict[str, Any]:
    if event["payload"] == "fail" and os.environ.get("JOBS_FIXED") != "1":
        raise StageError(f"event {event['n']}: cannot check it", retriable=False)
    event["hops"] += 1
    return event


@stage(input=EVENT, output=EVENT)
def finish(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    event["payload"] = f"done:{event['n']}"
    return event


def build(name: str | None = None) -> Pipeline:
    env = os.environ
    name = name or env.get("JOBS_PIPELINE", "jobs")
    return (
        Pipeline(
            name,
            source=f"{name}.in",
            key="key",
            schemas=SCHEMAS,
            topics=TopicPolicy(3),
            delivery=env.get("JOBS_DELIVERY", "at_least_once"),
        )
        | enter
        | check
        | finish
    ).with_jobs()
