"""The same behaviour tests on three runtimes: the in-memory driver, the framework's worker on
the real broker, and a faust-streaming app on the real broker (:mod:`pipeline.faust`).

Each test runs once on the :class:`~pipeline.testing.TestDriver` (memory), once on the real
broker (``run_stages`` in-process) and once as an agent of a Faust app (``pipeline faust`` in a
child process, Faust's own worker), through one small harness interface.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiokafka import AIOKafkaProducer

from pipeline import Pipeline, Publisher
from pipeline.record import ID_HEADER, SEQ_HEADER, decode_seq
from pipeline.runtime import deadletter
from pipeline.runtime.runner import RunOptions, run_stages
from pipeline.runtime.stats import StageStats
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.runtime.transport import Batching
from pipeline.testing import TestDriver
from tests.integration.apps.conformance import by_id, pipeline, step
from tests.integration.helpers import StageProcess, committed, end_offsets, read_all


class Harness(Protocol):
    async def send(self, value: dict[str, Any], *, seq: int, event_id: str) -> None: ...
    async def send_raw(self, key: bytes, value: bytes) -> None: ...
    async def run(self, expected_inputs: int) -> StageStats: ...
    async def outputs(self) -> list[tuple[bytes, int | None, int, bytes | None]]: ...
    async def dead(self) -> list[tuple[bytes | None, str, int]]: ...


class MemoryHarness:
    def __init__(self, p: Pipeline) -> None:
        self.p, self.driver = p, TestDriver(p)

    async def send(self, value: dict[str, Any], *, seq: int, event_id: str) -> None:
        self.driver.send(value, seq=seq, event_id=event_id)

    async def send_raw(self, key: bytes, value: bytes) -> None:
        self.driver.send_raw(key, value)

    async def run(self, expected_inputs: int) -> StageStats:
        stats = await self.driver.drain()
        return stats[self.p.stages[0].name]

    async def outputs(self) -> list[tuple[bytes, int | None, int, bytes | None]]:
        topic = self.p.sink_topic
        assert topic
        return _summarise(self.p, self.driver.records(topic))

    async def dead(self) -> list[tuple[bytes | None, str, int]]:
        return [(d.key, d.error_class, d.attempts) for d in self.driver.dead_letters()]


class KafkaHarness:
    def __init__(self, p: Pipeline, bootstrap: str) -> None:
        self.p, self.bootstrap = p, bootstrap
        self._pub: Publisher | None = None
        self._raw: AIOKafkaProducer | None = None

    async def start(self) -> None:
        await ensure_topics(self.bootstrap, topic_specs(self.p))
        codec = self.p.schemas.codec(self.p.stages[0].input)
        self._pub = Publisher(self.bootstrap, self.p.source, codec, "id")
        await self._pub.__aenter__()
        self._raw = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True)
        await self._raw.start()

    async def close(self) -> None:
        if self._pub is not None:
            await self._pub.__aexit__(None, None, None)
        if self._raw is not None:
            await self._raw.stop()

    async def send(self, value: dict[str, Any], *, seq: int, event_id: str) -> None:
        assert self._pub is not None
        await self._pub.publish(value, seq=seq, event_id=event_id)
        await self._pub.flush()  # keep the interleaving with raw sends in order

    async def send_raw(self, key: bytes, value: bytes) -> None:
        assert self._raw is not None
        await self._raw.send_and_wait(self.p.source, value, key=key)

    async def run(self, expected_inputs: int) -> StageStats:
        stop = asyncio.Event()

        def watch(stats: list[StageStats]) -> None:
            if stats[0].consumed >= expected_inputs and stats[0].commits:
                stop.set()

        opts = RunOptions(batching=Batching(fetch_wait_ms=50), stats_interval=0.2)
        [stats] = await asyncio.wait_for(
            run_stages(self.p, [self.p.stages[0].name], self.bootstrap, options=opts,
                       stop=stop, on_stats=watch),
            timeout=120,
        )  # fmt: skip
        return stats

    async def outputs(self) -> list[tuple[bytes, int | None, int, bytes | None]]:
        topic = self.p.sink_topic
        assert topic
        return _summarise(self.p, await read_all(self.bootstrap, topic))

    async def dead(self) -> list[tuple[bytes | None, str, int]]:
        found = []
        for r in await read_all(self.bootstrap, self.p.nodes()[0].dlq_topic):
            h = dict(r.headers)
            found.append((r.key, h[deadletter.ERROR_CLASS].decode(), int(h[deadletter.ATTEMPTS])))
        return found


class FaustHarness(KafkaHarness):
    """The stage as an agent of a Faust app: ``pipeline faust`` (Faust's worker) in a child
    process, stopped once Faust's committed offsets cover every input record."""

    def __init__(self, p: Pipeline, bootstrap: str, stage: str, workdir: Path) -> None:
        super().__init__(p, bootstrap)
        self.stage, self.workdir = stage, workdir

    async def run(self, expected_inputs: int) -> StageStats:
        node = self.p.nodes()[0]
        stats_file = self.workdir / f"{self.p.name}.json"
        proc = StageProcess(
            "tests.integration.apps.conformance:build", node.name, self.bootstrap,
            {"CONF_PIPELINE": self.p.name, "CONF_STAGE": self.stage},
            self.workdir / f"{self.p.name}.log", ("--stats-file", str(stats_file)), faust=True,
        )  # fmt: skip
        try:
            ends = await end_offsets(self.bootstrap, node.input_topic)
            deadline = time.monotonic() + 120
            while True:
                assert proc.proc.poll() is None, proc.output()[-3000:]
                done = await committed(self.bootstrap, node.group, node.input_topic)
                if all(done[p] >= end for p, end in ends.items()):
                    break
                assert time.monotonic() < deadline, f"Faust committed {done} of {ends}"
                await asyncio.sleep(0.5)
        finally:
            code = proc.terminate()
        assert code == 0, proc.output()[-3000:]
        entry = json.loads(stats_file.read_text())[0]
        stats = StageStats(entry["stage"])
        for name in ("consumed", "processed", "produced", "filtered", "duplicates",
                     "dead_letters", "retries", "gaps"):  # fmt: skip
            setattr(stats, name, entry[name])
        assert stats.consumed == expected_inputs, entry
        return stats


def _summarise(
    p: Pipeline, records: list[Any]
) -> list[tuple[bytes, int | None, int, bytes | None]]:
    codec = p.schemas.codec("conf.Event")
    out = []
    for r in records:
        h = dict(r.headers)
        seq = decode_seq(h[SEQ_HEADER]) if SEQ_HEADER in h else None
        out.append((r.key, seq, codec.decode(r.value)["n"], h.get(ID_HEADER)))
    return out


@pytest.fixture(params=["memory", "kafka", "faust"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    made: list[KafkaHarness] = []

    async def factory(which: Any) -> Harness:
        name = f"conf-{uuid.uuid4().hex[:8]}"
        if request.param == "memory":
            return MemoryHarness(pipeline(name, which))
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        if request.param == "faust":
            workdir = request.getfixturevalue("tmp_path")
            h = FaustHarness(pipeline(name, which), bootstrap, which.name, workdir)
        else:
            h = KafkaHarness(pipeline(name, which), bootstrap)
        await h.start()
        made.append(h)
        return h

    yield factory
    for h in made:
        await h.close()


async def test_per_key_order_is_kept(make: Any) -> None:
    h = await make(step)
    for i in range(300):
        await h.send({"id": f"k{i % 7}", "n": i}, seq=i // 7 + 1, event_id=f"e{i}")
    stats = await h.run(300)
    outs = await h.outputs()
    assert stats.produced == 300
    by_key: dict[bytes, list[int]] = {}
    for key, seq, _n, _id in outs:
        assert seq is not None
        by_key.setdefault(key, []).append(seq)
    assert all(seqs == sorted(seqs) and len(set(seqs)) == len(seqs) for seqs in by_key.values())
    assert sorted(n for *_, n, _ in outs) == [i + 1000 for i in range(300)]


async def test_duplicates_by_sequence_and_by_event_id_are_dropped(make: Any) -> None:
    h = await make(step)
    await h.send({"id": "a", "n": 1}, seq=1, event_id="x1")
    await h.send({"id": "a", "n": 1}, seq=1, event_id="x1")  # retransmission
    await h.send({"id": "a", "n": 2}, seq=2, event_id="x2")
    await h.send({"id": "a", "n": 0}, seq=1, event_id="x0")  # an older sequence: duplicate
    await h.send({"id": "a", "n": 5}, seq=5, event_id="x5")  # a gap: processed, counted
    stats = await h.run(5)
    assert [n for *_, n, _ in await h.outputs()] == [1001, 1002, 1005]
    assert (stats.duplicates, stats.gaps) == (2, 1)

    h = await make(by_id)
    await h.send({"id": "b", "n": 1}, seq=1, event_id="same")
    await h.send({"id": "b", "n": 1}, seq=2, event_id="same")  # same event id: duplicate
    await h.send({"id": "b", "n": 2}, seq=3, event_id="other")
    stats = await h.run(3)
    assert [n for *_, n, _ in await h.outputs()] == [1, 2]
    assert stats.duplicates == 1


async def test_dead_letters_filter_and_flat_map(make: Any) -> None:
    h = await make(step)
    await h.send({"id": "a", "n": 1, "fail": "always"}, seq=1, event_id="1")
    await h.send({"id": "a", "n": 2, "fail": "fatal"}, seq=2, event_id="2")
    await h.send({"id": "a", "n": 3, "fail": "drop"}, seq=3, event_id="3")
    await h.send({"id": "a", "n": 4, "fail": "split"}, seq=4, event_id="4")
    await h.send_raw(b"a", b"\xc3\x01truncated")
    stats = await h.run(5)
    assert sorted(await h.dead()) == sorted(
        [(b"a", "ValueError", 3), (b"a", "StageError", 1), (b"a", "DecodeError", 0)]
    )
    outs = await h.outputs()
    assert [n for *_, n, _ in outs] == [40, 41, 42]
    assert (stats.filtered, stats.dead_letters, stats.retries, stats.produced) == (1, 3, 2, 3)
    assert (
        stats.consumed == stats.processed + stats.filtered + stats.duplicates + stats.dead_letters
    )
