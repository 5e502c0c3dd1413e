"""Test doubles for stages: simulated time, and an HTTP endpoint on 127.0.0.1.

- :class:`SimulatedClock` stands in for ``time.monotonic`` and ``asyncio.sleep`` in
  :func:`~stages.throttle.throttle` and :class:`~stages.throttle.RateLimiter`: sleeping moves
  the clock instead of waiting, so a test of a 1-record-a-second limit runs in microseconds.
- :class:`HttpStub` is a real HTTP/1.1 server (keep-alive, ``Content-Length`` bodies) that
  answers with a function of each request and records them, for tests of
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
import contextlib
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any

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
    """A request the stub received.

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


class HttpStub:
    """An HTTP/1.1 server on 127.0.0.1 that answers with ``handler(request)``.

    Args:
        port: Where to listen (default: a free port); give the port of a stopped stub to
            bring a "dependency" back at the same address.
        handler: Returns (or awaits to) the :class:`StubReply` for each request. Default:
            ``200`` with an empty JSON object. A handler that raises, or returns something
            else, makes the stub answer ``500`` with the error in the body.

    Attributes:
        requests: Every request received, in arrival order.
        connections: TCP connections accepted.

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

    def __init__(self, handler: Handler | None = None, *, port: int = 0) -> None:
        self.handler: Handler = handler or (lambda _req: StubReply(200, {}))
        self.requests: list[StubRequest] = []
        self.connections = 0
        self.port = port  # 0: a free one, chosen on start
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, path: str = "/") -> str:
        """The URL of ``path`` on the stub."""
        return f"http://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> HttpStub:
        # reuse_address: a stub started again on the port of one that just stopped (a
        # dependency coming back) must not fail on sockets in TIME_WAIT.
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                self.requests.append(request)
                try:
                    reply = self.handler(request)
                    if inspect.isawaitable(reply):
                        reply = await reply
                except Exception as exc:  # a broken handler answers 500, visibly
                    reply = StubReply(500, {"stub handler failed": repr(exc)})
                if not isinstance(reply, StubReply):
                    reply = StubReply(500, {"stub handler returned": repr(reply)})
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                writer.write(_encode_reply(reply))
                await writer.drain()
                if reply.close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)


async def _read_request(reader: asyncio.StreamReader) -> StubRequest | None:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed a keep-alive connection
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return StubRequest(method, path, headers, body)


def _encode_reply(reply: StubReply) -> bytes:
    if isinstance(reply.body, bytes):
        body = reply.body
    else:
        body = b"" if reply.body is None else json.dumps(reply.body).encode()
    try:
        reason = HTTPStatus(reply.status).phrase
    except ValueError:
        reason = "Status"
    headers = {"Content-Type": "application/json", **reply.headers}
    if reply.close:
        headers["Connection"] = "close"
    lines = [f"HTTP/1.1 {reply.status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body
