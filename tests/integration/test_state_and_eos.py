"""State tables, deduplication and exactly-once on the real broker, with real crashes."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from pathlib import Path

import pytest

from pipeline import Publisher, SchemaStore
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import twostage
from tests.integration.helpers import (
    StageProcess,
    TopicReader,
    count,
    duplicates,
    order_violations,
    seq_of,
)

REF = "tests.integration.apps.twostage:build"
PAYLOAD = "p" * 150


async def publish(
    bootstrap: str, topic: str, records: int, keys: int, *, first: int = 0, seqs: bool = False
) -> None:
    """Publish events ``first .. first+records``; with ``seqs`` their seq is their number.

    Every call publishes as the same writer (as one application would, restarted with a
    stable identity), so an event published again with its seq is a retransmission.
    """
    store = SchemaStore.from_directory(twostage.SCHEMAS)
    codec = store.codec(twostage.EVENT)
    async with Publisher(bootstrap, topic, codec, "key", writer="two-stage-tests") as pub:
        for i in range(first, first + records):
            value = {"key": f"k{i % keys}", "n": i, "hops": 0, "payload": PAYLOAD}
            pub.buffer(value, seq=i + 1 if seqs else None)


def assert_exactly_once_in_order(records: list, expected: int) -> None:
    assert duplicates(records) == 0, f"{duplicates(records)} duplicates"
    assert len({(r.key, seq_of(r)) for r in records}) == expected
    violations = order_violations(records)
    assert not violations, violations[:5]


async def wait_for_stage_output(bootstrap: str, topic: str, at_least: int, within: float) -> None:
    """Until ``topic``'s end offsets (records, plus transaction markers) reach ``at_least``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while await count(bootstrap, topic) < at_least:
        assert loop.time() < deadline, f"{topic} stuck below {at_least}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("delivery", "concurrency"),
    [("exactly_once", 1), ("at_least_once", 1), ("exactly_once", 64)],
)
async def test_sigkill_three_times(
    kafka_bootstrap: str, names: Names, tmp_path: Path, delivery: str, concurrency: int
) -> None:
    """The first stage is SIGKILLed three times; the sink has every record once, in order.

    With ``concurrency=64`` under exactly-once, the first stage's records finish out of order
    and its transactions hold outputs of records past unfinished ones: their redelivery after
    a kill must be dropped by its state table, not written twice (read_committed).
    """
    records, keys = (100_000 if concurrency == 1 else 40_000), 1_000  # key lanes: slower here
    name = names.pipeline(delivery[:3])
    p = twostage.build(name, delivery)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    env = {"TWO_PIPELINE": name, "TWO_DELIVERY": delivery, "TWO_CONCURRENCY": str(concurrency)}
    stats = tmp_path / "count.json"
    second = StageProcess(
        REF, "count", kafka_bootstrap, env, tmp_path / "count.log", ("--stats-file", str(stats))
    )
    first = StageProcess(REF, "mark", kafka_bootstrap, env, tmp_path / "mark.log")
    sink = f"{name}.count"
    try:
        await publish(kafka_bootstrap, p.source, records, keys)
        for point in (0.15, 0.45, 0.75):  # kill the first stage at three different points
            await wait_for_stage_output(kafka_bootstrap, f"{name}.mark", int(records * point), 240)
            first.kill()
            first = StageProcess(REF, "mark", kafka_bootstrap, env, tmp_path / "mark.log")
        async with TopicReader(kafka_bootstrap, sink) as reader:
            got = await reader.until_distinct(records, within=300)
            if got != records:  # say where the missing ones are
                dead = await count(kafka_bootstrap, f"{name}.mark.dlq")
                raise AssertionError(
                    f"{records - got} records missing at the sink; {dead} in mark's "
                    f"dead-letter topic\n{first.output()[-3000:]}"
                )
            await reader.settle()
            assert_exactly_once_in_order(reader.records, records)
    finally:
        codes = [first.terminate(), second.terminate()]
    assert codes == [0, 0], (first.output()[-2000:], second.output()[-2000:])
    counted = json.loads(stats.read_text())[0]
    async with TopicReader(kafka_bootstrap, f"{name}.mark") as middle:
        await middle.settle(2.0)
    redelivered = duplicates(middle.records)
    print(
        f"\n{delivery}: {records} records, first stage SIGKILLed 3 times; its output held "
        f"{redelivered} duplicates (read_committed), the second stage dropped "
        f"{counted['duplicates']} duplicates and wrote {counted['produced']} records"
    )
    if delivery == "exactly_once":
        assert redelivered == 0, "read_committed output of an exactly-once stage has duplicates"
    # Every redelivered duplicate died in the second stage's dedup table, and nothing else did.
    assert counted["duplicates"] == redelivered
    assert counted["dead_letters"] == 0


async def test_lost_local_state_is_rebuilt_from_the_changelog(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name = names.pipeline("lost")
    p = twostage.build(name)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    env = {"TWO_PIPELINE": name}
    state_dir = tmp_path / "state"
    args = ("--state-dir", str(state_dir), "--stats-file", str(tmp_path / "stats.json"))
    sink = f"{name}.mark"

    def start() -> StageProcess:
        return StageProcess(REF, "mark", kafka_bootstrap, env, tmp_path / "mark.log", args)

    worker = start()
    try:
        await publish(kafka_bootstrap, p.source, 5_000, 100, seqs=True)
        await wait_for_stage_output(kafka_bootstrap, sink, 5_000, 120)
    finally:
        assert worker.terminate() == 0, worker.output()[-2000:]
    assert any(state_dir.rglob("*")), "the RocksDB store was not written"
    shutil.rmtree(state_dir)  # the local store is gone
    # The same 5,000 events again (a retransmission: same seqs) and 5,000 new ones.
    await publish(kafka_bootstrap, p.source, 5_000, 100, seqs=True)
    await publish(kafka_bootstrap, p.source, 5_000, 100, first=5_000, seqs=True)
    worker = start()
    try:
        async with TopicReader(kafka_bootstrap, sink) as reader:
            assert await reader.until_distinct(10_000, within=120) == 10_000
            await reader.settle(2.0)
    finally:
        assert worker.terminate() == 0, worker.output()[-2000:]
    assert_exactly_once_in_order(reader.records, 10_000)  # none re-emitted, none suppressed
    stats = json.loads((tmp_path / "stats.json").read_text())[0]
    assert stats["restored"] >= 100, "the table was not rebuilt from the changelog"
    assert stats["duplicates"] == 5_000
    assert stats["produced"] == 5_000


async def test_zombie_is_fenced(kafka_bootstrap: str, names: Names, tmp_path: Path) -> None:
    name = names.pipeline("zombie")
    p = twostage.build(name, "exactly_once")
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    env = {"TWO_PIPELINE": name, "TWO_DELIVERY": "exactly_once"}
    fast = ("--session-timeout-ms", "6000", "--max-records", "200")
    sink = f"{name}.mark"
    records = 6_000
    # A is slow (10 ms a record), so it is always in the middle of a transaction.
    zombie = StageProcess(
        REF, "mark", kafka_bootstrap, {**env, "TWO_SLOW_MS": "10"}, tmp_path / "a.log", fast
    )
    await publish(kafka_bootstrap, p.source, records, 50)
    heir = None
    try:
        await wait_for_stage_output(kafka_bootstrap, sink, 200, 60)  # A committed something
        await asyncio.sleep(0.5)
        zombie.signal(signal.SIGSTOP)  # paused mid-transaction, past its session timeout
        heir = StageProcess(REF, "mark", kafka_bootstrap, env, tmp_path / "b.log", fast)
        async with TopicReader(kafka_bootstrap, sink) as reader:
            assert await reader.until_distinct(records, within=120) == records, heir.output()
            zombie.signal(signal.SIGCONT)  # A wakes up and tries to commit its transaction
            code = zombie.proc.wait(60)
            await reader.settle(3.0)
    finally:
        zombie.signal(signal.SIGCONT) if zombie.proc.poll() is None else None
        zombie.kill()
        if heir is not None:
            assert heir.terminate() == 0, heir.output()[-2000:]
    assert code != 0
    assert "fenced" in zombie.output(), zombie.output()[-2000:]
    assert_exactly_once_in_order(reader.records, records)  # nothing committed by the zombie
