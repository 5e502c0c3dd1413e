"""Broker faults survived without a person: a single broker SIGKILLed and restarted, and on a
replicated 3-node cluster a leader killed, then every node restarted in turn.

Every stage runs as its own OS process (``pipeline run``) and a publisher keeps publishing in
this process while brokers die; the checks read the sink back (``read_committed``).
Run with ``-s`` to see the figures (time to resume, longest stall).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline import Publisher, SchemaStore
from pipeline.broker.cluster import LocalCluster
from pipeline.broker.local import LocalBroker
from pipeline.broker.probe import topic_leaders
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.testing import Names
from tests.integration.apps import chain, twostage
from tests.integration.helpers import (
    StageProcess,
    TopicReader,
    duplicates,
    order_violations,
    seq_of,
)

PAYLOAD = "p" * 100


class Flow:
    """Publishes ``records`` events steadily from this process and watches the sink.

    The publisher flushes every ``chunk`` events (each flush returns once the records are
    durable, acks=all); a flush that fails is an error of the test: nothing may be lost on
    the way in either.
    """

    def __init__(
        self,
        bootstrap: str,
        source: str,
        sink: str,
        schemas: Path,
        event: str,
        records: int,
        *,
        chunk: int = 500,
        pause: float = 0.02,
    ) -> None:
        self.bootstrap, self.source, self.sink = bootstrap, source, sink
        self.codec = SchemaStore.from_directory(schemas).codec(event)
        self.records, self.chunk, self.pause = records, chunk, pause
        self.published = 0
        self.stall = 0.0  # longest time the sink did not grow while records were pending
        self._last_growth = time.monotonic()

    async def publish(self) -> None:
        async with Publisher(self.bootstrap, self.source, self.codec, "key", writer="faults") as p:
            for i in range(self.records):
                value = {"key": f"k{i % 1000}", "n": i, "hops": 0, "payload": PAYLOAD}
                p.buffer(value, seq=i + 1)
                if (i + 1) % self.chunk == 0:
                    await p.flush()
                    self.published = i + 1
                    await asyncio.sleep(self.pause)
            await p.flush()
        self.published = self.records

    async def watch(
        self, reader: TopicReader, until: Callable[[], bool], within: float, procs: list[Any]
    ) -> None:
        """Read the sink until ``until()``; track the longest stall; no stage may exit."""
        deadline = time.monotonic() + within
        last = reader.distinct()
        while not until():
            assert time.monotonic() < deadline, (
                f"stuck: {reader.distinct()} of {self.records} in the sink, "
                f"{self.published} published"
            )
            await reader.poll(200)
            now, n = time.monotonic(), reader.distinct()
            if n > last:
                last, self._last_growth = n, now
            elif n < self.published:
                self.stall = max(self.stall, now - self._last_growth)
            else:
                self._last_growth = now  # nothing pending: not a stall
            exited = {p.stage: p.proc.poll() for p in procs if p.proc.poll() is not None}
            assert not exited, f"stage processes exited: {exited}"


def first_occurrences(records: list[Any]) -> list[Any]:
    seen: set[tuple[bytes, int]] = set()
    firsts = []
    for r in records:
        ident = (r.key, seq_of(r))
        if ident not in seen:
            seen.add(ident)
            firsts.append(r)
    return firsts


def broker_lines(log: str) -> dict[str, int]:
    return {
        "trouble": len(re.findall(r"Kafka broker trouble:", log)),
        "aiokafka": len(re.findall(r" aiokafka[.a-z_]*: ", log)),
        "unreachable": len(re.findall(r"no Kafka broker reachable", log)),
        "reachable again": len(re.findall(r"reachable again", log)),
        "recoveries": len(re.findall(r"a commit failed", log)),
    }


@pytest.mark.parametrize("delivery", ["exactly_once", "at_least_once"])
async def test_single_broker_sigkilled_and_restarted(
    own_broker: LocalBroker, names: Names, tmp_path: Path, delivery: str
) -> None:
    """SIGKILL the only broker mid-run, keep it down 45 s (past the clients' own 40 s of
    retries, so commits fail), restart it: same port, same data; the stages say they cannot
    reach a broker, resume by themselves, and nothing is lost (or duplicated, under EOS)."""
    bootstrap = own_broker.address()
    assert bootstrap is not None
    records = 20_000
    name = names.pipeline()
    p = twostage.build(name, delivery)
    await ensure_topics(bootstrap, topic_specs(p))
    env = {"TWO_PIPELINE": name, "TWO_DELIVERY": delivery}
    ref = "tests.integration.apps.twostage:build"
    fast = ("--unreachable-after", "4")

    def run(stage: str) -> StageProcess:
        stats = ("--stats-file", str(tmp_path / f"{stage}.json"))
        return StageProcess(ref, stage, bootstrap, env, tmp_path / f"{stage}.log", fast + stats)

    procs = [run("mark"), run("count")]
    flow = Flow(bootstrap, p.source, p.sink_topic, twostage.SCHEMAS, twostage.EVENT, records)
    publishing = asyncio.create_task(flow.publish())
    try:
        async with TopicReader(bootstrap, p.sink_topic) as reader:
            await flow.watch(reader, lambda: reader.distinct() >= 5_000, 120, procs)
            before = reader.distinct()
            killed_at = time.monotonic()
            assert own_broker.kill()
            await asyncio.sleep(45)  # past --unreachable-after and the clients' request timeout
            not_ready = [
                json.loads((tmp_path / f"{s}.json").read_text())[0] for s in ("mark", "count")
            ]
            address = await asyncio.to_thread(own_broker.start)
            restarted = time.monotonic()
            assert address == bootstrap, "the restarted broker moved to another address"
            await flow.watch(reader, lambda: reader.distinct() > before + 100, 120, procs)
            resumed = time.monotonic() - restarted
            await flow.watch(reader, lambda: reader.distinct() >= records, 240, procs)
            await publishing
        async with TopicReader(bootstrap, p.sink_topic) as full:
            await full.until_distinct(records, 60)
    finally:
        if not publishing.done():
            publishing.cancel()
        codes = [proc.terminate() for proc in procs]
    logs = {proc.stage: proc.output() for proc in procs}
    lines = {stage: broker_lines(log) for stage, log in logs.items()}
    print(
        f"\n[{delivery}] broker down {restarted - killed_at:.1f}s; stages resumed "
        f"{resumed:.1f}s after it answered; longest stall {flow.stall:.1f}s; "
        f"{len(full.records)} sink records, {duplicates(full.records)} duplicates; "
        f"log lines per stage: {lines}"
    )
    assert codes == [0, 0], {s: log[-3000:] for s, log in logs.items()}
    for stats in not_ready:
        assert stats["reachable"] is False and stats["ready"] is False, stats
    for stage, counted in lines.items():
        assert counted["unreachable"] >= 1 and counted["reachable again"] >= 1, (stage, counted)
        # One line per episode, not one per retry: no storm of aiokafka errors.
        assert counted["aiokafka"] <= 10, (stage, counted, logs[stage][-3000:])
    assert len({(r.key, seq_of(r)) for r in full.records}) == records
    if delivery == "exactly_once":
        assert duplicates(full.records) == 0
        assert not order_violations(full.records)
    else:  # duplicates reach the sink only from the last stage; the order holds regardless
        assert not order_violations(first_occurrences(full.records))


async def test_cluster_leader_killed_then_rolling_restart(
    kafka_cluster: LocalCluster, names: Names, tmp_path: Path
) -> None:
    """A 3-stage exactly-once pipeline on 3 brokers (RF 3, min ISR 2): SIGKILL the broker that
    leads most input partitions and restart it 10 s later, then restart every broker in turn,
    all while 100,000 records flow. Every input once, in order; no stage process exits."""
    bootstrap = kafka_cluster.bootstrap()
    records = 100_000
    name = names.pipeline()
    p = chain.build(name)
    await ensure_topics(bootstrap, topic_specs(p))
    env = {"CHAIN_PIPELINE": name, "CHAIN_DELIVERY": "exactly_once"}
    ref = "tests.integration.apps.chain:build"
    procs = [
        StageProcess(ref, stage, bootstrap, env, tmp_path / f"{stage}.log")
        for stage in ("first", "second", "third")
    ]
    flow = Flow(bootstrap, p.source, p.sink_topic, chain.SCHEMAS, chain.EVENT, records)
    publishing = asyncio.create_task(flow.publish())
    bounces: list[str] = []
    try:
        async with TopicReader(bootstrap, p.sink_topic) as reader:
            await flow.watch(reader, lambda: reader.distinct() >= 20_000, 300, procs)
            leaders = await asyncio.to_thread(topic_leaders, bootstrap, p.source)
            victim = await asyncio.to_thread(kafka_cluster.leader_of_most, p.source)
            assert victim is not None, leaders
            await asyncio.to_thread(kafka_cluster.kill, victim)
            killed = time.monotonic()
            await flow.watch(reader, lambda: time.monotonic() - killed >= 10, 60, procs)
            await asyncio.to_thread(kafka_cluster.start_node, victim)
            bounces.append(f"node {victim} (leader of {leaders}) killed for 10 s")
            await flow.watch(reader, lambda: reader.distinct() >= 55_000, 300, procs)
            for node in (1, 2, 3):  # a rolling restart, records flowing
                began = time.monotonic()
                await asyncio.to_thread(kafka_cluster.stop_node, node)
                await asyncio.to_thread(kafka_cluster.start_node, node)
                bounces.append(f"node {node} restarted in {time.monotonic() - began:.1f}s")
            await flow.watch(reader, lambda: reader.distinct() >= records, 400, procs)
            await publishing
        async with TopicReader(bootstrap, p.sink_topic) as full:
            await full.until_distinct(records, 60)
    finally:
        if not publishing.done():
            publishing.cancel()
        for node in (1, 2, 3):  # leave the session's cluster whole for the next test
            await asyncio.to_thread(kafka_cluster.start_node, node)
        codes = [proc.terminate() for proc in procs]
    logs = {proc.stage: proc.output() for proc in procs}
    print(
        f"\n[cluster] {'; '.join(bounces)}; longest stall {flow.stall:.1f}s; "
        f"{len(full.records)} sink records of {records}; log lines per stage: "
        f"{ {s: broker_lines(log) for s, log in logs.items()} }"
    )
    assert codes == [0, 0, 0], {s: log[-3000:] for s, log in logs.items()}
    assert len({(r.key, seq_of(r)) for r in full.records}) == records
    assert duplicates(full.records) == 0
    assert not order_violations(full.records)
