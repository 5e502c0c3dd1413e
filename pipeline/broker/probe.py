"""Ask a Kafka cluster whether it answers, and what its brokers lead.

A module of its own so that the local broker (which waits for its JVM to answer) and the broker
selection (which checks ``PIPELINE_BOOTSTRAP``) both use it without importing each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pipeline.security import Bootstrap, connection

T = TypeVar("T")


def _quietly(ask: Callable[[], Awaitable[T]]) -> T:
    """Run ``ask`` to completion from sync code, with aiokafka's connection noise muted."""
    # While a broker starts, connection refusals are expected: keep aiokafka from logging them.
    client_log = logging.getLogger("aiokafka")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(ask())  # type: ignore[arg-type]
        # Called from async code (e.g. a fixture set up lazily): ask from a thread of its own.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, ask()).result()  # type: ignore[arg-type]
    finally:
        client_log.setLevel(level)


def probe(bootstrap: Bootstrap, timeout: float = 5.0) -> bool:
    """Whether a broker at ``bootstrap`` answers a metadata request within ``timeout``."""
    from aiokafka import AIOKafkaClient

    async def ask() -> bool:
        client = AIOKafkaClient(
            **connection(bootstrap).client_args(), request_timeout_ms=int(timeout * 1000)
        )
        try:
            await asyncio.wait_for(client.bootstrap(), timeout)
            return bool(client.cluster.brokers())
        except Exception:  # any failure means "not answering"; the caller decides what to say
            return False
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    return _quietly(ask)


def partition_leaders(
    bootstrap: Bootstrap, timeout: float = 5.0
) -> dict[str, dict[int, int]] | None:
    """The leader (node id, -1 for none) of every partition by topic, or ``None`` if nobody
    answers."""
    from aiokafka import AIOKafkaClient
    from aiokafka.structs import TopicPartition

    async def ask() -> dict[str, dict[int, int]] | None:
        client = AIOKafkaClient(
            **connection(bootstrap).client_args(), request_timeout_ms=int(timeout * 1000)
        )
        try:
            await asyncio.wait_for(client.bootstrap(), timeout)
            await asyncio.wait_for(client.force_metadata_update(), timeout)
            cluster = client.cluster
            found: dict[str, dict[int, int]] = {}
            for topic in cluster.topics(exclude_internal_topics=False):
                found[topic] = {
                    p: cluster.leader_for_partition(TopicPartition(topic, p)) or -1
                    for p in cluster.partitions_for_topic(topic) or ()
                }
            return found
        except Exception:  # not answering
            return None
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    return _quietly(ask)


def leaders(bootstrap: Bootstrap, timeout: float = 5.0) -> dict[int, int] | None:
    """How many partitions each broker (by node id) leads, or ``None`` if nobody answers."""
    found = partition_leaders(bootstrap, timeout)
    if found is None:
        return None
    counts: dict[int, int] = {}
    for partitions in found.values():
        for node in partitions.values():
            if node >= 0:
                counts[node] = counts.get(node, 0) + 1
    return counts


def topic_leaders(bootstrap: Bootstrap, topic: str, timeout: float = 5.0) -> dict[int, int] | None:
    """The leader of each partition of ``topic`` (``None`` if nobody answers)."""
    found = partition_leaders(bootstrap, timeout)
    return None if found is None else found.get(topic, {})
