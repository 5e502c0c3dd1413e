"""The conformance tests' stages and pipeline (tests/integration/test_conformance.py).

A module of its own so that a child process (``pipeline faust``, the Faust runtime) builds the
same pipeline: ``tests.integration.apps.conformance:build`` reads ``CONF_PIPELINE`` (the name)
and ``CONF_STAGE`` (``step`` or ``by_id``).
"""

from __future__ import annotations

import os
from typing import Any

from pipeline import DedupPolicy, Pipeline, RetryPolicy, SchemaStore, StageError, stage

SCHEMA = {
    "type": "record",
    "name": "conf.Event",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "n", "type": "int"},
        {"name": "fail", "type": "string", "default": ""},
    ],
}


@stage(input="conf.Event", output="conf.Event", retry=RetryPolicy(3, 0.01, jitter=0))
def step(event: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]] | None:
    if event["fail"] == "always":
        raise ValueError(f"event {event['n']} always fails")
    if event["fail"] == "fatal":
        raise StageError("refused", retriable=False)
    if event["fail"] == "drop":
        return None
    if event["fail"] == "split":
        return [{**event, "n": event["n"] * 10 + i, "fail": ""} for i in range(3)]
    return {**event, "n": event["n"] + 1000}


@stage(input="conf.Event", output="conf.Event", dedup=DedupPolicy.by_event_id())
def by_id(event: dict[str, Any]) -> dict[str, Any]:
    return event


STAGES = {"step": step, "by_id": by_id}


def pipeline(name: str, which: Any) -> Pipeline:
    store = SchemaStore()
    store.add(SCHEMA)
    return Pipeline(name, source=f"{name}.in", key="id", schemas=store) | which


def build() -> Pipeline:
    return pipeline(os.environ["CONF_PIPELINE"], STAGES[os.environ["CONF_STAGE"]])
