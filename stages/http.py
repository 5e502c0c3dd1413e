"""An asyncio HTTP client for I/O stages, on aiohttp.

It does what a stage calling a JSON endpoint needs and no more: ``POST`` (or any method) with
a body, keep-alive connections pooled per host (an :class:`aiohttp.ClientSession` per event
loop), one timeout over the whole request (connect, send, read the whole response),
``https`` with an optional :class:`ssl.SSLContext`, a limit on the response body. No
redirects, no cookies, no proxies from the environment. Failures are
:class:`~pipeline.errors.StageError` subclasses, so a stage can let them propagate and the
worker retries or dead-letters as their ``retriable`` flag says:

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
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace, TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from pipeline.errors import ConfigError, StageError

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

_USER_AGENT = "kafka-pipeline-stages/1"
_READ_CHUNK = 64 * 1024


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
        body: The body, de-chunked (and decompressed if the server compressed it).

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
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number in range raises here
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"URL {url!r} is not valid: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"URL {url!r} is not an http:// or https:// URL with a host")
    return url


def _check_headers(headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        if not name or any(c in name for c in ":\r\n ") or any(c in value for c in "\r\n"):
            raise ConfigError(f"HTTP header {name!r}: {value!r} is not a valid header")


class _Attempt:
    """What the session's trace hooks learn about one attempt of a request."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


class HttpClient:
    """An HTTP client with keep-alive connections pooled per host, on :mod:`aiohttp`.

    One client serves one event loop at a time: its :class:`aiohttp.ClientSession` is made
    on first use in a loop, and used from a new loop (a new ``asyncio.run``) the client makes
    a new one. Pooled connections are closed by :meth:`close`, leaving ``async with``, or,
    failing those, when the loop shuts down (so a stage's client needs no explicit close).

    Args:
        timeout: Seconds for one request: waiting for a pooled connection, connect, send,
            and read the whole response.
        headers: Headers sent with every request.
        max_body: Largest response body accepted, in bytes.
        ssl_context: For ``https`` (default: the system's trusted CAs, hostname checked).
        max_connections: Connections open at once to one host; a request beyond waits for
            one (within its timeout).

    Attributes:
        connections_opened: Connections opened so far (the rest were reused).

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
        max_connections: int = 100,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"HttpClient: timeout must be a number > 0, got {timeout!r}")
        if max_body < 0:
            raise ConfigError(f"HttpClient: max_body must be >= 0, got {max_body!r}")
        whole = isinstance(max_connections, int) and not isinstance(max_connections, bool)
        if not whole or max_connections < 1:
            raise ConfigError(
                f"HttpClient: max_connections must be an integer >= 1, got {max_connections!r}"
            )
        self.timeout = float(timeout)
        self.headers = dict(headers or {})
        _check_headers(self.headers)
        self.max_body = max_body
        self.max_connections = max_connections
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None
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
        """Close the pooled connections (the event loop's shutdown does it too).

        The client stays usable: a later request opens new connections.
        """
        session, guard = self._session, self._guard
        self._session = self._guard = None
        if self._loop is not asyncio.get_running_loop():
            return  # another loop's session: that loop's shutdown closed it
        if guard is not None:
            guard.cancel()
        if session is not None:
            await session.close()

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

        A pooled keep-alive connection that the server closed before answering (an idle
        connection it timed out as the request went out) is replaced by a new one, once.

        Raises:
            HttpUnavailable: No connection, a timeout, or a malformed response.
            ConfigError: ``url`` is not an http(s) URL, or a header is not valid.
        """
        check_url(url)
        merged = {"User-Agent": _USER_AGENT, **self.headers, **(headers or {})}
        _check_headers(merged)
        session = self._session_of_this_loop()
        try:
            async with asyncio.timeout(self.timeout):  # over both tries of a stale connection
                attempt = _Attempt()
                try:
                    return await self._exchange(session, method, url, body, merged, attempt)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    if not attempt.reused:
                        raise
                # The server had closed the pooled connection (seen as a disconnect or as a
                # reset, depending on timing): once more, on a new one.
                return await self._exchange(session, method, url, body, merged, _Attempt())
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors too
            raise HttpUnavailable(f"{method} {url}: no response within {self.timeout:g}s") from exc
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake
            cause = exc.os_error
            raise HttpUnavailable(f"{method} {url}: {type(cause).__name__}: {exc}") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise HttpUnavailable(f"{method} {url}: connection closed by the server") from exc
        except aiohttp.ClientResponseError as exc:  # not HTTP, or broken HTTP
            detail = " ".join(exc.message.split())
            raise HttpUnavailable(f"{method} {url}: malformed response: {detail}") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise HttpUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    # -- internals ---------------------------------------------------------------------------

    async def _exchange(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        attempt: _Attempt,
    ) -> HttpResponse:
        async with session.request(
            method,
            url,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            allow_redirects=False,
            trace_request_ctx=attempt,
        ) as resp:
            limit = self.max_body
            too_large = f"{method} {url}: response body larger than {limit} bytes"
            if resp.content_length is not None and resp.content_length > limit:
                raise HttpUnavailable(too_large)
            parts: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(_READ_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise HttpUnavailable(too_large)
                parts.append(chunk)
            got = {name.lower(): value for name, value in resp.headers.items()}
            return HttpResponse(resp.status, resp.reason or "", got, b"".join(parts))

    def _session_of_this_loop(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # another loop's connections cannot be used here
            self._session = self._guard = None
            self._loop = loop
        if self._session is None or self._session.closed:
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(self._on_connection_created)
            trace.on_connection_reuseconn.append(self._on_connection_reused)
            connector = aiohttp.TCPConnector(
                limit=0,  # no overall cap: one per host instead
                limit_per_host=self.max_connections,
                ssl=self._ssl if self._ssl is not None else True,
            )
            self._session = session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trace_configs=[trace],
            )
            self._guard = loop.create_task(self._close_with_loop(session), name="http-client")
        return self._session

    @staticmethod
    async def _close_with_loop(session: aiohttp.ClientSession) -> None:
        """Wait until the event loop shuts down (which cancels this task); then close the
        session's pooled connections."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await session.close()

    async def _on_connection_created(
        self, _session: aiohttp.ClientSession, _ctx: SimpleNamespace, _params: object
    ) -> None:
        self.connections_opened += 1

    @staticmethod
    async def _on_connection_reused(
        _session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: object
    ) -> None:
        if isinstance(ctx.trace_request_ctx, _Attempt):
            ctx.trace_request_ctx.reused = True
