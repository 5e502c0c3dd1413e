"""Compensation across processes: a three-step job whose last step dead-letters a record; the
first two steps undo their part once each, the later one first; a replay that fails again undoes
nothing twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pipeline import Publisher, SchemaStore
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import saga
from tests.integration.apps.chain import EVENT, SCHEMAS
from tests.integration.dlq_helpers import cli
from tests.integration.helpers import StageProcess, TopicReader

REF = "tests.integration.apps.saga:build"


async def test_earlier_steps_undo_a_dead_lettered_job_once_in_reverse_order(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name = names.pipeline()
    undone = tmp_path / "undone.txt"
    undone.touch()
    env = {"SAGA_PIPELINE": name, "SAGA_LOG": str(undone)}
    p = saga.build(name)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    procs = [
        StageProcess(REF, s, kafka_bootstrap, env, tmp_path / f"{s}.log")
        for s in ("reserve", "charge", "ship")
    ]
    try:
        codec = SchemaStore.from_directory(SCHEMAS).codec(EVENT)
        async with Publisher(kafka_bootstrap, p.source, codec, "key") as pub:
            await pub.publish_many(
                {"key": f"k{n % 5}", "n": n, "hops": 0, "payload": "fail" if n == 13 else ""}
                for n in range(30)
            )
        async with TopicReader(kafka_bootstrap, str(p.sink_topic)) as sink:
            await sink.until_distinct(29, 60)
        async with asyncio.timeout(60):
            while len(undone.read_text().split("\n")) < 3:  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.1)
        await asyncio.sleep(3)  # nothing more comes
        assert undone.read_text().splitlines() == ["refund 13", "release 13"]

        # The dead letter is replayed (the bug is not fixed): it dies again, nothing is undone
        # twice.
        replay = cli("dlq", "replay", REF, "ship", "--bootstrap", kafka_bootstrap, env=env)
        assert replay.returncode == 0, replay.stderr
        async with TopicReader(kafka_bootstrap, p.node("ship").dlq_topic) as dead:
            await dead.until_distinct(2, 30)  # dead-lettered again...
            assert len(dead.records) == 2
        async with TopicReader(kafka_bootstrap, p.node("charge").compensate_topic or "") as asks:
            await asks.until_distinct(1, 10)
            await asks.settle(3.0)
            assert len(asks.records) == 2  # ... asked to compensate again ...
        await asyncio.sleep(3)
        assert undone.read_text().splitlines() == ["refund 13", "release 13"]  # ... not run
    finally:
        for proc in procs:
            proc.terminate()
    charge_log = (tmp_path / "charge.log").read_text()
    assert "compensations: 1 run, 1 already done, 0 failed" in charge_log, charge_log[-2000:]
