"""A schedule whose runs take longer than its period, for the overlap tests: one tick per
second, each run 2.2 s, ticks held while the previous run is in flight (``overlap=False``).

Environment (read here, by the test app): ``SLOW_PIPELINE`` (name).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from pipeline import Pipeline, TopicPolicy, stage
from pipeline.schedule import Schedule
from tests.integration.apps.twostage import EVENT, SCHEMAS

RUN_SECONDS = 2.2


def tick_event(at: dt.datetime) -> dict[str, Any]:
    return {"key": "tick", "n": int(at.timestamp()), "hops": 0, "payload": at.isoformat()}


@stage(input=EVENT, output=EVENT)
def work(event: dict[str, Any]) -> dict[str, Any]:
    time.sleep(RUN_SECONDS)  # a run longer than the period
    event["hops"] += 1
    return event


def build(name: str | None = None) -> Pipeline:
    name = name or os.environ.get("SLOW_PIPELINE", "slow")
    every_second = Schedule("tick", every=1, make=tick_event, catch_up="latest")  # type: ignore[arg-type]
    return (
        (
            Pipeline(name, source=f"{name}.in", key="key", schemas=SCHEMAS, topics=TopicPolicy(1))
            | work
        )
        .with_jobs()
        .with_schedule(every_second)
    )
