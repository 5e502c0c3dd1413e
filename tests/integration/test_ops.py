"""The worker's HTTP surface on a real stage process: ``pipeline run ... --http``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def status_json(ref: str, bootstrap: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", ref, "--json", "--bootstrap", bootstrap,
         "--interval", "0.5"],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return {s["stage"]: s for s in doc["stages"]}


async def test_status_shows_a_slow_stage_falling_behind_then_catching_up(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    """``pipeline status --json`` during a run: the slow stage's lag grows while records
    arrive faster than it handles them, then drains to 0; its instance and health come from
    the group and its HTTP surface; the stage that is not running shows no instance."""
    name = names.pipeline()
    p = twostage.build(name)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    codec = SchemaStore.from_directory(twostage.SCHEMAS).codec(twostage.EVENT)
    env = {"TWO_PIPELINE": name, "TWO_SLOW_MS": "4"}
    # Small fetches: a slow stage commits every 0.2 s, so each sample sees its progress.
    args = ("--http", f"127.0.0.1:{free_port()}", "--max-records", "50")
    proc = StageProcess(REF, "mark", kafka_bootstrap, env, tmp_path / "m.log", args)
    sent = 0

    async def burst(n: int) -> None:
        nonlocal sent
        async with Publisher(kafka_bootstrap, p.source, codec, "key") as pub:
            await pub.publish_many(
                {"key": f"k{i % 20}", "n": i, "hops": 0, "payload": "x"}
                for i in range(sent, sent + n)
            )
        sent += n

    try:
        seen = []
        async with asyncio.timeout(120):
            while not status_json(REF, kafka_bootstrap, env)["mark"]["members"]:
                pass  # until the instance has joined (each call samples for 0.5 s)
            await burst(600)
            seen.append(status_json(REF, kafka_bootstrap, env)["mark"])
            await burst(1_500)
            seen.append(status_json(REF, kafka_bootstrap, env)["mark"])
            while (s := status_json(REF, kafka_bootstrap, env))["mark"]["total_lag"]:
                seen.append(s["mark"])
            final = s
    finally:
        code = proc.terminate()
    assert code == 0, proc.output()[-2000:]
    lags = [x["total_lag"] for x in seen]
    assert lags[0] > 0 and lags[1] > lags[0], lags  # falling behind
    assert final["mark"]["total_lag"] == 0 and set(final["mark"]["lag"]) == {"0", "1", "2"}
    assert any(x["in_per_s"] > 0 for x in seen), seen
    [member] = final["mark"]["members"]
    assert member["health"] == "ok" and member["ready"] is True, member
    assert sorted(member["partitions"]) == [0, 1, 2] and member["url"].startswith("http://")
    assert final["count"]["members"] == [] and final["count"]["total_lag"] == sent  # not running
    assert final["mark"]["dead_letters"] == 0
