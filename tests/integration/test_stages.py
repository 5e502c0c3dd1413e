"""The reusable stages on the real broker: each one in a real stage worker on Kafka."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline import Pipeline, Publisher, RetryPolicy, SchemaStore, TopicPolicy
from pipeline.record import ID_HEADER, SEQ_HEADER, encode_seq
from pipeline.runtime.runner import RunOptions, run_stages
from pipeline.runtime.stats import StageStats
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.runtime.transport import Batching
from pipeline.testing import Names
from stages import (
    ROUTE_HEADER,
    Rule,
    branch,
    http_post,
    map_stage,
    route,
    throttle,
    tumbling_window,
    validate,
)
from stages.testing import HttpStub, StubReply, StubRequest
from tests.integration.apps import stages_app
from tests.integration.helpers import StageProcess, read_all, seq_of, wait_for_count

SCHEMAS = SchemaStore.from_directory(stages_app.SCHEMAS)
ORDER, EVENT, COUNT = "stages.test.Order", "stages.test.Event", "stages.test.Count"
CUSTOMER, ENRICHED = "stages.test.Customer", "stages.test.CustomerOrder"
OPTIONS = RunOptions(
    batching=Batching(fetch_wait_ms=50, flush_interval_ms=10),
    stats_interval=0.1,
    shutdown_timeout=20,
)


class Running:
    """Stages of a pipeline running in this process (as ``pipeline run`` runs them)."""

    def __init__(self, bootstrap: str, pipeline: Pipeline, stages: list[str]) -> None:
        self.stats: dict[str, StageStats] = {}
        self._stop = asyncio.Event()
        self._run = run_stages(
            pipeline, stages, bootstrap, options=OPTIONS, stop=self._stop,
            on_stats=lambda stats: self.stats.update((s.stage, s) for s in stats),
        )  # fmt: skip
        self._task: asyncio.Task[list[StageStats]] | None = None

    async def __aenter__(self) -> Running:
        self._task = asyncio.create_task(self._run)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        self._stop.set()
        final = await asyncio.wait_for(self._task, 60)
        self.stats.update((s.stage, s) for s in final)

    async def until(self, done: Callable[[dict[str, StageStats]], bool], within: float) -> None:
        deadline = time.monotonic() + within
        while not done(self.stats):
            assert self._task is not None
            if self._task.done():
                self._task.result()  # a worker failed: show why
            assert time.monotonic() < deadline, f"timed out; stats: {self.stats}"
            await asyncio.sleep(0.1)


def headers_of(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


def decode(schema: str, records: list[Any]) -> list[dict[str, Any]]:
    codec = SCHEMAS.codec(schema)
    return [codec.decode(r.value) for r in records]


async def create_topic(bootstrap: str, name: str, partitions: int, **config: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config)])
    finally:
        await admin.close()


# -- validate, map, route and a per-route branch --------------------------------------------


async def test_validate_map_route_and_a_branch(kafka_bootstrap: str, names: Names) -> None:
    name = names.pipeline("vmr")
    positive = Rule("total is positive", lambda o: o["total"] > 0)
    regions = {
        "eu": lambda o: o["country"] in {"DE", "FR"},
        "us": lambda o: o["country"] == "US",
    }
    main = (
        Pipeline(name, source=f"{name}.in", key="id", schemas=SCHEMAS, topics=TopicPolicy(3))
        | validate("check", schema=ORDER, rules=[positive])
        | map_stage("tax", lambda o: {**o, "total": o["total"] * 2}, input=ORDER, output=ORDER)
        | route("region", schema=ORDER, routes=regions, default="rest")
    )
    eu = branch(main, "region", "eu")
    countries = ["DE", "US", "FR", "JP"]
    orders = [
        {"id": f"o{i}", "country": countries[i % 4], "total": float(i - 4)} for i in range(40)
    ]
    async with (
        Running(kafka_bootstrap, main, ["check", "tax", "region"]) as running,
        Running(kafka_bootstrap, eu, ["take"]) as side,
    ):
        async with Publisher(kafka_bootstrap, main.source, SCHEMAS.codec(ORDER), "id") as pub:
            await pub.publish_many(orders)
        await running.until(lambda s: s.get("region", StageStats("")).consumed == 35, 60)
        await side.until(lambda s: s.get("take", StageStats("")).consumed == 35, 60)
    check, region, take = running.stats["check"], running.stats["region"], side.stats["take"]
    assert (check.consumed, check.processed, check.dead_letters) == (40, 35, 5)
    assert check.dead_by_error == Counter({"ValidationFailed": 5})
    dead = await read_all(kafka_bootstrap, f"{name}.check.dlq")
    assert sorted(v["id"] for v in decode(ORDER, dead)) == [f"o{i}" for i in range(5)]
    for r in dead:
        h = headers_of(r)
        assert h["dlq.error.class"] == b"ValidationFailed"
        assert b"failed 1 rule(s): total is positive" in h["dlq.error.message"]
    tagged = await read_all(kafka_bootstrap, f"{name}.region")
    routes = {
        v["id"]: headers_of(r)[ROUTE_HEADER]
        for v, r in zip(decode(ORDER, tagged), tagged, strict=True)
    }
    expected = {o["id"]: {"DE": b"eu", "FR": b"eu", "US": b"us"}.get(o["country"], b"rest")
                for o in orders[5:]}  # fmt: skip
    assert routes == expected and region.dead_letters == 0
    # The branch wrote the per-route topic: only EU orders, doubled, keys and seqs kept.
    eu_records = await read_all(kafka_bootstrap, f"{name}.region.eu")
    eu_values = decode(ORDER, eu_records)
    assert sorted(v["id"] for v in eu_values) == sorted(
        k for k, t in expected.items() if t == b"eu"
    )
    assert all(v["total"] == 2 * (int(v["id"][1:]) - 4) for v in eu_values)
    source = {r.key: seq_of(r) for r in await read_all(kafka_bootstrap, main.source)}
    assert all(seq_of(r) == source[r.key] for r in eu_records)
    assert (take.processed, take.filtered) == (len(eu_records), 35 - len(eu_records))


# -- enrich from a real compacted topic, in a `pipeline run` process -------------------------


async def test_enrich_from_a_compacted_topic(
    kafka_bootstrap: str, names: Names, tmp_path: Path
) -> None:
    name = names.pipeline("enrich")
    table = f"{name}.customers"
    await create_topic(
        kafka_bootstrap, table, 3, **{"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
    )
    codec = SCHEMAS.codec(CUSTOMER)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()

    async def upsert(cid: str, tier: str | None) -> None:
        value = (
            None if tier is None else codec.encode({"id": cid, "name": cid.upper(), "tier": tier})
        )
        await producer.send_and_wait(table, value, key=cid.encode())

    env = {"STAGES_PIPELINE": name, "STAGES_BOOTSTRAP": kafka_bootstrap, "STAGES_TABLE": table}
    proc = None
    try:
        for i in range(10):
            await upsert(f"c{i}", "basic")
        await upsert("c1", "silver")  # the latest value of a key wins
        await upsert("c1", "gold")
        await upsert("c9", None)  # a tombstone: c9 is gone
        p = stages_app.build(name)
        await ensure_topics(kafka_bootstrap, topic_specs(p))
        proc = StageProcess(
            "tests.integration.apps.stages_app:build", "customer", kafka_bootstrap, env,
            tmp_path / "customer.log",
        )  # fmt: skip
        orders = [{"id": f"o{i}", "customer_id": f"c{i}", "total": 1.0} for i in range(10)]
        orders.append({"id": "o-stranger", "customer_id": "c404", "total": 1.0})
        async with Publisher(kafka_bootstrap, p.source, SCHEMAS.codec(ORDER), "id") as pub:
            await pub.publish_many(orders)
            await pub.flush()
            out = f"{name}.customer"
            assert await wait_for_count(kafka_bootstrap, out, 9, within=60) == 9, proc.output()
            enriched = {v["id"]: v for v in decode(ENRICHED, await read_all(kafka_bootstrap, out))}
            assert {k: (v["tier"], v["customer_name"]) for k, v in enriched.items()} == {
                f"o{i}": ("gold" if i == 1 else "basic", f"C{i}") for i in range(9)
            }
            # The table follows its topic: an update reaches the next lookups.
            await upsert("c2", "platinum")
            deadline, tier, attempt = time.monotonic() + 30, None, 0
            while tier != "platinum" and time.monotonic() < deadline:
                attempt += 1
                await pub.publish({"id": f"again{attempt}", "customer_id": "c2", "total": 2.0})
                await pub.flush()
                await asyncio.sleep(0.5)
                later = decode(ENRICHED, await read_all(kafka_bootstrap, out))
                tier = next((v["tier"] for v in later if v["id"] == f"again{attempt}"), None)
            assert tier == "platinum", proc.output()[-2000:]
        dead = await read_all(kafka_bootstrap, f"{name}.customer.dlq")
        assert sorted(v["id"] for v in decode(ORDER, dead)) == ["o-stranger", "o9"]
        assert {headers_of(r)["dlq.error.class"] for r in dead} == {b"MissingEntry"}
    finally:
        await producer.stop()
        code = proc.terminate() if proc is not None else 0
    assert code == 0, proc.output()[-2000:] if proc else ""
    log = proc.output() if proc else ""
    assert f"table {table}: loaded 10 rows" not in log  # 9 rows: c9 was deleted
    assert f"table {table}: loaded 9 rows" in log and "Traceback" not in log


# -- tumbling windows: event time from record timestamps, state across a restart -------------


async def test_windows_close_on_later_records_and_survive_a_restart(
    kafka_bootstrap: str, names: Names
) -> None:
    name = names.pipeline("win")
    p = Pipeline(
        name, source=f"{name}.in", key="id", schemas=SCHEMAS, topics=TopicPolicy(1)
    ) | tumbling_window("per10s", size=10, input=EVENT, output=COUNT, sum_field="amount")
    base = (int(time.time() * 1000) // 10_000) * 10_000 - 600_000  # recent, on a boundary
    seqs: Counter[str] = Counter()
    codec = SCHEMAS.codec(EVENT)

    async def produce(*events: tuple[str, int, float]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for key, at, amount in events:
                seqs[key] += 1
                headers = [(SEQ_HEADER, encode_seq(seqs[key])), (ID_HEADER, uuid.uuid4().bytes)]
                value = codec.encode({"id": key, "n": at, "amount": amount})
                await producer.send_and_wait(
                    p.source, value, key=key.encode(), timestamp_ms=base + at, headers=headers
                )
        finally:
            await producer.stop()

    async with Running(kafka_bootstrap, p, ["per10s"]) as first:
        await produce(("a", 1_000, 1.0), ("b", 2_000, 2.0), ("a", 3_000, 3.0))
        await first.until(lambda s: s.get("per10s", StageStats("")).consumed == 3, 60)
    assert first.stats["per10s"].produced == 0  # the window is still open
    async with Running(kafka_bootstrap, p, ["per10s"]) as second:  # a fresh worker
        await produce(("a", 4_000, 4.0), ("c", 10_000, 5.0), ("b", 25_000, 6.0))
        await second.until(lambda s: s.get("per10s", StageStats("")).produced == 3, 60)
    stats = second.stats["per10s"]
    assert stats.restored > 0 and stats.consumed == 3
    got = decode(COUNT, await read_all(kafka_bootstrap, f"{name}.per10s"))
    assert [(v["key"], v["window_start"] - base, v["count"], v["sum"]) for v in got] == [
        ("a", 0, 3, 8.0),
        ("b", 0, 1, 2.0),
        ("c", 10_000, 1, 5.0),
    ]


# -- throttle: a real rate on the real clock -------------------------------------------------


async def test_throttle_paces_the_output(kafka_bootstrap: str, names: Names) -> None:
    name = names.pipeline("pace")
    p = Pipeline(
        name, source=f"{name}.in", key="id", schemas=SCHEMAS, topics=TopicPolicy(3)
    ) | throttle("pace", schema=EVENT, rate=40)
    # The broker stamps each output when it appends it: the spread shows the real pace.
    await create_topic(
        kafka_bootstrap, f"{name}.pace", 3, **{"message.timestamp.type": "LogAppendTime"}
    )
    await ensure_topics(kafka_bootstrap, topic_specs(p))
    async with Publisher(kafka_bootstrap, p.source, SCHEMAS.codec(EVENT), "id") as pub:
        await pub.publish_many({"id": f"k{i % 7}", "n": i} for i in range(60))
    async with Running(kafka_bootstrap, p, ["pace"]) as running:
        await running.until(lambda s: s.get("pace", StageStats("")).produced == 60, 60)
    out = await read_all(kafka_bootstrap, f"{name}.pace")
    assert sorted(v["n"] for v in decode(EVENT, out)) == list(range(60))
    stamps = sorted(r.timestamp for r in out)
    spread = (stamps[-1] - stamps[0]) / 1000
    assert 59 / 40 * 0.9 <= spread <= 59 / 40 + 2.0, spread  # 1 at once, then 40/s
    by_key = defaultdict(list)
    for v in decode(EVENT, out):
        by_key[v["id"]].append(v["n"])
    assert all(ns == sorted(ns) for ns in by_key.values())


# -- http_post: a local HTTP stub, key-ordered concurrency, retries, dead letters -------------


async def test_http_post_with_retries_and_dead_letters(kafka_bootstrap: str, names: Names) -> None:
    attempts: Counter[int] = Counter()
    in_flight: Counter[str] = Counter()
    overlap = {"keys": 0, "same_key": 0}

    async def endpoint(req: StubRequest) -> StubReply:
        n, key = req.json()["n"], req.json()["id"]
        attempts[n] += 1
        in_flight[key] += 1
        overlap["same_key"] = max(overlap["same_key"], in_flight[key])
        overlap["keys"] = max(overlap["keys"], sum(1 for c in in_flight.values() if c))
        await asyncio.sleep(0.005)
        in_flight[key] -= 1
        if n == 7:
            return StubReply(422, {"error": "unprocessable"})
        if n % 10 == 0 and attempts[n] == 1:
            return StubReply(503, {"error": "try later"})
        return StubReply(200, {"ok": True})

    name = names.pipeline("http")
    async with HttpStub(endpoint) as stub:
        p = Pipeline(
            name, source=f"{name}.in", key="id", schemas=SCHEMAS, topics=TopicPolicy(3)
        ) | http_post(
            "notify", stub.url("/events"), input=EVENT, concurrency=8,
            retry=RetryPolicy(max_attempts=3, initial_backoff=0.05, jitter=0),
        )  # fmt: skip
        await ensure_topics(kafka_bootstrap, topic_specs(p))
        async with Publisher(kafka_bootstrap, p.source, SCHEMAS.codec(EVENT), "id") as pub:
            await pub.publish_many({"id": f"k{i % 20}", "n": i} for i in range(200))
        async with Running(kafka_bootstrap, p, ["notify"]) as running:
            await running.until(lambda s: s.get("notify", StageStats("")).consumed == 200, 60)
    stats = running.stats["notify"]
    assert (stats.processed, stats.dead_letters, stats.retries) == (199, 1, 20)
    assert attempts == Counter({n: 2 if n % 10 == 0 else 1 for n in range(200)})
    per_key: dict[str, list[int]] = defaultdict(list)
    for r in stub.requests:
        per_key[r.json()["id"]].append(r.json()["n"])
    assert all(ns == sorted(ns) for ns in per_key.values())  # each key in order
    assert overlap["same_key"] == 1 and overlap["keys"] > 1  # concurrent across keys only
    [dead] = await read_all(kafka_bootstrap, f"{name}.notify.dlq")
    assert decode(EVENT, [dead])[0]["n"] == 7
    assert headers_of(dead)["dlq.error.class"] == b"HttpClientError"
    assert b"HTTP 422" in headers_of(dead)["dlq.error.message"]
