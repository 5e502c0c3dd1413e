"""The worker's HTTP surface on a real stage process: ``pipeline run ... --http``."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pipeline import Publisher, SchemaStore
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import twostage
from tests.integration.helpers import StageProcess

REF = "tests.integration.apps.twostage:build"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (
            s.name,
            frozenset((k, v) for k, v in s.labels.items() if k not in ("pipeline", "stage")),
        ): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_and_readiness_of_a_running_stage(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name = names.pipeline()
    p = twostage.build(name)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    codec = SchemaStore.from_directory(twostage.SCHEMAS).codec(twostage.EVENT)
    async with Publisher(kafka_bootstrap, p.source, codec, "key") as pub:
        await pub.publish_many(
            {"key": f"k{i % 50}", "n": i, "hops": 0, "payload": "x"} for i in range(3_000)
        )
    port = free_port()
    stats_file = tmp_path / "mark.json"
    args = ("--http", f"127.0.0.1:{port}", "--stats-file", str(stats_file))
    proc = StageProcess(
        REF, "mark", kafka_bootstrap, {"TWO_PIPELINE": name}, tmp_path / "m.log", args
    )
    url = f"http://127.0.0.1:{port}"
    readiness: list[int] = []
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(60):
                while True:
                    try:
                        async with session.get(f"{url}/ready") as r:
                            readiness.append(r.status)
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass  # not listening yet
                    await asyncio.sleep(0.05)
                while True:  # until everything is consumed and committed
                    async with session.get(f"{url}/metrics") as r:
                        got = metrics(await r.text())
                    lags = [v for (n, _), v in got.items() if n == "pipeline_lag_records"]
                    if (
                        got[("pipeline_records_consumed_total", frozenset())] == 3_000
                        and lags
                        and not any(lags)
                        and got[("pipeline_commits_total", frozenset())] >= 1
                    ):
                        break
                    await asyncio.sleep(0.2)
            async with session.get(f"{url}/health") as r:
                assert r.status == 200
                health = await r.json()
    finally:
        code = proc.terminate()
    assert code == 0, proc.output()[-2000:]
    assert readiness[-1] == 200 and 503 in readiness, readiness  # not ready before restored
    assert health["status"] == "ok"
    final = json.loads(stats_file.read_text())[0]
    outcome = {
        o: got[("pipeline_records_total", frozenset({("outcome", o)}))]
        for o in ("processed", "filtered", "duplicate", "dead_letter")
    }
    assert outcome == {"processed": 3_000, "filtered": 0, "duplicate": 0, "dead_letter": 0}
    assert got[("pipeline_records_produced_total", frozenset())] == final["produced"] == 3_000
    assert got[("pipeline_assigned_partitions", frozenset())] == 3
    assert got[("pipeline_ready", frozenset())] == 1
    assert got[("pipeline_end_to_end_latency_seconds_count", frozenset())] == 3_000
    assert got[("pipeline_commit_seconds_count", frozenset())] >= 1
