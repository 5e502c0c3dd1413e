"""The worker's HTTP surface without a broker: /metrics parsed with prometheus_client's own
parser equals the worker's counters; /ready only once running; /health fails with the worker."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import Pipeline, SchemaStore, stage
from pipeline.errors import ConfigError
from pipeline.ops.http import parse_address, serve
from pipeline.runtime.worker import StageWorker
from pipeline.testing.memory import MemoryBroker, MemoryTransport

SCHEMA = {
    "type": "record",
    "name": "t.Event",
    "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "int"}],
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("pipeline",)))
            out[(s.name, labels)] = s.value
    return out


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def test_metrics_health_and_ready_follow_the_worker() -> None:  # noqa: PLR0915
    store = SchemaStore()
    store.add(SCHEMA)

    @stage(input="t.Event", output="t.Event")
    def keep(event: dict[str, Any]) -> dict[str, Any] | None:
        if event["n"] % 5 == 0:
            return None  # filtered
        if event["n"] % 7 == 0:
            raise ValueError("seven")  # dead-lettered after its retries
        return event

    pipeline = Pipeline("ops", source="ops.in", key="id", schemas=store) | keep
    node = pipeline.nodes()[0]
    broker = MemoryBroker()
    for topic in (node.input_topic, node.output_topic, node.dlq_topic, node.state_topic):
        assert topic is not None
        broker.create_topic(topic, 2)
    transport = MemoryTransport(
        broker, group=node.group, input_topic=node.input_topic, state_topic=node.state_topic
    )

    async def no_wait(_: float) -> None:
        return None

    worker = StageWorker(node, pipeline.schemas, transport, sleep=no_wait)
    codec = pipeline.schemas.codec("t.Event")
    for n in range(1, 101):
        key = f"k{n % 10}".encode()
        seq = [("seq", n.to_bytes(8, "big"))]
        broker.produce(node.input_topic, key, codec.encode({"id": key.decode(), "n": n}), seq)
    broker.produce(
        node.input_topic,
        b"k1",
        codec.encode({"id": "k1", "n": 1}),
        [("seq", (1).to_bytes(8, "big"))],
    )
    stop = asyncio.Event()
    async with serve([worker], "127.0.0.1", 0) as url, aiohttp.ClientSession() as session:
        status, body = await get(session, f"{url}/ready")
        assert status == 503 and '"state": "starting"' in body  # not started yet
        assert (await get(session, f"{url}/health"))[0] == 200
        task = asyncio.create_task(worker.run(stop))
        async with asyncio.timeout(10):
            while broker.lag(node.group, node.input_topic):  # noqa: ASYNC110 (polls the log)
                await asyncio.sleep(0.01)
        status, body = await get(session, f"{url}/ready")
        assert status == 200, body
        status, text = await get(session, f"{url}/metrics")
        assert status == 200
        got = samples(text)
        stats = worker.stats
        stage_label = (("stage", "keep"),)

        def counter(name: str, *extra: tuple[str, str]) -> float:
            return got[(name, tuple(sorted(stage_label + extra)))]

        assert counter("pipeline_records_consumed_total") == stats.consumed == 101
        assert counter("pipeline_records_total", ("outcome", "processed")) == stats.processed
        assert counter("pipeline_records_total", ("outcome", "filtered")) == stats.filtered == 20
        assert counter("pipeline_records_total", ("outcome", "duplicate")) == stats.duplicates == 1
        assert counter("pipeline_records_total", ("outcome", "dead_letter")) == stats.dead_letters
        assert counter("pipeline_dead_letters_total", ("error", "ValueError")) == 12
        assert counter("pipeline_records_produced_total") == stats.produced == 68
        assert counter("pipeline_ready") == 1.0
        assert counter("pipeline_state", ("state", "running")) == 1.0
        assert counter("pipeline_assigned_partitions") == 2
        assert counter("pipeline_lag_records", ("partition", "0")) == 0
        # (the last commit may have finished without being accounted in ``commits`` yet)
        assert counter("pipeline_commit_seconds_count") >= max(1, stats.commits)
        handled = counter("pipeline_record_handle_seconds_count")
        assert handled == stats.consumed, "every handled record observed once"
        assert counter("pipeline_end_to_end_latency_seconds_count") == stats.consumed
        assert counter("pipeline_record_handle_seconds_bucket", ("le", "+Inf")) == handled
        stop.set()
        await task
        assert (await get(session, f"{url}/health"))[0] == 200  # stopped cleanly: alive
        worker.stats.state = "failed"  # as a worker that stopped on an error leaves it
        status, body = await get(session, f"{url}/health")
        assert status == 503 and '"failed": ["keep"]' in body


def test_http_addresses_are_checked() -> None:
    assert parse_address(":9400") == ("0.0.0.0", 9400)
    for bad in ("9400", "host:", "host:http", "host:70000"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_address(bad)
