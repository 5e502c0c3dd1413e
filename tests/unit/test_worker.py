"""The real StageWorker on the in-memory transport, with a real SchemaStore and Avro codec."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from pipeline import (
    Emit,
    Pipeline,
    Record,
    RetryPolicy,
    Stage,
    StageError,
    TopicPolicy,
    stage,
)
from pipeline.errors import BrokerError, TopicError
from pipeline.record import ID_HEADER, PART_HEADER, SEQ_HEADER, decode_seq, encode_seq
from pipeline.runtime import deadletter as dlq
from pipeline.runtime.kafka import partition_for
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Batching, TopicPartition
from pipeline.runtime.worker import StageWorker
from pipeline.schema import MAGIC, SchemaStore
from pipeline.testing.driver import VirtualClock
from pipeline.testing.memory import MemoryBroker, MemoryRecord, MemoryTransport

SCHEMAS = Path(__file__).parent / "schemas_worker"
ORDER = "test.worker.Order"
PRICED = "test.worker.Priced"
LINE = "test.worker.Line"
PARTS = 3
CLOCK_MS = 1_700_000_000_000
FAST = Batching(fetch_wait_ms=5, flush_interval_ms=2)


class FakeSleep(VirtualClock):
    """Records the waits the worker asks for instead of waiting (virtual time)."""

    async def __call__(self, seconds: float) -> None:
        await self.sleep(seconds)


async def until(
    condition: Callable[[], bool], what: str | Callable[[], str], seconds: float = 5.0
) -> None:
    """Poll ``condition`` (the broker has no change events to wait on) until true or time out."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            label = what if isinstance(what, str) else what()
            pytest.fail(f"timed out after {seconds}s waiting for {label}")
        await asyncio.sleep(0.0005)


class Harness:
    """One stage of pipeline ``p`` on a memory broker: publish, drain, read outputs."""

    def __init__(
        self,
        stage: Stage,
        *,
        transport_type: type[MemoryTransport] = MemoryTransport,
        broker: MemoryBroker | None = None,
        batching: Batching = FAST,
    ) -> None:
        self.store = SchemaStore.from_directory(SCHEMAS)
        pipeline = Pipeline(
            "p", source="p.in", key="order_id", schemas=self.store, topics=TopicPolicy(PARTS)
        )
        self.node = (pipeline | stage).nodes()[0]
        self.broker = broker or MemoryBroker(clock=lambda: CLOCK_MS)
        for topic in (
            self.node.input_topic, self.node.output_topic, self.node.dlq_topic,
            self.node.state_topic,
        ):  # fmt: skip
            if topic:
                self.broker.create_topic(topic, PARTS)
        self.sleep = FakeSleep()
        self.codec_in = self.store.codec(stage.input)
        self.codec_out = self.store.codec(stage.output) if stage.output else None
        self.transport = transport_type(
            self.broker,
            group=self.node.group,
            input_topic=self.node.input_topic,
            state_topic=self.node.state_topic,
        )
        self.worker = StageWorker(
            self.node, self.store, self.transport, batching=batching, sleep=self.sleep,
            clock=self.sleep.now,
        )  # fmt: skip
        self._seqs = itertools.count(1)

    def publish(self, value: dict[str, Any], **kwargs: Any) -> MemoryRecord:
        return self.publish_raw(value["order_id"].encode(), self.codec_in.encode(value), **kwargs)

    def publish_raw(
        self,
        key: bytes | None,
        data: bytes | None,
        *,
        headers: Iterable[tuple[str, bytes]] = (),
        timestamp: int | None = None,
    ) -> MemoryRecord:
        seq = next(self._seqs)
        framework = [(SEQ_HEADER, encode_seq(seq)), (ID_HEADER, f"id-{seq}".encode())]
        return self.broker.produce(
            self.node.input_topic, key, data, [*framework, *headers], timestamp=timestamp
        )

    async def drain(self, seconds: float = 5.0) -> StageStats:
        """Run the worker until every input is committed, then stop it and return its stats."""
        return await self.drain_partitions(range(PARTS), seconds)

    async def drain_partitions(self, partitions: Iterable[int], seconds: float = 5.0) -> StageStats:
        """Run the worker until ``partitions`` are committed to their end; stop it; its stats."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.worker.run(stop))
        topic, wanted = self.node.input_topic, list(partitions)

        holds = self.worker.handler.holds
        transport = self.transport

        def drained() -> bool:
            ends, done = (
                self.broker.end_offsets(topic),
                self.broker.committed(self.node.group, topic),
            )
            if holds.held and not holds.tripped and transport.caught_up() and self.worker.idle:
                # Nothing later can bring held records a verdict: let its timeout pass.
                self.sleep.advance(self.node.stage.breaker.verdict_timeout)
            return task.done() or all(done.get(p, 0) == ends[p] for p in wanted)

        try:
            await until(drained, lambda: f"a drained input: {self.worker.stats.summary()}", seconds)
        finally:
            stop.set()
            async with asyncio.timeout(seconds):
                stats = await task
        return stats

    def outputs(self) -> list[MemoryRecord]:
        assert self.node.output_topic is not None
        return self.broker.records(self.node.output_topic)

    def values(self) -> list[Any]:
        assert self.codec_out is not None
        return [self.codec_out.decode(r.value) for r in self.outputs() if r.value is not None]

    def dead(self) -> list[MemoryRecord]:
        return self.broker.records(self.node.dlq_topic)


def order(order_id: str, n: int = 1, amount: float = 2.5) -> dict[str, Any]:
    return {"order_id": order_id, "n": n, "amount": amount, "note": ""}


def assert_accounted(stats: StageStats, consumed: int) -> None:
    assert stats.consumed == consumed
    total = stats.processed + stats.filtered + stats.duplicates + stats.dead_letters
    assert total == stats.consumed, stats.as_dict()


def keys_with_partitions(same: bool, count: int = 2) -> list[bytes]:
    """``count`` keys that share a partition (``same``) or all sit on different ones."""
    found: list[bytes] = []
    for i in range(10_000):
        key = f"k{i}".encode()
        parts = {partition_for(k, PARTS) for k in found}
        p = partition_for(key, PARTS)
        if (same and (not found or p in parts)) or (not same and p not in parts):
            found.append(key)
        if len(found) == count:
            return found
    raise AssertionError("no such keys")


@stage(input=ORDER, output=PRICED)
def price(o: dict[str, Any]) -> dict[str, Any]:
    return {"order_id": o["order_id"], "n": o["n"], "total": o["amount"] * o["n"]}


# -- maps, filters, flat-maps, re-keying -------------------------------------------------


async def test_sync_map_writes_one_output_per_input_and_commits_everything() -> None:
    h = Harness(price)
    for i in range(1, 7):
        h.publish(order(f"o-{i}", n=i))
    stats = await h.drain()
    totals = {v["order_id"]: v["total"] for v in h.values()}
    assert totals == {f"o-{i}": 2.5 * i for i in range(1, 7)}
    assert (stats.processed, stats.produced, stats.dead_letters) == (6, 6, 0)
    assert_accounted(stats, 6)
    assert h.broker.committed("p.price", "p.in") == {
        p: end for p, end in h.broker.end_offsets("p.in").items() if end
    }
    assert h.dead() == []


async def test_async_stage_is_awaited() -> None:
    @stage(input=ORDER, output=PRICED)
    async def slow_price(o: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"order_id": o["order_id"], "n": o["n"], "total": -1.0}

    h = Harness(slow_price)
    for i in range(5):
        h.publish(order(f"o-{i}"))
    stats = await h.drain()
    assert sorted(v["order_id"] for v in h.values()) == [f"o-{i}" for i in range(5)]
    assert {v["total"] for v in h.values()} == {-1.0}
    assert_accounted(stats, 5)


async def test_output_keeps_key_seq_event_id_other_headers_and_timestamp() -> None:
    h = Harness(price)
    src = h.publish(order("o-42"), headers=[("trace", b"t-1")], timestamp=123_456)
    await h.drain()
    [out] = h.outputs()
    assert out.key == b"o-42"
    assert out.partition == partition_for(b"o-42", PARTS)
    assert out.timestamp == 123_456
    assert out.headers == src.headers  # seq, event-id and the caller's header, in order
    assert decode_seq(out.header(SEQ_HEADER) or b"") == decode_seq(src.header(SEQ_HEADER) or b"")


async def test_record_context_is_passed_to_two_parameter_functions() -> None:
    seen: list[tuple[bytes | None, int | None, bytes | None, str, int]] = []

    @stage(input=ORDER, output=PRICED)
    def with_context(o: dict[str, Any], record: Record) -> dict[str, Any]:
        seen.append((record.key, record.seq, record.id, record.topic, record.offset))
        return price(o)

    h = Harness(with_context)
    src = h.publish(order("o-1"))
    await h.drain()
    assert seen == [(b"o-1", 1, b"id-1", "p.in", src.offset)]


async def test_filter_counts_none_and_writes_nothing() -> None:
    @stage(input=ORDER, output=PRICED)
    def even_only(o: dict[str, Any]) -> dict[str, Any] | None:
        return price(o) if o["n"] % 2 == 0 else None

    h = Harness(even_only)
    for i in range(1, 9):
        h.publish(order(f"o-{i}", n=i))
    stats = await h.drain()
    assert sorted(v["n"] for v in h.values()) == [2, 4, 6, 8]
    assert (stats.filtered, stats.processed, stats.produced) == (4, 4, 4)
    assert_accounted(stats, 8)
    assert h.broker.lag("p.even_only", "p.in") == 0  # filtered records are committed too


@pytest.mark.parametrize("style", ["list", "generator"])
async def test_flat_map_marks_parts_in_order_on_the_input_key(style: str) -> None:
    def lines(o: dict[str, Any]) -> Iterable[dict[str, Any]]:
        items = ({"order_id": o["order_id"], "sku": f"s{i}", "qty": i} for i in range(o["n"]))
        return list(items) if style == "list" else items

    split = stage("split", input=ORDER, output=LINE)(lines)
    h = Harness(split)
    h.publish(order("o-1", n=3))
    h.publish(order("o-2", n=2))
    h.publish(order("o-3", n=0))  # no parts: filtered, not lost
    stats = await h.drain()
    by_key: dict[bytes | None, list[MemoryRecord]] = defaultdict(list)
    for rec in h.outputs():
        by_key[rec.key].append(rec)
    assert sorted(by_key) == [b"o-1", b"o-2"]
    assert h.codec_out is not None
    for key, recs in by_key.items():
        assert [r.header(PART_HEADER) for r in recs] == [str(i).encode() for i in range(len(recs))]
        skus = [h.codec_out.decode(r.value or b"")["sku"] for r in recs]
        assert skus == [f"s{i}" for i in range(len(recs))]
        assert {r.partition for r in recs} == {partition_for(key or b"", PARTS)}
        assert len({r.header(SEQ_HEADER) for r in recs}) == 1  # all parts share the input seq
    assert (stats.produced, stats.processed, stats.filtered) == (5, 2, 1)
    assert_accounted(stats, 3)


async def test_emit_with_a_new_key_lands_on_the_new_keys_partition() -> None:
    old, new = keys_with_partitions(same=False)

    @stage(input=ORDER, output=LINE)
    def by_sku(o: dict[str, Any]) -> Emit:
        line = {"order_id": o["order_id"], "sku": new.decode(), "qty": 1}
        return Emit(line, key=new, headers=[("rekeyed", b"1")])

    h = Harness(by_sku)
    src = h.publish_raw(old, h.codec_in.encode(order(old.decode())))
    await h.drain()
    [out] = h.outputs()
    assert out.key == new
    assert out.partition == partition_for(new, PARTS) != src.partition
    # Re-keyed: no sequence (it belonged to the old key), an event id derived from the input's.
    assert out.header(SEQ_HEADER) is None
    assert out.header(ID_HEADER) == (src.header(ID_HEADER) or b"") + b"/" + new
    assert out.header("rekeyed") == b"1"


async def test_emit_without_a_key_keeps_the_input_key() -> None:
    @stage(input=ORDER, output=PRICED)
    def tagged(o: dict[str, Any]) -> Emit:
        return Emit(price(o), headers=[("tag", b"x")])

    h = Harness(tagged)
    src = h.publish(order("o-7"))
    await h.drain()
    [out] = h.outputs()
    assert (out.key, out.partition) == (b"o-7", src.partition)
    assert out.header("tag") == b"x"


async def test_sink_counts_processed_and_writes_nothing() -> None:
    seen: list[str] = []

    @stage(input=ORDER, output=None)
    def sink(o: dict[str, Any]) -> bool:
        seen.append(o["order_id"])
        return True

    h = Harness(sink)
    for i in range(4):
        h.publish(order(f"o-{i}"))
    stats = await h.drain()
    assert sorted(seen) == [f"o-{i}" for i in range(4)]
    assert (stats.processed, stats.produced) == (4, 0)
    assert_accounted(stats, 4)


# -- concurrency: order per key, overlap across keys, safe commits ---------------------


async def test_concurrency_keeps_per_key_order_and_overlaps_keys() -> None:
    active: set[str] = set()
    peak = 0
    started: dict[str, list[int]] = defaultdict(list)

    @stage(input=ORDER, output=PRICED, concurrency=8)
    async def varied(o: dict[str, Any]) -> dict[str, Any]:
        nonlocal peak
        key = o["order_id"]
        assert key not in active, f"two records of {key} in flight at once"
        active.add(key)
        peak = max(peak, len(active))
        started[key].append(o["n"])
        await asyncio.sleep(0.001 * (int(key[1:]) % 4))  # keys take different times
        active.discard(key)
        return price(o)

    h = Harness(varied)
    keys = [f"k{i}" for i in range(12)]
    for n in range(5):
        for key in keys:
            h.publish(order(key, n=n))
    stats = await h.drain()
    assert 1 < peak <= 8
    assert all(started[k] == list(range(5)) for k in keys)
    written: dict[str, list[int]] = defaultdict(list)
    for v in h.values():
        written[v["order_id"]].append(v["n"])
    assert written == {k: list(range(5)) for k in keys}
    assert_accounted(stats, 60)


async def test_concurrent_commit_never_passes_an_unfinished_record() -> None:
    slow, fast = keys_with_partitions(same=True)
    release = asyncio.Event()

    @stage(input=ORDER, output=PRICED, concurrency=4)
    async def blocking(o: dict[str, Any]) -> dict[str, Any]:
        if o["order_id"] == slow.decode():
            await release.wait()
        return price(o)

    h = Harness(blocking)
    first = h.publish(order(slow.decode()))
    for n in range(5):
        h.publish(order(fast.decode(), n=n))
    stop = asyncio.Event()
    task = asyncio.create_task(h.worker.run(stop))
    # every record behind the blocked one is done and durable:
    await until(lambda: len(h.outputs()) == 5, "the outputs of the fast key")
    await asyncio.sleep(0.02)  # several flush intervals
    assert h.broker.committed("p.blocking", "p.in").get(first.partition, 0) <= first.offset
    release.set()
    await until(lambda: not h.broker.lag("p.blocking", "p.in"), "a drained input")
    stop.set()
    await task
    assert h.broker.committed("p.blocking", "p.in")[first.partition] == first.offset + 6
    committed = [c[TopicPartition("p.in", first.partition)] for c in h.transport.commits]
    assert committed == sorted(committed)


class MovesPartitionZero(MemoryTransport):
    """Moves partition 0 to another member during the worker's ``fetch`` number ``AT``.

    ``STALE``: after the records are taken, so the batch arrives for a partition just lost.
    """

    AT = 2
    STALE = False
    fetches = 0

    async def fetch(self, timeout_ms: int, max_records: int) -> Any:
        self.fetches += 1
        move = self.fetches == self.AT
        if move and not self.STALE:
            await self.rebalance([1, 2])
        batch = await super().fetch(timeout_ms, max_records)
        if move and self.STALE:
            await self.rebalance([1, 2])
        return batch


class MovesZeroWithAStaleBatch(MovesPartitionZero):
    AT = 1
    STALE = True


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize(
    ("transport", "kept"),
    [(MovesPartitionZero, 4), (MovesZeroWithAStaleBatch, 0)],
    ids=["revoked-in-flight", "revoked-stale-batch"],
)
async def test_revoked_partition_is_finished_committed_then_left_alone(
    concurrency: int, transport: type[MemoryTransport], kept: int
) -> None:
    async def aprice(o: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.0005)
        return price(o)

    small = Batching(max_records=4, fetch_wait_ms=5, flush_interval_ms=2)
    s = stage("aprice", input=ORDER, output=PRICED, concurrency=concurrency)(aprice)
    h = Harness(s, transport_type=transport, batching=small)
    for i in range(60):
        h.publish(order(f"o-{i}", n=i))
    stats = await h.drain_partitions([1, 2])  # a commit of a lost partition would raise
    committed = h.broker.committed("p.aprice", "p.in")
    assert committed.get(0, 0) == kept  # the 4 records of the first batch, if not stale
    src = {(r.partition, r.offset): r for r in h.broker.records("p.in")}
    done = {(v["order_id"], v["n"]) for v in h.values()}
    for (partition, offset), rec in src.items():
        v = h.codec_in.decode(rec.value or b"")
        expected = partition != 0 or offset < kept  # nothing of partition 0 after the move
        assert ((v["order_id"], v["n"]) in done) == expected, (partition, offset)
    assert stats.consumed == len(src) - h.broker.end_offsets("p.in")[0] + kept


class CommitAudit(MemoryTransport):
    """Checks, at each commit, that every committed input has a durable output or dead letter."""

    async def flush(self) -> None:
        await super().flush()
        self.visible = {
            r.header(ID_HEADER)
            for topic in ("p.audited", "p.audited.dlq")
            for r in self.broker.records(topic)
        }

    async def commit(self, offsets: Any, state: Any, metadata: Any = None) -> set[int]:
        await self.flush()
        for partition, offset in offsets.items():
            for rec in self.broker.records(self.input_topic, partition)[:offset]:
                assert rec.header(ID_HEADER) in self.visible, f"commit {offset} passes {rec}"
        return await super().commit(offsets, state, metadata)


@pytest.mark.parametrize("mode", ["sync", "async", "async-concurrent"])
async def test_commits_only_cover_records_whose_outputs_are_durable(mode: str) -> None:
    async def apass(o: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.0002 * (o["n"] % 3))
        return price(o)

    if mode == "sync":
        s = stage("audited", input=ORDER, output=PRICED)(price.fn)
    else:
        concurrency = 4 if mode == "async-concurrent" else 1
        s = stage("audited", input=ORDER, output=PRICED, concurrency=concurrency)(apass)
    small = Batching(max_records=7, fetch_wait_ms=5, flush_interval_ms=1)
    h = Harness(s, transport_type=CommitAudit, batching=small)
    for i in range(50):
        if i % 9 == 4:
            h.publish_raw(f"o-{i % 5}".encode(), b"poison")
        else:
            h.publish(order(f"o-{i % 5}", n=i))
    stats = await h.drain()
    assert_accounted(stats, 50)
    assert len(h.transport.commits) > 1


# -- poison records, retries, dead letters ---------------------------------------------


def _assert_dead_letter(
    h: Harness, rec: MemoryRecord, src: MemoryRecord, error: str, attempts: int
) -> None:
    assert (rec.key, rec.value) == (src.key, src.value)  # original bytes, untouched
    assert rec.header(dlq.STAGE) == h.node.name.encode()
    assert rec.header(dlq.ERROR_CLASS) == error.encode()
    assert rec.header(dlq.ATTEMPTS) == str(attempts).encode()
    assert rec.header(dlq.TOPIC) == src.topic.encode()
    assert rec.header(dlq.PARTITION) == str(src.partition).encode()
    assert rec.header(dlq.OFFSET) == str(src.offset).encode()
    assert rec.header(dlq.ERROR_MESSAGE)
    assert rec.header(SEQ_HEADER) == src.header(SEQ_HEADER)  # original headers kept
    assert rec.partition == partition_for(src.key or b"", PARTS)


async def test_undecodable_bytes_go_to_the_dead_letter_topic_untouched() -> None:
    h = Harness(price)
    good = h.codec_in.encode(order("o-1"))
    other = SchemaStore()
    foreign = other.codec(other.add('{"type": "record", "name": "X", "fields": []}').name)
    poison = {
        "truncated": good[:-3],
        "wrong magic": b"\x00\x01" + good[2:],
        "unknown fingerprint": foreign.encode({}),
        "too short": MAGIC + b"\x01",
    }
    sources = {why: h.publish_raw(b"o-1", data) for why, data in poison.items()}
    h.publish(order("o-2"))
    stats = await h.drain()
    dead = {r.header(dlq.OFFSET): r for r in h.dead()}
    assert len(dead) == len(poison)
    for src in sources.values():
        rec = dead[str(src.offset).encode()]
        _assert_dead_letter(h, rec, src, "DecodeError", 0)
    assert [v["order_id"] for v in h.values()] == ["o-2"]
    assert stats.dead_by_error == {"DecodeError": 4}
    assert_accounted(stats, 5)


async def test_always_failing_function_is_retried_with_growing_backoff_then_dead_lettered() -> None:
    calls = 0

    @stage(
        "price",
        input=ORDER,
        output=PRICED,
        retry=RetryPolicy(max_attempts=4, initial_backoff=0.1, multiplier=2, jitter=0),
    )
    def broken(o: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise ValueError(f"no price for {o['order_id']}")

    h = Harness(broken)
    src = h.publish(order("o-1"))
    stats = await h.drain()
    assert calls == 4
    assert h.sleep.waits == pytest.approx([0.1, 0.2, 0.4])
    [rec] = h.dead()
    _assert_dead_letter(h, rec, src, "ValueError", 4)
    assert rec.header(dlq.ERROR_MESSAGE) == b"no price for o-1"
    assert b"ValueError" in (rec.header(dlq.TRACEBACK) or b"")
    assert (stats.retries, stats.dead_letters, stats.produced) == (3, 1, 0)
    assert_accounted(stats, 1)


async def test_default_jitter_still_grows_the_backoff() -> None:
    @stage(input=ORDER, output=PRICED, retry=RetryPolicy(max_attempts=5))
    def broken(o: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("down")

    h = Harness(broken)
    h.publish(order("o-1"))
    await h.drain()
    waits = h.sleep.waits
    assert len(waits) == 4
    assert all(a < b for a, b in itertools.pairwise(waits)), waits


@pytest.mark.parametrize("mode", ["sync", "async", "async-concurrent"])
async def test_function_failing_twice_then_succeeding_reaches_the_output(mode: str) -> None:
    attempts: dict[str, int] = defaultdict(int)

    def flaky(o: dict[str, Any]) -> dict[str, Any]:
        attempts[o["order_id"]] += 1
        if attempts[o["order_id"]] <= 2:
            raise ConnectionError("try again")
        return price(o)

    async def aflaky(o: dict[str, Any]) -> dict[str, Any]:
        return flaky(o)

    if mode == "sync":
        s = stage("flaky", input=ORDER, output=PRICED)(flaky)
    else:
        concurrency = 4 if mode == "async-concurrent" else 1
        s = stage("flaky", input=ORDER, output=PRICED, concurrency=concurrency)(aflaky)
    h = Harness(s)
    h.publish(order("o-1"))
    stats = await h.drain()
    assert [v["order_id"] for v in h.values()] == ["o-1"]
    assert attempts["o-1"] == 3
    assert (stats.retries, stats.dead_letters, stats.processed) == (2, 0, 1)
    assert len(h.sleep.waits) == 2
    assert h.dead() == []


async def test_non_retriable_stage_error_is_dead_lettered_after_one_attempt() -> None:
    calls = 0

    @stage(input=ORDER, output=PRICED)
    def strict(o: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise StageError("order is cancelled", retriable=False)

    h = Harness(strict)
    src = h.publish(order("o-1"))
    stats = await h.drain()
    assert calls == 1
    assert h.sleep.waits == []
    [rec] = h.dead()
    _assert_dead_letter(h, rec, src, "StageError", 1)
    assert (stats.retries, stats.dead_letters) == (0, 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"order_id": 5, "n": 1, "total": 1.0},  # wrong type
        {"order_id": "o-1", "total": 1.0},  # missing field
        [{"order_id": "o-1", "n": 1, "total": 1.0}, {"order_id": "o-1"}],  # one bad part
    ],
    ids=["wrong-type", "missing-field", "flat-map-one-bad-part"],
)
async def test_value_breaking_the_output_schema_is_dead_lettered(bad: Any) -> None:
    @stage(input=ORDER, output=PRICED)
    def wrong(o: dict[str, Any]) -> Any:
        return bad if o["order_id"] == "o-1" else price(o)

    h = Harness(wrong)
    src = h.publish(order("o-1"))
    h.publish(order("o-2"))
    stats = await h.drain()
    [rec] = h.dead()
    _assert_dead_letter(h, rec, src, "EncodeError", 1)
    assert [v["order_id"] for v in h.values()] == ["o-2"]  # nothing of o-1: all or nothing
    assert stats.dead_by_error == {"EncodeError": 1}
    assert_accounted(stats, 2)


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_every_input_is_accounted_for(concurrency: int) -> None:
    async def mixed(o: dict[str, Any]) -> Any:
        kind = o["n"] % 5
        if kind == 0:
            return None  # filtered
        if kind == 1:
            raise StageError("bad", retriable=False)  # dead letter
        if kind == 2:
            return {"order_id": o["order_id"]}  # breaks the output schema
        if kind == 3:
            return [price(o), price(o)]  # two outputs
        return price(o)

    h = Harness(stage("mixed", input=ORDER, output=PRICED, concurrency=concurrency)(mixed))
    for i in range(40):
        h.publish(order(f"o-{i % 7}", n=i))
    h.publish_raw(b"o-x", b"garbage")
    stats = await h.drain()
    assert_accounted(stats, 41)
    assert (stats.filtered, stats.dead_letters, stats.processed) == (8, 17, 16)
    assert stats.produced == len(h.outputs()) == 24
    assert len(h.dead()) == stats.dead_letters


async def test_a_new_worker_of_the_group_resumes_from_the_committed_offsets() -> None:
    h = Harness(price)
    for i in range(4):
        h.publish(order(f"o-{i}"))
    await h.drain()
    for i in range(4, 6):
        h.publish(order(f"o-{i}"))
    again = Harness(price, broker=h.broker)
    stats = await again.drain()
    assert stats.consumed == 2
    assert sorted(v["order_id"] for v in again.values()) == [f"o-{i}" for i in range(6)]


# -- framework bugs, pinned as strict xfails ---------------------------------------------


async def test_generator_stage_that_raises_is_dead_lettered_not_fatal() -> None:
    @stage(input=ORDER, output=LINE)
    def explode(o: dict[str, Any]) -> Iterable[dict[str, Any]]:
        yield {"order_id": o["order_id"], "sku": "a", "qty": 1}
        raise ValueError("half-way")

    h = Harness(explode)
    h.publish(order("o-1"))
    stats = await h.drain()
    assert stats.dead_letters == 1
    assert h.outputs() == []


async def test_retry_sees_the_original_value() -> None:
    failed = False

    @stage(input=ORDER, output=PRICED)
    def bump_then_fail_once(o: dict[str, Any]) -> dict[str, Any]:
        nonlocal failed
        o["n"] += 1
        if not failed:
            failed = True
            raise ConnectionError("transient")
        return price(o)

    h = Harness(bump_then_fail_once)
    h.publish(order("o-1", n=1))
    await h.drain()
    assert [v["n"] for v in h.values()] == [2]


async def test_null_value_is_dead_lettered() -> None:
    h = Harness(price)
    src = h.publish_raw(b"o-1", None)
    h.publish(order("o-2"))
    stats = await h.drain()
    [rec] = h.dead()
    _assert_dead_letter(h, rec, src, "DecodeError", 0)
    assert_accounted(stats, 2)


class FlushFailsOnce(MemoryTransport):
    """A transport whose second flush fails, as a broker timeout would."""

    failed = False

    async def flush(self) -> None:
        if self.flushes == 1 and not self.failed:
            self.failed = True
            self._pending = []  # the batch is lost with the failed send
            raise BrokerError("writing records: timed out", retriable=True)
        await super().flush()


async def test_a_flush_failing_with_concurrency_starts_the_partitions_over() -> None:
    """A retriable broker error out of a flush (a broker timeout) does not stop the worker:
    it reads its partitions again from the committed offsets; no record goes missing."""

    @stage(input=ORDER, output=PRICED, concurrency=4)
    async def aprice(o: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.001)
        return price(o)

    h = Harness(aprice, transport_type=FlushFailsOnce)
    for i in range(30):
        h.publish(order(f"o-{i}"))
    stats = await h.drain()
    assert h.transport.failed and stats.recoveries == 1
    priced = {r.key for r in h.broker.records(h.node.output_topic)}
    assert priced == {f"o-{i}".encode() for i in range(30)}


# -- the memory transport itself --------------------------------------------------------


async def noop_callback(_: set[Any]) -> None:
    return None


@pytest.fixture
async def memory() -> AsyncIterator[tuple[MemoryBroker, MemoryTransport, list[str]]]:
    broker = MemoryBroker(clock=lambda: 7)
    broker.create_topic("in", 2)
    broker.create_topic("out", 2)
    events: list[str] = []

    async def revoked(tps: set[Any]) -> None:
        events.append(f"revoked {sorted(tp.partition for tp in tps)}")

    async def assigned(tps: set[Any]) -> None:
        events.append(f"assigned {sorted(tp.partition for tp in tps)}")

    transport = MemoryTransport(broker, group="g", input_topic="in")
    await transport.start(revoked, assigned)
    yield broker, transport, events
    await transport.stop()


async def test_memory_fetch_is_partition_ordered_bounded_and_resumes(
    memory: tuple[MemoryBroker, MemoryTransport, list[str]],
) -> None:
    broker, transport, events = memory
    assert events == ["assigned [0, 1]"]
    for i in range(3):
        for p in (1, 0):
            broker.produce("in", b"k", str(i).encode(), partition=p)
    first = await transport.fetch(100, 4)
    assert [(tp.partition, [m.offset for m in ms]) for tp, ms in first.items()] == [
        (0, [0, 1, 2]),
        (1, [0]),
    ]
    assert all(isinstance(tp, TopicPartition) for tp in first)
    rest = await transport.fetch(100, 10)
    assert {tp.partition: [m.offset for m in ms] for tp, ms in rest.items()} == {1: [1, 2]}
    assert await transport.fetch(0, 10) == {}
    await transport.commit({0: 3, 1: 1}, {})
    resumed = MemoryTransport(broker, group="g", input_topic="in")
    await resumed.start(noop_callback, noop_callback)
    again = await resumed.fetch(100, 10)
    assert {tp.partition: [m.offset for m in ms] for tp, ms in again.items()} == {1: [1, 2]}


async def test_memory_append_is_invisible_until_flush(
    memory: tuple[MemoryBroker, MemoryTransport, list[str]],
) -> None:
    broker, transport, _ = memory
    with pytest.raises(TopicError, match="prepare_topic"):
        transport.append("out", 0, b"k", b"v", [], None)
    assert await transport.prepare_topic("out") == 2
    transport.append("out", transport.partition_for("out", b"k"), b"k", b"v", [("h", b"1")], None)
    assert broker.records("out") == []
    await transport.flush()
    [rec] = broker.records("out")
    assert (rec.key, rec.value, rec.headers, rec.timestamp) == (b"k", b"v", (("h", b"1"),), 7)
    assert rec.partition == partition_for(b"k", 2)


async def test_memory_refuses_what_only_a_bug_would_do(
    memory: tuple[MemoryBroker, MemoryTransport, list[str]],
) -> None:
    broker, transport, _ = memory
    broker.produce("in", b"k", b"v", partition=0)
    with pytest.raises(BrokerError, match="its end is 1"):
        await transport.commit({0: 2}, {})
    with pytest.raises(BrokerError, match="not assigned"):
        await transport.commit({5: 0}, {})
    with pytest.raises(TopicError, match="does not exist"):
        await transport.prepare_topic("nope")
    with pytest.raises(TopicError, match="cannot have 3 partitions: it exists with 2"):
        broker.create_topic("in", 3)


async def test_memory_rebalance_revokes_then_assigns_from_the_commits(
    memory: tuple[MemoryBroker, MemoryTransport, list[str]],
) -> None:
    broker, transport, events = memory
    for p in (0, 1):
        broker.produce("in", b"k", b"v", partition=p)
        broker.produce("in", b"k", b"v", partition=p)
    await transport.fetch(100, 10)
    await transport.commit({1: 1}, {})
    await transport.rebalance([1])
    assert events == ["assigned [0, 1]", "revoked [0, 1]", "assigned [1]"]
    assert transport.assignment() == {TopicPartition("in", 1)}
    batch = await transport.fetch(100, 10)
    assert [(tp.partition, [m.offset for m in ms]) for tp, ms in batch.items()] == [(1, [1])]


async def test_worker_stops_promptly_on_an_idle_input() -> None:
    h = Harness(price)
    stop = asyncio.Event()
    task = asyncio.create_task(h.worker.run(stop))
    await asyncio.sleep(0.01)
    stop.set()
    async with asyncio.timeout(0.5):
        stats = await task
    assert stats.consumed == 0
