"""Nothing lost silently, as users deploy (issue 9), on the real broker, each stage its own
process: many publishers of the same keys, event-id state that expires, records deleted past a
stopped stage, zombies that come back, a dependency that is down.

Each test prints what it measured.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete

from pipeline import Publisher, SchemaStore
from pipeline.record import WRITER_HEADER
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from stages.testing import HttpStub, StubReply, StubRequest
from tests.integration.apps import lossless, twostage
from tests.integration.helpers import (
    ROOT,
    StageProcess,
    TopicReader,
    end_offsets,
    order_violations,
    read_all,
    seq_of,
    wait_for_count,
)

APP = "tests.integration.apps.lossless"
CODEC = SchemaStore.from_directory(lossless.SCHEMAS).codec(lossless.EVENT)


def numbers(records: list[Any]) -> Counter[int]:
    """How often each event number ``n`` is in ``records``."""
    return Counter(CODEC.decode(r.value)["n"] for r in records if r.value is not None)


def stats_of(path: Path) -> dict[str, Any]:
    doc: list[dict[str, Any]] = json.loads(path.read_text())
    return doc[0]


def stat(path: Path, name: str) -> Any:
    """One counter of a stage's stats file (``None`` until the stage has written one)."""
    return stats_of(path)[name] if path.exists() else None


async def until(check: Any, what: str, within: float, step: float = 0.25) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out after {within:.0f}s waiting for {what}"
        await asyncio.sleep(step)


# -- 1. many publisher processes writing the same keys ------------------------------------------


async def run_publisher(
    bootstrap: str, topic: str, first: int, count: int, keys: int, share: float, seed: int
) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.apps.publisher", bootstrap, topic,
        str(first), str(count), str(keys), str(share), str(seed),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("publishers", [2, 8])
async def test_many_publisher_processes_of_the_same_keys_lose_nothing(
    kafka_bootstrap: str, names: Names, tmp_path: Path, publishers: int
) -> None:
    total, keys, share = 100_000, 1_000, 0.01
    name = names.pipeline(f"pub{publishers}")
    p = lossless.passthrough(name)
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    stats_file = tmp_path / "stats.json"
    stage = StageProcess(
        f"{APP}:passthrough", "keep", kafka_bootstrap, {"LOSSLESS_PIPELINE": name},
        tmp_path / "keep.log", ("--stats-file", str(stats_file)),
    )  # fmt: skip
    each = total // publishers
    t0 = time.monotonic()
    try:

        async def replica(i: int) -> list[dict[str, Any]]:
            first = i * each
            if i > 0:
                return [await run_publisher(kafka_bootstrap, p.source, first, each, keys, share, i)]
            # Replica 0 is restarted half-way: a new process, a new writer identity.
            half = each // 2
            before = await run_publisher(kafka_bootstrap, p.source, first, half, keys, share, 0)
            after = await run_publisher(
                kafka_bootstrap, p.source, first + half, each - half, keys, share, 100
            )
            return [before, after]

        runs = [r for rs in await asyncio.gather(*map(replica, range(publishers))) for r in rs]
        published = time.monotonic() - t0
        resent = sum(r["retransmitted"] for r in runs)
        assert len({r["writer"] for r in runs}) == publishers + 1
        sink = p.sink_topic
        assert sink is not None
        await wait_for_count(kafka_bootstrap, sink, total, 240)
        await until(lambda: (stat(stats_file, "consumed") or 0) >= total + resent, "the stage", 60)
    finally:
        assert stage.terminate() == 0, stage.output()[-3000:]
    elapsed = time.monotonic() - t0
    records = await read_all(kafka_bootstrap, sink)
    seen = numbers(records)
    assert set(seen) == set(range(total)), f"missing {len(set(range(total)) - set(seen))}"
    assert max(seen.values()) == 1, f"{sum(n > 1 for n in seen.values())} events twice"
    # Each writer's records of each key stay in its order (seq grows per writer and key).
    by_writer: dict[bytes, list[Any]] = defaultdict(list)
    for r in records:
        by_writer[dict(r.headers)[WRITER_HEADER]].append(r)
    assert len(by_writer) == publishers + 1
    for recs in by_writer.values():
        assert not order_violations(recs), order_violations(recs)[:3]
    stats = stats_of(stats_file)
    assert stats["duplicates"] == resent
    assert (stats["produced"], stats["gaps"], stats["dead_letters"]) == (total, 0, 0)
    print(
        f"\n{publishers} publisher processes (+1 restart) x {keys:,} shared keys: {total:,} "
        f"events + {resent:,} retransmissions published in {published:.1f}s; the sink holds "
        f"{len(seen):,} events once each, {len(by_writer)} writers each in per-key order; "
        f"{stats['duplicates']:,} duplicates dropped; {elapsed:.1f}s in all"
    )


# -- 2. event ids that expire leave the compacted changelog ----------------------------------


async def test_expired_event_ids_leave_the_compacted_changelog(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    ttl = 20.0
    name = names.pipeline("ids")
    p = lossless.ids(name, ttl)
    node = p.nodes()[0]
    env = {"LOSSLESS_PIPELINE": name, "LOSSLESS_TTL": str(ttl)}
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:  # the changelog with small segments, so that it compacts within the test
        small = {
            "cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "1000",
            "min.cleanable.dirty.ratio": "0.01", "delete.retention.ms": "100",
        }  # fmt: skip
        await admin.create_topics([NewTopic(node.state_topic, 3, 1, topic_configs=small)])
    finally:
        await admin.close()
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    assert p.sink_topic is not None

    def start(label: str) -> StageProcess:
        args = ("--stats-file", str(tmp_path / f"{label}.json"))
        return StageProcess(
            f"{APP}:ids", "byid", kafka_bootstrap, env, tmp_path / f"{label}.log", args
        )

    async def publish(first: int, count: int) -> None:
        async with Publisher(kafka_bootstrap, p.source, CODEC, "key") as pub:
            for n in range(first, first + count):
                pub.buffer({"key": f"k{n % 100}", "n": n, "hops": 0, "payload": "x"})

    a, b, c = 3_000, 1_000, 30
    stage = start("first")
    try:
        await publish(0, a)
        await wait_for_count(kafka_bootstrap, p.sink_topic, a, 60)
        await asyncio.sleep(ttl + 1)  # A's ids expire
        await publish(a, b)  # handling B forgets A: tombstones
        await wait_for_count(kafka_bootstrap, p.sink_topic, a + b, 60)
        await asyncio.sleep(1.5)
        await publish(a + b, c)  # rolls the segment that holds A, its tombstones and B
        await wait_for_count(kafka_bootstrap, p.sink_topic, a + b + c, 60)
        live = b + c

        async def changelog() -> tuple[int, int]:
            records = await read_all(kafka_bootstrap, node.state_topic)
            return len(records), sum(r.value is not None for r in records)

        deadline = time.monotonic() + 90
        total, values = await changelog()
        while values > live:
            assert time.monotonic() < deadline, f"changelog still holds {values} ids"
            await asyncio.sleep(1)
            total, values = await changelog()
    finally:
        assert stage.terminate() == 0, stage.output()[-3000:]
    first_stats = stats_of(tmp_path / "first.json")
    # A restart restores from the compacted changelog: only the live ids come back.
    again = start("again")
    try:
        await until(lambda: stat(tmp_path / "again.json", "state") == "running", "restart", 60)
        restored = stats_of(tmp_path / "again.json")
    finally:
        assert again.terminate() == 0, again.output()[-3000:]
    print(
        f"\nevent ids, TTL {ttl:.0f}s: {a:,} ids expired, then {live:,} live; the compacted "
        f"changelog holds {values:,} ids (+{total - values:,} tombstones); a restart read "
        f"{restored['restored']:,} changelog records and holds {restored['ids_held']:,} ids"
    )
    assert first_stats["duplicates"] == 0 and first_stats["produced"] == a + b + c
    assert values <= live
    assert restored["restored"] <= total  # it read the compacted log, no more
    assert restored["ids_held"] == live


# -- 3. records deleted past a stopped stage's committed offset ------------------------------


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        ends = await end_offsets(bootstrap, topic)
        return {p: (await consumer.committed(TopicPartition(topic, p))) or 0 for p in ends}
    finally:
        await consumer.stop()


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_records_deleted_past_a_stopped_stage_stop_it_until_told(
    kafka_bootstrap: str, names: Names, tmp_path: Path, delivery: str
) -> None:
    name = names.pipeline(f"del{delivery[:3]}")
    p = lossless.passthrough(name, delivery)
    node = p.nodes()[0]
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    env = {"LOSSLESS_PIPELINE": name, "LOSSLESS_DELIVERY": delivery}
    assert p.sink_topic is not None

    def start(label: str, *extra: str) -> StageProcess:
        args = ("--stats-file", str(tmp_path / f"{label}.json"), *extra)
        return StageProcess(
            f"{APP}:passthrough", "keep", kafka_bootstrap, env, tmp_path / f"{label}.log", args
        )

    async def publish(first: int, count: int) -> None:
        async with Publisher(kafka_bootstrap, p.source, CODEC, "key") as pub:
            for n in range(first, first + count):
                pub.buffer({"key": f"k{n % 100}", "n": n, "hops": 0, "payload": "x"})

    stage = start("first")
    try:
        await publish(0, 3_000)
        await until(lambda: (stat(tmp_path / "first.json", "produced") or 0) >= 3_000, "3k", 60)
    finally:
        assert stage.terminate() == 0, stage.output()[-3000:]
    await publish(3_000, 3_000)  # the stage is stopped: nobody reads these yet
    committed = await committed_offsets(kafka_bootstrap, node.group, p.source)
    ends = await end_offsets(kafka_bootstrap, p.source)
    source = await read_all(kafka_bootstrap, p.source)
    cut = {q: committed[q] + (ends[q] - committed[q]) // 2 for q in ends}  # half the unread
    deleted = {
        CODEC.decode(r.value)["n"]
        for r in source
        if committed[r.partition] <= r.offset < cut[r.partition]
    }
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records(
            {TopicPartition(p.source, q): RecordsToDelete(cut[q]) for q in ends}
        )
    finally:
        await admin.close()
    # Restarted as it was: it stops, says what is gone and how to go on; it skips nothing.
    t0 = time.monotonic()
    refused = start("refused")
    code = refused.proc.wait(60)
    refused.terminate()
    took = time.monotonic() - t0
    text = refused.output()
    assert code == 1, text[-3000:]
    assert "below the log start" in text, text[-3000:]
    assert f"{len(deleted):,} records were deleted" in text, text[-3000:]
    assert p.source in text and "--offset-reset earliest" in text
    assert "Traceback" not in text, text[-3000:]
    assert await committed_offsets(kafka_bootstrap, node.group, p.source) == committed
    # Told to go on from the log start: it skips exactly the deleted records, and says so.
    resumed = start("resumed", "--offset-reset", "earliest")
    expected = 6_000 - len(deleted)
    try:
        rest = expected - 3_000
        await until(lambda: (stat(tmp_path / "resumed.json", "produced") or 0) >= rest, "rest", 60)
        async with TopicReader(kafka_bootstrap, p.sink_topic) as reader:
            await reader.settle(2.0)
    finally:
        assert resumed.terminate() == 0, resumed.output()[-3000:]
    stats = stats_of(tmp_path / "resumed.json")
    out = numbers(reader.records)
    print(
        f"\n{delivery}: {len(deleted):,} unread records deleted past the stopped stage; the "
        f"restart stopped in {took:.1f}s (exit {code}) naming them; with --offset-reset "
        f"earliest it skipped {stats['skipped']:,} and the sink holds {len(out):,} of 6,000"
    )
    assert stats["skipped"] == len(deleted)
    assert set(out) == set(range(6_000)) - deleted and max(out.values()) == 1
    assert "skipping" in resumed.output() and "ERROR" in resumed.output()


# -- 4. a zombie that comes back, while records flow ------------------------------------------


@pytest.mark.parametrize("run", range(5))
async def test_a_zombie_that_comes_back_stops_with_the_fence_error(
    kafka_bootstrap: str, names: Names, tmp_path: Path, run: int
) -> None:
    name = names.pipeline(f"zombie{run}")
    p = twostage.build(name, "exactly_once")
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    env = {"TWO_PIPELINE": name, "TWO_DELIVERY": "exactly_once"}
    fast = ("--session-timeout-ms", "6000", "--max-records", "200")
    ref, sink = "tests.integration.apps.twostage:build", f"{name}.mark"
    zombie = StageProcess(
        ref, "mark", kafka_bootstrap, {**env, "TWO_SLOW_MS": "2"}, tmp_path / "a.log", fast
    )
    survivor = StageProcess(ref, "mark", kafka_bootstrap, env, tmp_path / "b.log", fast)
    store = SchemaStore.from_directory(twostage.SCHEMAS)
    published = 0
    flowing = asyncio.Event()
    flowing.set()

    async def flow() -> None:  # records keep arriving all through the test
        nonlocal published
        async with Publisher(kafka_bootstrap, p.source, store.codec(twostage.EVENT), "key") as pub:
            while flowing.is_set():
                for _ in range(100):
                    pub.buffer(
                        {"key": f"k{published % 300}", "n": published, "hops": 0, "payload": "z"}
                    )
                    published += 1
                await pub.flush()
                await asyncio.sleep(0.05)

    publisher = asyncio.create_task(flow())
    code = None
    try:
        await asyncio.sleep(8)  # both instances joined and own partitions
        zombie.signal(signal.SIGSTOP)  # silent past its session timeout, mid-transaction
        await asyncio.sleep(12)  # the survivor takes its partitions, fencing its producers
        zombie.signal(signal.SIGCONT)  # it wakes up and carries on as if nothing happened
        try:
            code = await asyncio.to_thread(zombie.proc.wait, 60)
        except Exception:
            zombie.signal(signal.SIGUSR1)  # its log then says where it is stuck
            await asyncio.sleep(1)
            raise
        await asyncio.sleep(2)
        flowing.clear()
        await publisher
        async with TopicReader(kafka_bootstrap, sink) as reader:
            got = await reader.until_distinct(published, within=120)
            await reader.settle(2.0)
    finally:
        flowing.clear()
        if zombie.proc.poll() is None:
            zombie.signal(signal.SIGCONT)
        zombie.kill()
        survivor_code = survivor.terminate()
    text = zombie.output()
    print(
        f"\nrun {run + 1}/5: zombie exit code {code}; the survivor delivered {got:,} of "
        f"{published:,} records, {len(reader.records):,} read_committed"
    )
    assert code == 1, text[-3000:]
    assert "fenced" in text and "Traceback" not in text, text[-3000:]
    assert survivor_code == 0, survivor.output()[-3000:]
    assert "sequence gap" not in survivor.output(), survivor.output()[-3000:]
    assert got == published
    assert len({(r.key, seq_of(r)) for r in reader.records}) == len(reader.records)  # once each
    assert not order_violations(reader.records)


# -- 5. a dependency that is down ---------------------------------------------------------------


async def test_a_dependency_down_for_20s_pauses_the_stage_and_loses_nothing(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    keys, warm, burst, poison = 1_000, 1_000, 10_000, "k13"
    received: Counter[int] = Counter()

    def handler(req: StubRequest) -> StubReply:
        body = req.json()
        if body["key"] == poison:
            return StubReply(500, {"error": "cannot handle this one"})
        received[body["n"]] += 1
        return StubReply(200, {})

    name = names.pipeline("http")
    stub = await HttpStub(handler).__aenter__()
    port = stub.port
    p = lossless.http(name, stub.url("/hook"))
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    stats_file = tmp_path / "stats.json"
    stage = StageProcess(
        f"{APP}:http", "post", kafka_bootstrap,
        # A poison record at the very end has no later key to judge it: it waits 10 s.
        {"LOSSLESS_PIPELINE": name, "LOSSLESS_URL": stub.url("/hook"), "LOSSLESS_VERDICT_S": "10"},
        tmp_path / "post.log", ("--stats-file", str(stats_file)),
    )  # fmt: skip
    states: Counter[str] = Counter()
    poisoned = {n for n in range(warm + burst) if f"k{n % keys}" == poison}
    good = warm + burst - len(poisoned)
    try:
        async with Publisher(kafka_bootstrap, p.source, CODEC, "key") as pub:
            for n in range(warm):
                pub.buffer({"key": f"k{n % keys}", "n": n, "hops": 0, "payload": "w"})
            await pub.flush()
            await until(lambda: len(received) >= warm - 1, "the warm-up", 60)
            await stub.__aexit__(None, None, None)  # the dependency goes down for 20 s
            down = time.monotonic()
            n = warm
            while time.monotonic() - down < 20:  # 10,000 records arrive over 18 s
                target = warm + min(burst, int(burst * (time.monotonic() - down) / 18))
                while n < target:
                    pub.buffer({"key": f"k{n % keys}", "n": n, "hops": 0, "payload": "b"})
                    n += 1
                await pub.flush()
                if stats_file.exists():
                    states[stats_of(stats_file)["state"]] += 1
                await asyncio.sleep(0.25)
            while n < warm + burst:
                pub.buffer({"key": f"k{n % keys}", "n": n, "hops": 0, "payload": "b"})
                n += 1
        stats_down = stats_of(stats_file)
        stub = await HttpStub(handler, port=port).__aenter__()  # back, at the same address
        back = time.monotonic()
        await until(lambda: len(received) >= good, "every good record", 120)
        caught_up = time.monotonic() - back
        await until(lambda: stat(stats_file, "dead_letters") >= len(poisoned), "poison", 60)
        await asyncio.sleep(1)
    finally:
        await stub.__aexit__(None, None, None)
        code = stage.terminate()
    assert code == 0, stage.output()[-3000:]
    stats = stats_of(stats_file)
    dead = await read_all(kafka_bootstrap, f"{name}.post.dlq")
    assert p.sink_topic is not None
    out = numbers(await read_all(kafka_bootstrap, p.sink_topic))
    print(
        f"\ndependency down 20s while {burst:,} records of {keys:,} keys arrived: during the "
        f"outage the stage reported {dict(states)}, dead-lettered {stats_down['dead_letters']} "
        f"(the warm-up's poison), paused {stats['pauses']} times; {caught_up:.1f}s after it "
        f"came back every record was through: {len(out):,} out, {len(dead)} dead letters "
        f"({stats['dead_by_error']}), the endpoint saw each good record {set(received.values())}"
    )
    assert set(received) == set(range(warm + burst)) - poisoned
    assert set(received.values()) == {1}  # each good record reached the endpoint once
    assert set(out) == set(received) and max(out.values()) == 1
    assert sorted(numbers(dead)) == sorted(poisoned)  # only the poison key, and all of it
    # Poison: its 500 (or, for one that last failed while the endpoint was down, that).
    assert sum(stats["dead_by_error"].values()) == len(poisoned)
    assert set(stats["dead_by_error"]) <= {"HttpServerError", "HttpUnavailable"}
    assert stats["pauses"] >= 1
    assert states["paused"] + states["probing"] > 0 and states["running"] < sum(states.values())
    assert stats_down["dead_letters"] <= 1  # nothing but the warm-up's one poison record
