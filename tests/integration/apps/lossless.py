"""One-stage pipelines for the "nothing lost silently" tests, run by ``pipeline run``.

Environment (read here, by the test app, not by the framework):

- ``LOSSLESS_PIPELINE``: the pipeline's name; ``LOSSLESS_DELIVERY``: at_least_once or
  exactly_once;
- ``LOSSLESS_TTL``: event-id TTL in seconds (the ``ids`` pipeline);
- ``LOSSLESS_URL``: the endpoint the ``http`` pipeline POSTs each record to;
  ``LOSSLESS_VERDICT_S``: its breaker's verdict timeout (a poison record that no later key can
  judge waits this long).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from pipeline import BreakerPolicy, DedupPolicy, Pipeline, RetryPolicy, TopicPolicy, stage
from stages.io import http_post

SCHEMAS = Path(__file__).parent / "schemas"
EVENT = "test.chain.Event"


def _pipeline(name: str | None, delivery: str | None) -> Pipeline:
    name = name or os.environ.get("LOSSLESS_PIPELINE", "lossless")
    return Pipeline(
        name,
        source=f"{name}.in",
        key="key",
        schemas=SCHEMAS,
        topics=TopicPolicy(3),
        delivery=delivery or os.environ.get("LOSSLESS_DELIVERY", "at_least_once"),
    )


@stage(input=EVENT, output=EVENT)
def keep(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


def passthrough(name: str | None = None, delivery: str | None = None) -> Pipeline:
    """One stage with the default dedup policy (by sequence, per writer)."""
    return _pipeline(name, delivery) | keep


def ids(name: str | None = None, ttl: float | None = None) -> Pipeline:
    """One stage deduplicating by event id with a short TTL."""
    ttl = ttl or float(os.environ.get("LOSSLESS_TTL", "5"))
    by_id = stage("byid", input=EVENT, output=EVENT, dedup=DedupPolicy.by_event_id(ttl=ttl))
    return _pipeline(name, None) | by_id(lambda event: event)


def http(name: str | None = None, url: str | None = None) -> Pipeline:
    """One stage that POSTs each record to ``LOSSLESS_URL`` and writes it on when that works."""
    url = url or os.environ.get("LOSSLESS_URL", "http://127.0.0.1:9/unset")
    post = http_post(
        "post", url, input=EVENT, output=EVENT, concurrency=8,
        retry=RetryPolicy(max_attempts=3, initial_backoff=0.05, jitter=0),
    )  # fmt: skip
    verdict = float(os.environ.get("LOSSLESS_VERDICT_S", "60"))
    post = dataclasses.replace(post, breaker=BreakerPolicy(verdict_timeout=verdict))
    return _pipeline(name, None) | post
