"""The dashboard without a broker: the graph of pipelines (branches, lanes, jobs), the counts
over time, page cursors, stage health, and the web application's guards (token, origin,
loopback host, JSON only) through aiohttp's test client."""

from __future__ import annotations

import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from examples.orders.pipeline import STAGES, build
from pipeline import DedupPolicy, Pipeline, Priority, SchemaStore, stage
from pipeline.dlq import DeadLetterRecord, Where
from pipeline.ops.status import Member, StageStatus
from pipeline.ui import Dashboard, UiOptions, graph
from pipeline.ui.counts import DlqIndex, TopicCounts
from pipeline.ui.pages import PageQuery
from pipeline.ui.server import TOKEN_COOKIE, TOKEN_HEADER, health_of
from stages import MemoryTable, branch, route

STORE = SchemaStore()
FIELDS = [{"name": "id", "type": "string"}, {"name": "country", "type": "string"}]
STORE.add({"type": "record", "name": "t.Order", "fields": FIELDS})


@stage(input="t.Order", output="t.Order")
def check(order: dict[str, Any]) -> dict[str, Any]:
    return order


@stage(input="t.Order", output=None, dedup=DedupPolicy.off())
def sink(order: dict[str, Any]) -> None:
    return None


def orders() -> Pipeline:
    return build("shop", customers=MemoryTable({}))


def test_the_orders_graph_has_its_five_stages_and_their_topics() -> None:
    g = graph([orders()])
    stages = [n for n in g["nodes"] if n["kind"] == "stage"]
    assert [n["label"] for n in stages] == list(STAGES)
    kinds = {n["id"]: n["kind"] for n in g["nodes"]}
    assert kinds["t:shop.placed"] == "source" and kinds["t:shop.outbox"] == "sink"
    assert kinds["t:shop.validate"] == "topic" and kinds["t:shop.validate.dlq"] == "dlq"
    assert kinds["t:shop.validate.state"] == "state"
    edges = {(e["from"], e["to"], e["kind"]) for e in g["edges"]}
    assert ("t:shop.placed", "s:shop/validate", "data") in edges
    assert ("s:shop/validate", "t:shop.validate", "data") in edges
    assert ("t:shop.validate", "s:shop/enrich", "data") in edges
    assert ("s:shop/notify", "t:shop.outbox", "data") in edges
    assert ("s:shop/price", "t:shop.price.dlq", "dlq") in edges
    assert not any(n["kind"] == "jobs" for n in g["nodes"])
    tracked = graph([orders().with_jobs()])
    assert sum(e["kind"] == "jobs" for e in tracked["edges"]) == 5


def test_branches_join_the_main_pipeline_at_its_topic_and_lanes_are_stages() -> None:
    regions = route("region", schema="t.Order", routes={"eu": lambda o: o["country"] == "DE"})
    main = Pipeline("m", source="m.in", key="id", schemas=STORE) | regions
    eu = branch(main, "region", "eu") | sink
    g = graph([main, eu])
    ids = [n["id"] for n in g["nodes"]]
    assert ids.count("t:m.region") == 1  # one node, written by main, read by the branch
    kinds = {n["id"]: n["kind"] for n in g["nodes"]}
    assert kinds["t:m.region"] == "topic"  # not a sink any more: the branch reads it
    assert not any(n["id"].endswith("sink.state") for n in g["nodes"])  # dedup off: no state
    lanes = Pipeline("l", source=Priority({"l.hi": 8, "l.lo": 1}), key="id", schemas=STORE) | check
    labels = sorted(n["label"] for n in graph([lanes])["nodes"] if n["kind"] == "stage")
    assert labels == ["check[l.hi]", "check[l.lo]"]


def test_counts_over_time_fall_in_at_most_the_buckets_asked() -> None:
    counts = TopicCounts("t.dlq")
    base = 1_700_000_000_000

    class R:
        def __init__(self, cls: bytes, at: int) -> None:
            self.headers = [("dlq.error.class", cls)]
            self.timestamp = at

    records = [R(b"A", base + i * 1000) for i in range(600)]  # 10 minutes, one a second
    records += [R(b"B", base + 300_000)]
    DlqIndex._add(counts, records)  # type: ignore[arg-type]
    DlqIndex._add_receipts(counts, [type("Receipt", (), {"headers": [("dlq.receipt", b"1@5")]})])
    summary = counts.summary(buckets=30)
    assert summary["total"] == 601 and summary["by_class"] == {"A": 600, "B": 1}
    assert summary["replayed"] == 1 and (1 << 40 | 5) in counts.replayed
    series = summary["series"]
    assert len(series) <= 30
    assert sum(sum(b["by_class"].values()) for b in series) == 601
    assert series[0]["start_ms"] <= base and series[0]["seconds"] == 20
    assert sum(b["by_class"].get("B", 0) for b in series) == 1


def test_page_cursors_and_the_one_record_filter() -> None:
    assert PageQuery.parse_cursor("") is None
    assert PageQuery.parse_cursor("0:120,2:7") == {0: 120, 2: 7}
    assert PageQuery.format_cursor({2: 7, 0: 120}) == "0:120,2:7"
    try:
        PageQuery.parse_cursor("zero")
    except Exception as exc:
        assert "PARTITION:OFFSET" in str(exc)
    else:
        raise AssertionError("a bad cursor was accepted")
    one = Where.parse(["at=1@5"])
    assert one.matches(DeadLetterRecord(1, 5, b"k", b"v"))
    assert not one.matches(DeadLetterRecord(1, 6, b"k", b"v"))
    assert not one.matches(DeadLetterRecord(0, 5, b"k", b"v"))


def test_health_words() -> None:
    status = StageStatus("s", "p.s", "Stable")
    assert health_of(status) == "stopped"
    status.members = [Member("c", "h", [0], url="http://x", health="ok", ready=True)]
    assert health_of(status) == "running"
    status.group_state = "PreparingRebalance"
    assert health_of(status) == "rebalancing"
    status.members.append(Member("d", "h", [1], url="http://y", health="no answer"))
    assert health_of(status) == "failing"


async def client_of(dashboard: Dashboard) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(dashboard.app(), host="127.0.0.1"))
    await client.start_server()
    return client


async def test_pages_render_and_the_token_unlocks_replays_only_from_the_same_origin() -> None:
    dashboard = Dashboard("127.0.0.1:1", [orders()], UiOptions(port=0, token="s3cret"))
    client = await client_of(dashboard)
    try:
        page = await client.get("/")
        html = await page.text()
        assert page.status == 200 and "read-only" in html and "/static/vendor/dagre.min.js" in html
        assert "https://" not in html  # every asset is served here
        dagre = await client.get("/static/vendor/dagre.min.js")
        assert dagre.status == 200 and len(await dagre.read()) > 10_000
        topo = await (await client.get("/api/topology")).json()
        assert len([n for n in topo["nodes"] if n["kind"] == "stage"]) == 5
        dlq_page = await client.get("/dlq/validate")
        assert dlq_page.status == 200 and "shop.validate.dlq" in await dlq_page.text()
        missing = await client.get("/dlq/nope")
        assert missing.status == 404 and "validate" in (await missing.json())["error"]

        wrong = await client.get("/?token=guess", allow_redirects=False)
        assert wrong.status == 403
        opened = await client.get("/?token=s3cret", allow_redirects=False)
        assert opened.status == 303 and opened.headers["Location"] == "/"
        cookie = opened.cookies[TOKEN_COOKIE]
        assert cookie.value == "s3cret" and cookie["samesite"] == "Strict"
        unlocked = await client.get("/", cookies={TOKEN_COOKIE: "s3cret"})
        assert "replay enabled" in await unlocked.text()

        url = "/api/dlq/validate/replay"
        body = {"where": {"error_class": "InvalidOrderError"}}
        refused = await client.post(url, json=body)
        assert refused.status == 403 and TOKEN_HEADER in (await refused.json())["error"]
        cross = await client.post(
            url, json=body, headers={TOKEN_HEADER: "s3cret", "Origin": "http://evil.example"}
        )
        assert cross.status == 403 and "cross-site" in (await cross.json())["error"]
        form = await client.post(url, data="where=x", headers={TOKEN_HEADER: "s3cret",
                                 "Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        assert form.status == 403 and "JSON" in (await form.json())["error"]
        bad = await client.post(url, json={"where": {"colour": "red"}},
                                headers={TOKEN_HEADER: "s3cret"})  # fmt: skip
        assert bad.status == 400 and "unknown field 'colour'" in (await bad.json())["error"]

        odd = await client.post(url, json=body, headers={TOKEN_HEADER: "s3crét"})
        assert odd.status == 403  # a non-ASCII token is refused, not a server error
        assert (await client.get("/api/dlq/validate/records?limit=many")).status == 400
        rebound = await client.get("/api/topology", headers={"Host": "attacker.example:8642"})
        assert rebound.status == 421
        jobs = await client.get("/api/jobs/j-1")
        assert jobs.status == 404 and "with_jobs" in (await jobs.json())["error"]
        assert (await client.get("/api/replays/nope")).status == 404
    finally:
        await client.close()


async def test_the_live_stream_sends_each_new_snapshot() -> None:
    dashboard = Dashboard("127.0.0.1:1", [orders()], UiOptions(port=0))
    client = await client_of(dashboard)
    try:
        response = await client.get("/api/events")
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = await response.content.readuntil(b"\n\n")
        assert b'"error":"starting"' in first
        started = time.monotonic()
        await dashboard._publish({"at": 1, "stages": {"s:shop/validate": {}}, "error": None})
        second = await response.content.readuntil(b"\n\n")
        assert b"s:shop/validate" in second and time.monotonic() - started < 1
        response.close()
    finally:
        await client.close()
