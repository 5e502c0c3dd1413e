"""``pipeline up``: a 3-stage pipeline as supervised processes; metrics scraped from each; a
stage process SIGKILLed is started again, ``pipeline status`` shows it back, nothing is lost."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pipeline import Publisher, SchemaStore
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import chain
from tests.integration.helpers import ROOT, TopicReader
from tests.integration.test_ops import status_json

REF = "tests.integration.apps.chain:build"


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            outcome = s.labels.get("outcome")
            key = f"{s.name}:{outcome}" if outcome else s.name
            if not s.labels.get("partition") and not s.labels.get("le"):
                out[key] = s.value
    return out


def stage_pids(name: str, stage: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"run" in cmd and stage.encode() in cmd and b"pipeline.cli" in cmd:
                environ = (proc / "environ").read_bytes() if proc.exists() else b""
                if f"CHAIN_PIPELINE={name}".encode() in environ:
                    pids.append(int(proc.name))
    return pids


OUTCOMES = ("processed", "filtered", "duplicate", "dead_letter")


async def consumed_all(session: aiohttp.ClientSession, url: str, n: int) -> dict[str, float]:
    """The worker's metrics, once it has consumed ``n`` records (within 30 s)."""
    async with asyncio.timeout(30):
        while (m := await scrape(session, url))["pipeline_records_consumed_total"] < n:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
    return m


async def publish(bootstrap: str, topic: str, first: int, count: int) -> None:
    codec = SchemaStore.from_directory(chain.SCHEMAS).codec(chain.EVENT)
    async with Publisher(bootstrap, topic, codec, "key") as pub:
        await pub.publish_many(
            {"key": f"k{i % 100}", "n": i, "hops": 0, "payload": "u"}
            for i in range(first, first + count)
        )


async def test_up_supervises_scrapes_and_restarts(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name = names.pipeline()
    p = chain.build(name)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    env = {**os.environ, "CHAIN_PIPELINE": name, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    err = (tmp_path / "up.err").open("wb")
    up = subprocess.Popen(  # noqa: ASYNC220 (a child that outlives this call)
        [sys.executable, "-m", "pipeline.cli", "up", REF, "--bootstrap", kafka_bootstrap,
         "--logs", str(tmp_path / "logs"), "--shutdown-timeout", "15"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
    )  # fmt: skip
    urls: dict[str, str] = {}
    try:
        async with asyncio.timeout(30):
            while len(urls) < 3:
                text = (tmp_path / "up.err").read_text(errors="replace")
                urls = dict(re.findall(r"(\w+)\[0\]: (http://127\.0\.0\.1:\d+)/metrics", text))
                await asyncio.sleep(0.1)
        await publish(kafka_bootstrap, p.source, 0, 3_000)
        async with (
            aiohttp.ClientSession() as session,
            TopicReader(kafka_bootstrap, p.sink_topic) as sink,
        ):
            await sink.until_distinct(3_000, 90)
            assert sink.distinct() == 3_000
            for stage, url in urls.items():  # every worker's counters add up
                m = await consumed_all(session, url, 3_000)
                ended = sum(m[f"pipeline_records_total:{o}"] for o in OUTCOMES)
                assert m["pipeline_records_consumed_total"] == ended == 3_000, (stage, m)
                assert m["pipeline_records_produced_total"] == 3_000 and m["pipeline_ready"] == 1
            [victim] = stage_pids(name, "second")
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            async with asyncio.timeout(60):
                while not (pids := stage_pids(name, "second")) or pids == [victim]:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            restarted = time.monotonic() - killed
            deadline = time.monotonic() + 60
            while True:  # `pipeline status` shows it back, ready
                second = status_json(REF, kafka_bootstrap, {"CHAIN_PIPELINE": name})["second"]
                if second["members"] and second["members"][0]["ready"]:
                    break
                assert time.monotonic() < deadline, second
            await publish(kafka_bootstrap, p.source, 3_000, 3_000)
            await sink.until_distinct(6_000, 90)
            assert sink.distinct() == 6_000, "records lost across the restart"
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(60)
        err.close()
    log = (tmp_path / "up.err").read_text(errors="replace")
    print(f"\n[up] second restarted {restarted:.1f}s after its SIGKILL")
    assert code == 0, log[-3000:]
    assert re.search(r"second\[0\] exited with code -9", log), log[-3000:]
    assert not stage_pids(name, "first") and not stage_pids(name, "third"), "processes left"
    assert "all stage processes stopped" in log
