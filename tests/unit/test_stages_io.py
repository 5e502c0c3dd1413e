"""stages.io and stages.http against a local HTTP stub: ordering, retries, dead letters."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline import ConfigError, DefinitionError, Pipeline, RetryPolicy, SchemaStore
from pipeline.testing import TestDriver
from stages import (
    HttpClient,
    HttpClientError,
    HttpServerError,
    HttpUnavailable,
    RateLimiter,
    http_post,
)
from stages.testing import HttpStub, SimulatedClock, StubReply, StubRequest

SCHEMAS = SchemaStore.from_directory(Path(__file__).parent / "schemas_stages")
EVENT, RECEIPT = "stages.test.Event", "stages.test.Receipt"
RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.5, jitter=0)


async def drain(stage: Any, events: list[tuple[str, int]]) -> TestDriver:
    driver = TestDriver(Pipeline("io", source="io.in", key="id", schemas=SCHEMAS) | stage)
    for key, n in events:
        driver.send({"id": key, "n": n})
    await driver.drain()
    return driver


async def test_posts_every_record_in_key_order_with_overlap_across_keys() -> None:
    in_flight: Counter[str] = Counter()
    peak = {"all": 0, "per_key": 0}

    async def slow_ok(req: StubRequest) -> StubReply:
        key = req.json()["id"]
        in_flight[key] += 1
        peak["per_key"] = max(peak["per_key"], in_flight[key])
        peak["all"] = max(peak["all"], sum(in_flight.values()))
        await asyncio.sleep(0.01)
        in_flight[key] -= 1
        return StubReply(200, {"ok": True})

    async with HttpStub(slow_ok) as stub:
        counts: Counter[str] = Counter()
        stage = http_post("notify", stub.url("/hook"), input=EVENT, concurrency=4, counts=counts)
        events = [(f"k{i % 5}", i) for i in range(40)]
        driver = await drain(stage, events)
    stats = driver.stats["notify"]
    assert (stats.processed, stats.dead_letters, counts["sent"]) == (40, 0, 40)
    assert [r.path for r in stub.requests] == ["/hook"] * 40
    seen: dict[str, list[int]] = defaultdict(list)
    for r in stub.requests:
        seen[r.json()["id"]].append(r.json()["n"])
    assert all(ns == sorted(ns) for ns in seen.values()) and len(seen) == 5
    assert peak["per_key"] == 1  # never two calls of one key at once
    assert 2 <= peak["all"] <= 4  # but up to `concurrency` keys at once
    assert stub.connections <= 4  # keep-alive: connections are reused
    sent_ids = {(r.header("event-id") or b"").hex() for r in driver.records("io.in")}
    assert {r.headers["idempotency-key"] for r in stub.requests} == sent_ids


async def test_5xx_and_429_are_retried_with_the_same_idempotency_key() -> None:
    attempts: Counter[int] = Counter()

    def flaky(req: StubRequest) -> StubReply:
        n = req.json()["n"]
        attempts[n] += 1
        if n % 2 == 0 and attempts[n] == 1:
            return StubReply(503, {"error": "busy"})
        if n == 3 and attempts[n] < 3:
            return StubReply(429, {"error": "slow down"})
        return StubReply(200, {})

    async with HttpStub(flaky) as stub:
        driver = await drain(
            http_post("notify", stub.url(), input=EVENT, retry=RETRY),
            [("a", n) for n in range(5)],
        )
    stats = driver.stats["notify"]
    assert (stats.processed, stats.dead_letters, stats.retries) == (5, 0, 5)
    assert attempts == Counter({0: 2, 1: 1, 2: 2, 3: 3, 4: 2})
    keys = defaultdict(set)
    for r in stub.requests:
        keys[r.json()["n"]].add(r.headers["idempotency-key"])
    assert all(len(k) == 1 for k in keys.values()) and len(keys) == 5


async def test_4xx_dead_letters_at_once_and_persistent_5xx_after_the_retries() -> None:
    def answer(req: StubRequest) -> StubReply:
        return {0: StubReply(400, {"error": "bad email"}), 1: StubReply(500, "boom")}.get(
            req.json()["n"], StubReply(204)
        )

    async with HttpStub(answer) as stub:
        counts: Counter[str] = Counter()
        driver = await drain(
            http_post("notify", stub.url(), input=EVENT, retry=RETRY, counts=counts),
            [("a", 0), ("b", 1), ("c", 2)],
        )
    dead = {d.value["n"]: d for d in driver.dead_letters()}
    assert (dead[0].error_class, dead[0].attempts) == ("HttpClientError", 1)
    assert "HTTP 400 Bad Request" in dead[0].error_message and "bad email" in dead[0].error_message
    assert (dead[1].error_class, dead[1].attempts) == ("HttpServerError", 3)
    assert driver.clock.waits == [0.5, 1.0]  # the stage's backoff, on virtual time
    assert counts == Counter({"status:400": 1, "status:500": 3, "sent": 1})
    assert driver.stats["notify"].processed == 1


async def test_timeouts_and_refused_connections_are_retriable() -> None:
    async with HttpStub(lambda req: StubReply(200, delay=1.0)) as stub:
        client = HttpClient(timeout=0.05)
        retry = RetryPolicy(max_attempts=2, jitter=0)
        driver = await drain(
            http_post("notify", stub.url(), input=EVENT, client=client, retry=retry),
            [("a", 1)],
        )
        await client.close()
    [dead] = driver.dead_letters()
    assert (dead.error_class, dead.attempts) == ("HttpUnavailable", 2)
    assert "no response within 0.05s" in dead.error_message

    async with HttpStub() as stub:
        url = stub.url()  # the port is free again once the stub has stopped
    driver = await drain(http_post("notify", url, input=EVENT, retry=retry), [("a", 1)])
    [dead] = driver.dead_letters()
    assert dead.error_class == "HttpUnavailable" and "ConnectionRefusedError" in dead.error_message


async def test_output_values_from_the_response() -> None:
    def ticket(req: StubRequest) -> StubReply:
        return StubReply(201, {"ticket": f"T-{req.json()['number']}"})

    async with HttpStub(ticket) as stub:
        stage = http_post(
            "file", stub.url(), input=EVENT, output=RECEIPT,
            body=lambda e: {"number": e["n"]},
            result=lambda e, resp: {"id": e["id"], "n": e["n"], "ticket": resp.json()["ticket"]},
        )  # fmt: skip
        driver = await drain(stage, [("a", 7), ("b", 8)])
    assert sorted(o["ticket"] for o in driver.outputs()) == ["T-7", "T-8"]
    assert sorted(r.json()["number"] for r in stub.requests) == [7, 8]


async def test_a_limiter_paces_the_calls() -> None:
    clock = SimulatedClock()
    limiter = RateLimiter(5, clock=clock.now, sleep=clock.sleep)
    async with HttpStub() as stub:
        stage = http_post("notify", stub.url(), input=EVENT, limiter=limiter)
        await drain(stage, [(f"k{i}", i) for i in range(11)])
    assert len(stub.requests) == 11
    assert clock.now() == pytest.approx(2.0)  # 10 waits of 0.2 s


# -- the client on its own: response framing, keep-alive, errors -------------------------------


async def raw_server(
    respond: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(respond, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.startswith(b"Content") and b"Length" in line
    )
    return await reader.readexactly(length)


async def test_chunked_and_connection_delimited_bodies() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5;ext=1\r\n{"a":\r\n3\r\n 1}\r\n0\r\nX-Trailer: t\r\n\r\n'
        )
        await writer.drain()
        writer.close()

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 5000)
        await writer.drain()
        writer.close()

    async with HttpClient(timeout=5, max_body=4096) as client:
        server, url = await raw_server(chunked)
        async with server:
            assert (await client.post_json(url, {})).json() == {"a": 1}
        server, url = await raw_server(until_close)
        async with server:
            with pytest.raises(HttpUnavailable, match="larger than 4096 bytes"):
                await client.post_json(url, {})
        client.max_body = 10_000
        server, url = await raw_server(until_close)
        async with server:
            assert (await client.post_json(url, {})).body == b"x" * 5000


async def test_a_pooled_connection_closed_by_the_server_is_replaced() -> None:
    served = []

    async def once_per_connection(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        served.append(await read_request(r))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        w.close()  # without saying "Connection: close": the client finds out on reuse

    server, url = await raw_server(once_per_connection)
    async with server, HttpClient(timeout=5) as client:
        for i in range(3):
            assert (await client.post_json(url, {"i": i})).text == "ok"
            await asyncio.sleep(0.05)
    assert served == [b'{"i":0}', b'{"i":1}', b'{"i":2}']
    assert client.connections_opened == 3


async def test_client_errors_are_clear() -> None:
    async with HttpClient() as client:
        with pytest.raises(ConfigError, match="not an http:// or https:// URL"):
            await client.post_json("ftp://host/x", {})
        with pytest.raises(ConfigError, match="is not a valid header"):
            await client.post_json("http://127.0.0.1:1/", {}, headers={"X-A": "1\r\nX-B: 2"})

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        writer.close()

    server, url = await raw_server(garbage)
    async with server, HttpClient() as client:
        with pytest.raises(HttpUnavailable, match="malformed status line"):
            await client.post_json(url, {})
    assert HttpServerError.retriable and not HttpClientError.retriable


def test_bad_definitions_are_refused() -> None:
    with pytest.raises(DefinitionError, match="stage 'n': URL 'mailto:x' is not"):
        http_post("n", "mailto:x", input=EVENT)
    with pytest.raises(DefinitionError, match="no output schema"):
        http_post("n", "http://h/", input=EVENT, result=lambda v, r: v)
    with pytest.raises(DefinitionError, match="body must be callable"):
        http_post("n", "http://h/", input=EVENT, body={"a": 1})  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match="client must be an HttpClient"):
        http_post("n", "http://h/", input=EVENT, client=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout must be a number > 0"):
        HttpClient(timeout=0)
