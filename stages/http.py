"""A small asyncio HTTP/1.1 client for I/O stages, on the standard library only.

It does what a stage calling a JSON endpoint needs and no more: ``POST`` (or any method) with
a body, keep-alive connections pooled per host, ``Content-Length`` and chunked responses,
one timeout over connect + send + receive, ``https`` through :mod:`ssl`. No redirects, no
cookies, no proxies. Failures are :class:`~pipeline.errors.StageError` subclasses, so a stage
can let them propagate and the worker retries or dead-letters as their ``retriable`` flag
says:

- :class:`HttpUnavailable` (retriable): no connection, a timeout, a broken response;
- :class:`HttpServerError` (retriable): a 5xx, or 408 / 425 / 429 ("try again later");
- :class:`HttpClientError` (not retriable): any other non-2xx status (3xx, 4xx).

Example:
    >>> import asyncio
    >>> from stages.testing import HttpStub, StubReply
    >>> async def main():
    ...     async with HttpStub(lambda req: StubReply(202, {"queued": True})) as stub:
    ...         async with HttpClient(timeout=5) as client:
    ...             reply = await client.post_json(stub.url("/mail"), {"to": "a@b"})
    ...     return reply.status, reply.json()
    >>> asyncio.run(main())
    (202, {'queued': True})
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from pipeline.errors import ConfigError, StageError
from stages._http1 import StaleConnection, Target, encode_head, exchange, parse_url

__all__ = [
    "RETRIABLE_STATUSES",
    "HttpClient",
    "HttpClientError",
    "HttpError",
    "HttpResponse",
    "HttpServerError",
    "HttpUnavailable",
    "check_url",
    "raise_for_status",
]

#: Statuses besides 5xx that mean "try again later".
RETRIABLE_STATUSES = frozenset({408, 425, 429})

_IDLE_PER_HOST = 32
_USER_AGENT = "kafka-pipeline-stages/1"


class HttpError(StageError):
    """Root of the HTTP failures (``status`` is ``None`` when there was no response)."""

    status: int | None = None


class HttpUnavailable(HttpError):
    """No usable response: the connection failed, timed out, or broke the protocol."""

    retriable = True


class HttpServerError(HttpError):
    """A 5xx, 408, 425 or 429 response: the server may well succeed later."""

    retriable = True


class HttpClientError(HttpError):
    """Any other non-2xx response: the request itself is wrong; retrying cannot help."""

    retriable = False


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response.

    Attributes:
        status: The status code.
        reason: The reason phrase.
        headers: Header names in lower case; the last value of a repeated header.
        body: The body, de-chunked.

    Example:
        >>> HttpResponse(200, "OK", {}, b'{"id": 7}').json()
        {'id': 7}
    """

    status: int
    reason: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON (``None`` for an empty body)."""
        return json.loads(self.body) if self.body else None


def raise_for_status(response: HttpResponse, what: str = "request") -> HttpResponse:
    """Return a 2xx ``response``; raise the matching :class:`HttpError` otherwise.

    Example:
        >>> raise_for_status(HttpResponse(503, "Service Unavailable"))
        Traceback (most recent call last):
        ...
        stages.http.HttpServerError: request: HTTP 503 Service Unavailable
    """
    if response.ok:
        return response
    detail = response.text[:200]
    message = f"{what}: HTTP {response.status} {response.reason}" + (
        f": {detail}" if detail else ""
    )
    error_type = (
        HttpServerError
        if response.status >= 500 or response.status in RETRIABLE_STATUSES
        else HttpClientError
    )
    error = error_type(message)
    error.status = response.status
    raise error


def check_url(url: str) -> str:
    """Return ``url`` if the client can call it (``http`` or ``https``, with a host).

    Raises:
        ConfigError: It cannot (the message says why).

    Example:
        >>> check_url("https://api.example.com/v1/mail")
        'https://api.example.com/v1/mail'
        >>> check_url("ftp://example.com/x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pipeline.errors.ConfigError: URL 'ftp://example.com/x' is not an http:// or https:// ...
    """
    parse_url(url)
    return url


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class HttpClient:
    """An HTTP/1.1 client with keep-alive connections pooled per host.

    One client serves one event loop at a time; used from a new loop (a new ``asyncio.run``)
    it drops the old loop's connections and opens new ones. Pooled connections are closed by
    :meth:`close`, leaving ``async with``, or, failing those, when the loop shuts down.

    Args:
        timeout: Seconds for one request: connect, send, and read the whole response.
        headers: Headers sent with every request.
        max_body: Largest response body accepted, in bytes.
        ssl_context: For ``https`` (default: :func:`ssl.create_default_context`).

    Example:
        >>> HttpClient(timeout=2).timeout
        2.0
    """

    def __init__(
        self,
        *,
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        max_body: int = 1 << 20,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"HttpClient: timeout must be a number > 0, got {timeout!r}")
        if max_body < 0:
            raise ConfigError(f"HttpClient: max_body must be >= 0, got {max_body!r}")
        self.timeout = float(timeout)
        self.headers = dict(headers or {})
        self.max_body = max_body
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guard: asyncio.Task[None] | None = None
        self.connections_opened = 0

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the idle connections (the event loop's shutdown does it too)."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, writer in conns:
                writer.close()
        for conns in idle.values():
            for _, writer in conns:
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def post_json(
        self, url: str, payload: Any, *, headers: Mapping[str, str] | None = None
    ) -> HttpResponse:
        """POST ``payload`` as JSON; return the response, whatever its status.

        Raises:
            HttpUnavailable: No connection, a timeout, or a malformed response.
            ConfigError: ``url`` is not an http(s) URL.
        """
        body = json.dumps(payload, separators=(",", ":"), default=str).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        return await self.request("POST", url, body, headers=sent)

    async def request(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """Send one request; return the response, whatever its status.

        A keep-alive connection that turns out to be closed by the server before any byte of
        the response arrives is replaced by a new one once (the server never saw the request).

        Raises:
            HttpUnavailable: No connection, a timeout, or a malformed response.
            ConfigError: ``url`` is not an http(s) URL.
        """
        target = parse_url(url)
        self._bind_loop()
        merged = {"User-Agent": _USER_AGENT, **self.headers, **(headers or {})}
        data = encode_head(method, target, len(body), merged) + body
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    conn, reused = await self._connection(target)
                    try:
                        status, reason, got, payload, keep = await exchange(
                            *conn, data, method, self.max_body
                        )
                    except StaleConnection:
                        conn[1].close()
                        if reused:
                            continue  # the server had closed it while idle: a new one
                        raise HttpUnavailable(
                            f"{method} {url}: connection closed by the server"
                        ) from None
                    except BaseException:
                        conn[1].close()
                        raise
                    if keep:
                        self._release(target, conn)
                    else:
                        conn[1].close()
                    return HttpResponse(status, reason, got, payload)
        except TimeoutError:
            raise HttpUnavailable(f"{method} {url}: no response within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise HttpUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    # -- internals ---------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections of another loop cannot be used here
            self._idle = {}
            self._loop = loop
            self._guard = loop.create_task(self._close_with_loop(), name="http-client-pool")

    async def _close_with_loop(self) -> None:
        """Wait until the event loop shuts down (which cancels this task); then close the
        pooled connections, so a stage's client needs no explicit close in a stage process."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            for conns in self._idle.values():
                for _, writer in conns:
                    writer.close()
            self._idle = {}

    async def _connection(self, target: Target) -> tuple[_Conn, bool]:
        idle = self._idle.get(target.origin)
        while idle:
            reader, writer = idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return (reader, writer), True
            writer.close()
        if target.scheme == "https":
            context = self._ssl or ssl.create_default_context()
            conn = await asyncio.open_connection(
                target.host, target.port, ssl=context, server_hostname=target.host
            )
        else:
            conn = await asyncio.open_connection(target.host, target.port)
        self.connections_opened += 1
        return conn, False

    def _release(self, target: Target, conn: _Conn) -> None:
        idle = self._idle.setdefault(target.origin, [])
        if len(idle) < _IDLE_PER_HOST:
            idle.append(conn)
        else:
            conn[1].close()
