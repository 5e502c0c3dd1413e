"""stages.io and stages.http against local HTTP servers: ordering, retries, timeouts, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


# -- the client on its own: framing, body limit, keep-alive, TLS, errors -----------------------
# aiohttp's own test server (aiohttp.test_utils.RawTestServer) answers where a test needs a
# response the HttpStub does not make (chunked, slow, hung up).

RawHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def raw_server(handler: RawHandler, **server_args: Any) -> AsyncIterator[str]:
    """The URL of ``/x`` on an aiohttp test server answering with ``handler``."""
    server = RawTestServer(handler)
    await server.start_server(**server_args)  # (arguments of aiohttp.web.Server)
    try:
        yield str(server.make_url("/x"))
    finally:
        await server.close()


async def chunked(request: web.BaseRequest) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"a":')
    await response.write(b" 1}")
    await response.write_eof()
    return response


async def test_chunked_bodies_and_the_body_limit() -> None:
    async def sized(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b"x" * 5000)

    async def big_chunked(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(5):
            await response.write(b"x" * 1000)
        await response.write_eof()
        return response

    async with HttpClient(timeout=5, max_body=4096) as client:
        async with raw_server(chunked) as url:
            assert (await client.post_json(url, {})).json() == {"a": 1}
        for handler in (sized, big_chunked):  # refused by Content-Length, or while reading
            async with raw_server(handler) as url:
                with pytest.raises(HttpUnavailable, match="larger than 4096 bytes"):
                    await client.post_json(url, {})
                client.max_body = 10_000
                assert (await client.post_json(url, {})).body == b"x" * 5000
                client.max_body = 4096


async def test_one_timeout_covers_the_whole_response() -> None:
    async def slow_body(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"[1,")  # the status and headers arrive at once ...
        await asyncio.sleep(1)  # ... the rest of the body too late
        await response.write(b"2]")
        return response

    async with raw_server(slow_body) as url, HttpClient(timeout=0.2) as client:
        with pytest.raises(HttpUnavailable, match=r"no response within 0.2s") as caught:
            await client.post_json(url, {})
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_keep_alive_and_an_idle_connection_closed_by_the_server() -> None:
    async with HttpStub() as stub, HttpClient(timeout=5) as client:
        for i in range(3):
            assert (await client.post_json(stub.url(), {"i": i})).ok
    assert (stub.connections, client.connections_opened) == (1, 1)

    async with (
        HttpStub(lambda req: StubReply(200, close=True)) as stub,  # "Connection: close"
        HttpClient(timeout=5) as client,
    ):
        for i in range(2):
            assert (await client.post_json(stub.url(), {"i": i})).ok
    assert (stub.connections, client.connections_opened) == (2, 2)

    # A server that closes idle connections sooner than the client: each one is gone when
    # the next request would use it, and the client opens a new one.
    served = []

    async def ok(request: web.BaseRequest) -> web.StreamResponse:
        served.append(await request.read())
        return web.Response(text="ok")

    async with raw_server(ok, keepalive_timeout=0.01) as url, HttpClient(timeout=5) as client:
        for i in range(3):
            assert (await client.post_json(url, {"i": i})).text == "ok"
            await asyncio.sleep(0.1)
    assert served == [b'{"i":0}', b'{"i":1}', b'{"i":2}']
    assert client.connections_opened == 3


async def test_a_reused_connection_that_breaks_is_replaced_once() -> None:
    """The race of an idle connection closed by the server as a request goes out."""
    served: list[bytes] = []
    answered: set[object] = set()

    async def hang_up_on_reuse(request: web.BaseRequest) -> web.StreamResponse:
        served.append(await request.read())
        if request.transport in answered:
            assert request.transport is not None
            request.transport.close()  # no response at all
        answered.add(request.transport)
        return web.Response(text="ok")

    async with raw_server(hang_up_on_reuse) as url, HttpClient(timeout=5) as client:
        for i in range(3):
            assert (await client.post_json(url, {"i": i})).text == "ok"
    assert served == [b'{"i":0}', b'{"i":1}', b'{"i":1}', b'{"i":2}', b'{"i":2}']
    assert client.connections_opened == 3

    async def hang_up(request: web.BaseRequest) -> web.StreamResponse:
        served.append(await request.read())
        assert request.transport is not None
        request.transport.close()
        return web.Response(text="never sent")

    served.clear()
    async with raw_server(hang_up) as url, HttpClient(timeout=5) as client:
        with pytest.raises(HttpUnavailable, match="connection closed by the server"):
            await client.post_json(url, {"i": 0})
    assert served == [b'{"i":0}']  # a new connection that breaks is not tried again


def test_one_client_serves_one_event_loop_after_another() -> None:
    client = HttpClient(timeout=5)

    async def call() -> int:
        async with HttpStub() as stub:
            return (await client.post_json(stub.url(), {})).status

    assert asyncio.run(call()) == 200
    assert asyncio.run(call()) == 200  # the first loop's pool closed with that loop
    assert client.connections_opened == 2


def self_signed(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1, and a client context
    that trusts it (and nothing else)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stub")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return server, ssl.create_default_context(cadata=cert_pem.decode())


async def test_https_with_an_ssl_context(tmp_path: Path) -> None:
    server_tls, client_tls = self_signed(tmp_path)
    async with HttpStub(
        lambda req: StubReply(201, {"got": req.json()}), ssl_context=server_tls
    ) as stub:
        assert stub.url("/x").startswith("https://127.0.0.1:")
        client = HttpClient(timeout=5, ssl_context=client_tls)
        driver = await drain(
            http_post("notify", stub.url("/x"), input=EVENT, client=client),
            [("a", 1), ("a", 2), ("b", 3)],
        )
        assert (await client.post_json(stub.url("/x"), {"n": 4})).json() == {"got": {"n": 4}}
        await client.close()

        # Without the context, the system's CAs do not trust the stub: no request is sent.
        async with HttpClient(timeout=5) as untrusting:
            with pytest.raises(HttpUnavailable, match="certificate verify failed") as caught:
                await untrusting.post_json(stub.url("/x"), {})
    assert driver.stats["notify"].processed == 3
    assert sorted(r.json()["n"] for r in stub.requests) == [1, 2, 3, 4]
    assert stub.connections == client.connections_opened  # keep-alive over TLS as well
    assert "SSLCertVerificationError" in str(caught.value)
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorCertificateError)


async def test_client_errors_are_clear() -> None:
    async with HttpClient() as client:
        with pytest.raises(ConfigError, match="not an http:// or https:// URL"):
            await client.post_json("ftp://host/x", {})
        with pytest.raises(ConfigError, match="is not a valid header"):
            await client.post_json("http://127.0.0.1:1/", {}, headers={"X-A": "1\r\nX-B: 2"})
        with pytest.raises(HttpUnavailable, match="ConnectionRefusedError") as caught:
            async with HttpStub() as stub:
                url = stub.url()  # nothing listens there once the stub has stopped
            await client.post_json(url, {})
        assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)

    # Not an HTTP server at all: a peer that greets in another protocol, then hangs up.
    async def smtp_greeting(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mail.example.com ESMTP ready\r\n")
        await writer.drain()
        writer.close()

    peer = await asyncio.start_server(smtp_greeting, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{peer.sockets[0].getsockname()[1]}/x"
    async with peer, HttpClient() as client:
        with pytest.raises(HttpUnavailable, match="malformed response: Bad status line"):
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
