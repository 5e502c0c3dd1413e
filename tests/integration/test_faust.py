"""A stage run by Faust (pipeline faust) killed mid-stream and started again: nothing lost.

Faust commits acknowledged offsets on its timer; the adapter acknowledges an event only once
what it wrote (output and dedup entry) is durable. So a SIGKILL loses nothing, and what the
new process reads again is found in the dedup state it restores from the changelog.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path

from pipeline import Publisher
from pipeline.runtime.topics import ensure_topics, topic_specs
from tests.integration.apps.conformance import pipeline, step
from tests.integration.helpers import (
    StageProcess,
    committed,
    end_offsets,
    order_violations,
    read_all,
)

RECORDS, KEYS = 6_000, 30
REF = "tests.integration.apps.conformance:build"


def consumed(stats_file: Path) -> int:
    try:
        return int(json.loads(stats_file.read_text())[0]["consumed"])
    except (OSError, ValueError, IndexError, KeyError):
        return 0


async def test_a_sigkilled_faust_stage_loses_nothing_and_restores_its_dedup_state(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    name = f"fk-{uuid.uuid4().hex[:8]}"
    p = pipeline(name, step)
    node = p.nodes()[0]
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    codec = p.schemas.codec("conf.Event")
    async with Publisher(kafka_bootstrap, p.source, codec, "id") as pub:
        for i in range(RECORDS):
            pub.buffer({"id": f"k{i % KEYS}", "n": i}, seq=i // KEYS + 1, event_id=f"e{i}")
        await pub.flush()
    env = {"CONF_PIPELINE": name, "CONF_STAGE": "step"}

    def start(run: int) -> tuple[StageProcess, Path]:
        stats = tmp_path / f"run{run}.json"
        proc = StageProcess(
            REF, "step", kafka_bootstrap, env, tmp_path / f"run{run}.log",
            ("--stats-file", str(stats)), faust=True,
        )  # fmt: skip
        return proc, stats

    first, first_stats = start(1)
    deadline = time.monotonic() + 60
    while consumed(first_stats) < RECORDS // 3:
        assert first.proc.poll() is None, first.output()[-3000:]
        assert time.monotonic() < deadline, first.output()[-3000:]
        await asyncio.sleep(0.05)
    os.kill(first.proc.pid, signal.SIGKILL)  # no shutdown, no last commit
    first.kill()
    before = sum((await committed(kafka_bootstrap, node.group, node.input_topic)).values())
    assert before < RECORDS  # it died with work to do

    second, second_stats = start(2)
    ends = await end_offsets(kafka_bootstrap, node.input_topic)
    try:
        while True:
            assert second.proc.poll() is None, second.output()[-3000:]
            done = await committed(kafka_bootstrap, node.group, node.input_topic)
            if all(done[q] >= end for q, end in ends.items()):
                break
            assert time.monotonic() < deadline + 60, f"committed {done} of {ends}"
            await asyncio.sleep(0.5)
    finally:
        assert second.terminate() == 0, second.output()[-3000:]
    stats = json.loads(second_stats.read_text())[0]
    assert stats["restored"] > 0, stats  # the dedup entries the first process wrote
    assert stats["consumed"] >= RECORDS - before, stats  # it read again what was not committed

    outputs = await read_all(kafka_bootstrap, node.output_topic or "")
    seen = [codec.decode(r.value)["n"] - 1000 for r in outputs]
    assert set(seen) == set(range(RECORDS))  # every record out, none lost
    # Read again after the kill: dropped by the restored dedup state, except what the first
    # process wrote but had not recorded as done when it died (at most what it had in flight).
    assert len(seen) - RECORDS == len(seen) - len(set(seen)) <= 500, len(seen) - RECORDS
    first_copies = []
    keep: set[int] = set()
    for r, n in zip(outputs, seen, strict=True):
        if n not in keep:
            keep.add(n)
            first_copies.append(r)
    assert order_violations(first_copies) == []  # per-key order of what went out
