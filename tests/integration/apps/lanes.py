"""A stage reading two priority lanes, for the priority tests. Run by ``pipeline run`` in a
child process. ``LANES_PIPELINE`` names the pipeline; its lanes are the topics
``<name>.high`` (weight 8) and ``<name>.low`` (weight 1). The stage stamps each event with the
order it was handled in (``hops``), so a test can tell which lane went first. An event whose
payload is ``poison`` is dead-lettered unless ``LANES_FIXED=1``.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from pipeline import Pipeline, Record, StageError, TopicPolicy, stage
from pipeline.priority import Priority
from tests.integration.apps.chain import EVENT, SCHEMAS

_handled = itertools.count()


@stage(input=EVENT, output=EVENT)
def work(event: dict[str, Any], record: Record) -> dict[str, Any]:
    if event["payload"] == "poison" and os.environ.get("LANES_FIXED") != "1":
        raise StageError(f"event {event['n']} is poison", retriable=False)
    event["hops"] = next(_handled)
    event["payload"] = (record.topic or "").rsplit(".", 1)[-1]  # high | low
    return event


def build(name: str | None = None) -> Pipeline:
    name = name or os.environ.get("LANES_PIPELINE", "lanes")
    lanes = Priority({f"{name}.high": 8, f"{name}.low": 1})
    return Pipeline(name, source=lanes, key="key", schemas=SCHEMAS, topics=TopicPolicy(3)) | work
