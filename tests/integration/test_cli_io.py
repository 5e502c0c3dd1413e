"""``pipeline publish`` and ``tail`` as a new user meets them: a missing topic is one quick
error, and ``tail`` stops at the end of the topic unless ``--follow``."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.testing import Names
from tests.integration.helpers import ROOT

ORDERS = ROOT / "examples" / "orders" / "orders.jsonl"
SCHEMA = "com.example.orders.OrderPlaced"


def cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "COLUMNS": "200"}
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False,
    )  # fmt: skip
    return proc, time.monotonic() - began


def test_a_missing_topic_is_one_quick_error(kafka_bootstrap: str, names: Names) -> None:
    topic = names.topic("nowhere")
    published, took = cli("publish", topic, str(ORDERS), "--schema", SCHEMA, "-b", kafka_bootstrap)
    assert published.returncode == 1
    assert f"topic {topic} does not exist" in published.stderr
    assert took < 15 and len(published.stderr.strip().splitlines()) <= 3, published.stderr
    tailed, took = cli("tail", topic, "-b", kafka_bootstrap)
    assert tailed.returncode == 1 and "does not exist" in tailed.stderr
    assert took < 15 and len(tailed.stderr.strip().splitlines()) <= 3, tailed.stderr


def test_tail_stops_at_the_end(kafka_bootstrap: str, names: Names, tmp_path: Path) -> None:
    topic = names.topic("placed")

    async def make() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 3, 1)])
        finally:
            await admin.close()

    asyncio.run(make())
    published, _ = cli("publish", topic, str(ORDERS), "--schema", SCHEMA, "-b", kafka_bootstrap)
    said = published.stderr + published.stdout
    assert published.returncode == 2 and "sent 25, rejected 1" in said, said
    assert re.search(rf"to {topic} in \d+\.\ds \([\d,]+ records/s\)", said), said
    tailed, took = cli("tail", topic, "--limit", "100", "-b", kafka_bootstrap)
    assert tailed.returncode == 0, tailed.stderr
    assert len(tailed.stdout.strip().splitlines()) == 25  # all there is, then it stops
    assert took < 30
