"""Test doubles for stages: simulated time, and an HTTP endpoint on 127.0.0.1.

- :class:`SimulatedClock` stands in for ``time.monotonic`` and ``asyncio.sleep`` in
  :func:`~stages.throttle.throttle` and :class:`~stages.throttle.RateLimiter`: sleeping moves
  the clock instead of waiting, so a test of a 1-record-a-second limit runs in microseconds.
- :class:`HttpStub` is a real HTTP server on 127.0.0.1 (aiohttp's, keep-alive, optionally
  ``https``) that answers with a function of each request and records them, for tests of
  :func:`~stages.io.http_post` without a network.

Example:
    >>> import asyncio
    >>> from stages.http import HttpClient
    >>> async def demo():
    ...     async with HttpStub(lambda req: StubReply(201, {"got": req.json()})) as stub:
    ...         async with HttpClient() as client:
    ...             reply = await client.post_json(stub.url("/x"), {"n": 1})
    ...     return reply.status, reply.json(), stub.requests[0].path
    >>> asyncio.run(demo())
    (201, {'got': {'n': 1}}, '/x')
"""

from __future__ import annotations

import asyncio
import inspect
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

__all__ = ["HttpStub", "SimulatedClock", "StubReply", "StubRequest"]


class SimulatedClock:
    """A clock that moves only when something sleeps on it (or :meth:`advance` moves it).

    ``sleep(d)`` moves the clock ``d`` seconds forward and yields to the event loop once.
    Since a :class:`~stages.throttle.RateLimiter` reserves a token and sleeps in one step,
    tasks sharing a limiter see each other's waits as time passed, and the clock ends where
    real time would: when the last token fell due.

    Attributes:
        waits: Every duration asked for, in call order.

    Example:
        >>> import asyncio
        >>> clock = SimulatedClock()
        >>> asyncio.run(clock.sleep(2.5))
        >>> clock.now(), clock.waits
        (2.5, [2.5])
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self.waits: list[float] = []

    def now(self) -> float:
        """The simulated time, in seconds."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (time passing while nothing sleeps)."""
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the wait and move the clock to its end."""
        self.waits.append(seconds)
        self._now += max(0.0, seconds)
        await asyncio.sleep(0)


@dataclass(frozen=True, slots=True)
class StubRequest:
    """A request the stub received (``path`` with its query; header names in lower case).

    Example:
        >>> StubRequest("POST", "/x", {"content-type": "application/json"}, b'{"n": 1}').json()
        {'n': 1}
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True, slots=True)
class StubReply:
    """The stub's answer: status, a JSON-able body (or bytes), headers, a delay, a hang-up.

    ``delay`` seconds pass before the reply (for timeouts); ``close=True`` closes the
    connection after it.

    Example:
        >>> StubReply(503, {"error": "busy"}, delay=0.1).status
        503
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    close: bool = False


Handler = Callable[[StubRequest], "StubReply | Awaitable[StubReply]"]

#: Seconds that requests in progress get to finish when the stub stops.
_STOP_GRACE = 1.0


class HttpStub:
    """An HTTP server on 127.0.0.1 that answers with ``handler(request)``.

    It is :mod:`aiohttp`'s low-level web server; the stub adds the recording and the
    :class:`StubReply` options. Leaving ``async with`` stops listening at once, gives requests
    in progress up to a second to be answered, then closes every connection.

    Args:
        handler: Returns (or awaits to) the :class:`StubReply` for each request. Default:
            ``200`` with an empty JSON object. A handler that raises, or returns something
            else, makes the stub answer ``500`` with the error in the body.
        port: Where to listen (default: a free port); give the port of a stopped stub to
            bring a "dependency" back at the same address.
        ssl_context: A server-side context (with its certificate chain loaded) to serve
            ``https``; the certificate must be valid for ``127.0.0.1``.

    Attributes:
        requests: Every request received, in arrival order.
        connections: TCP connections that carried a request.

    Example:
        >>> import asyncio
        >>> from stages.http import HttpClient
        >>> async def demo():
        ...     async with HttpStub() as stub, HttpClient() as client:
        ...         await client.post_json(stub.url("/a"), {"n": 1})
        ...         await client.post_json(stub.url("/b"), {"n": 2})
        ...     return [r.path for r in stub.requests], stub.connections
        >>> asyncio.run(demo())
        (['/a', '/b'], 1)
    """

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.handler: Handler = handler or (lambda _req: StubReply(200, {}))
        self.requests: list[StubRequest] = []
        self.connections = 0
        self.port = port  # 0: a free one, chosen on start
        self._ssl = ssl_context
        self._runner: web.ServerRunner | None = None
        self._seen: set[object] = set()  # the transports that carried a request

    def url(self, path: str = "/") -> str:
        """The URL of ``path`` on the stub."""
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> HttpStub:
        # handler_cancellation: a client that hangs up (a timeout) cancels its request's
        # delay instead of leaving it to run.
        server = web.Server(self._handle, handler_cancellation=True)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=_STOP_GRACE)
        await runner.setup()
        # reuse_address: a stub started again on the port of one that just stopped (a
        # dependency coming back) must not fail on sockets in TIME_WAIT.
        site = web.TCPSite(
            runner, "127.0.0.1", self.port, ssl_context=self._ssl, reuse_address=True
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._seen.clear()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.transport not in self._seen:
            self._seen.add(request.transport)
            self.connections += 1
        received = StubRequest(
            request.method,
            request.raw_path,
            {name.lower(): value for name, value in request.headers.items()},
            await request.read(),
        )
        self.requests.append(received)
        try:
            reply = self.handler(received)
            if inspect.isawaitable(reply):
                reply = await reply
        except Exception as exc:  # a broken handler answers 500, visibly
            reply = StubReply(500, {"stub handler failed": repr(exc)})
        if not isinstance(reply, StubReply):
            reply = StubReply(500, {"stub handler returned": repr(reply)})
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return _response(reply)


def _response(reply: StubReply) -> web.Response:
    if isinstance(reply.body, bytes):
        body = reply.body
    else:
        body = b"" if reply.body is None else json.dumps(reply.body).encode()
    response = web.Response(
        status=reply.status,
        body=body,
        headers={"Content-Type": "application/json", **reply.headers},
    )
    if reply.close:
        response.force_close()
    return response
