"""Crash-loop protection across real processes: a record that ``os._exit(1)``s its worker.

``pipeline up`` runs a three-stage pipeline; the middle stage's process dies on one record,
the supervisor starts it again, it dies again... until the new process finds (in the committed
offset's metadata) that ``max_deliveries`` workers died with that record in hand, and
dead-letters it as ``CrashLoop`` instead of calling the stage. Every other record reaches the
sink once, in per-key order.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from pipeline import Publisher, SchemaStore
from pipeline.runtime import deadletter as dlq
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import crashy
from tests.integration.apps.chain import EVENT, SCHEMAS
from tests.integration.helpers import ROOT, TopicReader

REF = "tests.integration.apps.crashy:build"
EVENTS = 3_000
POISON = 1_234


@pytest.mark.parametrize(("delivery", "concurrency"), [("at_least_once", 1), ("exactly_once", 4)])
async def test_a_record_that_exits_its_worker_ends_as_crash_loop_and_the_rest_flows(
    kafka_bootstrap: str, names: Names, tmp_path: Path, delivery: str, concurrency: int
) -> None:
    name = names.pipeline()
    env = {
        **os.environ, "CRASHY_PIPELINE": name, "CRASHY_DELIVERY": delivery,
        "CRASHY_CONCURRENCY": str(concurrency), "PYTHONUNBUFFERED": "1", "COLUMNS": "200",
    }  # fmt: skip
    os.environ["CRASHY_DELIVERY"] = delivery  # the pipeline built here must match theirs
    try:
        p = crashy.build(name)
    finally:
        del os.environ["CRASHY_DELIVERY"]
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    codec = SchemaStore.from_directory(SCHEMAS).codec(EVENT)
    async with Publisher(kafka_bootstrap, p.source, codec, "key") as pub:
        await pub.publish_many(
            {"key": f"k{i % 100}", "n": i, "hops": 0, "payload": "crash" if i == POISON else ""}
            for i in range(EVENTS)
        )
    log = tmp_path / "up.err"
    with log.open("wb") as err:
        up = subprocess.Popen(  # noqa: ASYNC220 (a child that outlives this call)
            [sys.executable, "-m", "pipeline.cli", "up", REF, "--bootstrap", kafka_bootstrap,
             "--logs", str(tmp_path / "logs"), "--shutdown-timeout", "15",
             "--session-timeout-ms", "6000"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        try:
            async with (
                TopicReader(kafka_bootstrap, p.node("hop").dlq_topic) as dead,
                TopicReader(kafka_bootstrap, str(p.sink_topic)) as sink,
            ):
                await sink.until_distinct(EVENTS - 1, 150)
                await dead.until_distinct(1, 30)
                await sink.settle(2.0)
        finally:
            up.send_signal(signal.SIGTERM)
            code = up.wait(60)
    text = log.read_text(errors="replace")
    exits = re.findall(r"hop\[0\] exited with code 1\b", text)
    print(f"\n[crash loop] {delivery}: hop died {len(exits)} times; sink {len(sink.records)}")
    assert code == 0, text[-3000:]

    [letter] = dead.records
    headers = dict(letter.headers)
    assert codec.decode(letter.value)["n"] == POISON  # the original bytes, untouched
    assert headers[dlq.ERROR_CLASS] == b"CrashLoop"
    # max_deliveries (3) deaths or one more: the verdict needs two of them with the record
    # alone in hand, and its first deaths may land on chunks of several records.
    assert headers[dlq.ATTEMPTS] == str(len(exits)).encode()
    assert len(exits) in (3, 4), text[-3000:]  # and no call after the verdict

    seen = [codec.decode(r.value) for r in sink.records]
    assert sorted(e["n"] for e in seen) == [i for i in range(EVENTS) if i != POISON]  # once
    by_key: dict[str, list[int]] = defaultdict(list)
    for e in seen:
        by_key[e["key"]].append(e["n"])
    assert all(ns == sorted(ns) for ns in by_key.values()), "per-key order broken"
    assert all(e["hops"] == 3 for e in seen)
