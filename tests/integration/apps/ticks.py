"""A pipeline fed by a schedule (one tick per second), for the schedule tests.

Environment (read here, by the test app): ``TICKS_PIPELINE`` (name), ``TICKS_CATCH_UP``
(all | latest | none).
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

from pipeline import Pipeline, TopicPolicy, stage
from pipeline.schedule import Schedule
from tests.integration.apps.twostage import EVENT, SCHEMAS


def tick_event(at: dt.datetime) -> dict[str, Any]:
    """One tick: keyed by the schedule, numbered by its second."""
    return {"key": "tick", "n": int(at.timestamp()), "hops": 0, "payload": at.isoformat()}


@stage(input=EVENT, output=EVENT)
def seen(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


def build(name: str | None = None, catch_up: str | None = None) -> Pipeline:
    name = name or os.environ.get("TICKS_PIPELINE", "ticks")
    catch_up = catch_up or os.environ.get("TICKS_CATCH_UP", "all")
    every_second = Schedule(
        "tick", every=1, make=tick_event, catch_up=catch_up,  # type: ignore[arg-type]
        overlap=True,  # ticks of a second each: nothing to hold
    )  # fmt: skip
    return (
        Pipeline(name, source=f"{name}.in", key="key", schemas=SCHEMAS, topics=TopicPolicy(1))
        | seen
    ).with_schedule(every_second)
