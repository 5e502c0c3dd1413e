"""A three-step job whose steps undo themselves when a later step dead-letters it: ``reserve``
(compensated by ``release``), ``charge`` (by ``refund``), ``ship`` (which dead-letters an event
whose payload is ``fail``). Run by ``pipeline run`` in child processes.

Environment (read here, by the test app): ``SAGA_PIPELINE`` (the pipeline name), ``SAGA_LOG``
(a file each compensation appends a line to: ``<what> <n>``).
"""

from __future__ import annotations

import os
from typing import Any

from pipeline import Pipeline, Record, StageError, TopicPolicy, stage
from tests.integration.apps.chain import EVENT, SCHEMAS


def _undo(what: str, event: dict[str, Any]) -> None:
    with open(os.environ["SAGA_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{what} {event['n']}\n")


def release(event: dict[str, Any]) -> None:
    _undo("release", event)


async def refund(event: dict[str, Any], record: Record) -> None:
    assert record.header("dlq.stage") is not None  # where and why it failed
    _undo("refund", event)


@stage(input=EVENT, output=EVENT, compensate=release)
def reserve(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


@stage(input=EVENT, output=EVENT, compensate=refund)
def charge(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


@stage(input=EVENT, output=EVENT)
def ship(event: dict[str, Any]) -> dict[str, Any]:
    if event["payload"] == "fail":
        raise StageError(f"event {event['n']}: no carrier", retriable=False)
    event["hops"] += 1
    return event


def build(name: str | None = None) -> Pipeline:
    name = name or os.environ.get("SAGA_PIPELINE", "saga")
    return (
        Pipeline(name, source=f"{name}.in", key="key", schemas=SCHEMAS, topics=TopicPolicy(3))
        | reserve
        | charge
        | ship
    )
