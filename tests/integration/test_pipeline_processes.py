"""A 3-stage pipeline, each stage its own OS process, on the real broker."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from pipeline import Publisher, SchemaStore
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import chain
from tests.integration.helpers import (
    StageProcess,
    count,
    order_violations,
    read_all,
    seq_of,
    wait_for_count,
)

REF = "tests.integration.apps.chain:build"
PAYLOAD = "p" * 150  # ~200-byte records


async def publish(bootstrap: str, topic: str, records: int, keys: int) -> None:
    store = SchemaStore.from_directory(chain.SCHEMAS)
    async with Publisher(bootstrap, topic, store.codec(chain.EVENT), "key") as pub:
        for i in range(records):
            pub.buffer({"key": f"k{i % keys}", "n": i, "hops": 0, "payload": PAYLOAD})


def check_exactly_once_in_order(records: list, expected: int, keys: int) -> None:
    ids = Counter((r.key, seq_of(r)) for r in records)
    dupes = {k: n for k, n in ids.items() if n > 1}
    assert not dupes, f"{len(dupes)} duplicated records, e.g. {list(dupes)[:3]}"
    assert len(ids) == expected, f"expected {expected} records, found {len(ids)}"
    assert len({r.key for r in records}) == keys
    violations = order_violations(records)
    assert not violations, violations[:5]


async def test_three_stages_three_processes(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    records, keys = 50_000, 1_000
    name = names.pipeline("chain")
    env = {"CHAIN_PIPELINE": name}
    p = chain.build(name)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    procs = [
        StageProcess(REF, stage, kafka_bootstrap, env, tmp_path / f"{stage}.log")
        for stage in ("first", "second", "third")
    ]
    try:
        t0 = time.monotonic()
        await publish(kafka_bootstrap, p.source, records, keys)
        sink = p.sink_topic
        assert sink is not None
        got = await wait_for_count(kafka_bootstrap, sink, records, within=240)
        elapsed = time.monotonic() - t0
        assert got == records, "\n".join(proc.output()[-2000:] for proc in procs)
        print(f"\n{records} records through 3 stage processes in {elapsed:.1f}s")
    finally:
        codes = [proc.terminate() for proc in procs]
    assert codes == [0, 0, 0], [proc.output()[-1500:] for proc in procs]
    for node in p.nodes():
        assert node.output_topic is not None
        hop = await read_all(kafka_bootstrap, node.output_topic)
        check_exactly_once_in_order(hop, records, keys)
        assert {r.value[:2] for r in hop} == {b"\xc3\x01"}
        assert await count(kafka_bootstrap, node.dlq_topic) == 0
    for proc in procs:
        assert "Traceback" not in proc.output()


async def test_second_instance_joins_and_leaves(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    records, keys = 30_000, 1_000
    name = names.pipeline("scale")
    env = {"CHAIN_PIPELINE": name}
    p = chain.build(name)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    first = StageProcess(REF, "first", kafka_bootstrap, env, tmp_path / "first.log")
    second_a = StageProcess(REF, "second", kafka_bootstrap, env, tmp_path / "second-a.log")
    third = StageProcess(REF, "third", kafka_bootstrap, env, tmp_path / "third.log")
    procs = [first, second_a, third]
    try:
        # Publish in three waves: B joins after the first, leaves (SIGTERM) after the second.
        await publish(kafka_bootstrap, p.source, records // 3, keys)
        await wait_for_count(kafka_bootstrap, f"{name}.second", records // 6, within=120)
        second_b = StageProcess(REF, "second", kafka_bootstrap, env, tmp_path / "second-b.log")
        procs.append(second_b)
        await publish(kafka_bootstrap, p.source, records // 3, keys)
        await asyncio.sleep(8)  # let B join and take partitions while records flow
        await publish(kafka_bootstrap, p.source, records // 3, keys)
        assert second_b.terminate() == 0, second_b.output()[-2000:]
        sink = p.sink_topic
        assert sink is not None
        got = await wait_for_count(kafka_bootstrap, sink, records, within=240)
        assert got >= records
    finally:
        codes = [proc.terminate() for proc in procs]
    assert all(c == 0 for c in codes), [proc.output()[-1500:] for proc in procs]
    assert "partitions assigned" in second_b.output()
    assert "partitions revoked" in second_b.output()
    hop = await read_all(kafka_bootstrap, f"{name}.second")
    check_exactly_once_in_order(hop, records, keys)
    check_exactly_once_in_order(await read_all(kafka_bootstrap, sink), records, keys)
