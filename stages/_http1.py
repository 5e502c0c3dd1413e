"""The HTTP/1.1 wire format for :mod:`stages.http`: URLs, request heads, response framing."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline.errors import ConfigError

_MAX_HEADER_BYTES = 64 * 1024

#: What :func:`exchange` returns: status, reason, headers, body, and whether the connection
#: may carry another request.
Reply = tuple[int, str, dict[str, str], bytes, bool]


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes."""

    scheme: str
    host: str
    port: int
    target: str  # path and query

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """The target of an ``http://`` or ``https://`` URL; :class:`ConfigError` for others."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"URL {url!r} is not valid: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"URL {url!r} is not an http:// or https:// URL with a host")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default = 443 if parts.scheme == "https" else 80
    return Target(parts.scheme, parts.hostname, port or default, target)


def encode_head(method: str, target: Target, length: int, headers: Mapping[str, str]) -> bytes:
    """The request line and headers of a keep-alive request with a ``length``-byte body."""
    lines = [f"{method} {target.target} HTTP/1.1", f"Host: {target.host_header}"]
    for name, value in headers.items():
        if not name or any(c in name for c in ":\r\n ") or any(c in value for c in "\r\n"):
            raise ConfigError(f"HTTP header {name!r}: {value!r} is not a valid header")
        lines.append(f"{name}: {value}")
    lines += [f"Content-Length: {length}", "Connection: keep-alive", "", ""]
    return "\r\n".join(lines).encode("latin-1")


class StaleConnection(Exception):
    """The connection was closed before any byte of the response arrived."""


async def exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    method: str,
    max_body: int,
) -> Reply:
    """Send ``request``; read the whole response.

    Raises:
        StaleConnection: The server had closed the connection (nothing was answered).
        ValueError: A malformed or oversized response.
        asyncio.IncompleteReadError: The connection ended in the middle of the response.
    """
    try:
        writer.write(request)
        await writer.drain()
        status_line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        raise StaleConnection from None
    except ConnectionError:
        raise StaleConnection from None
    while True:
        version, status, reason = _status(status_line)
        headers = await _headers(reader)
        if not 100 <= status < 200:
            break
        status_line = await reader.readuntil(b"\r\n")  # an interim reply: the real one follows
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if method == "HEAD" or status in (204, 304):
        return status, reason, headers, b"", keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = await _chunked(reader, max_body)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        _check_size(length, max_body)
        body = await reader.readexactly(length)
    else:  # delimited by the end of the connection
        body = await reader.read(max_body + 1)
        while not reader.at_eof() and len(body) <= max_body:
            body += await reader.read(max_body + 1 - len(body))
        _check_size(len(body), max_body)
        keep = False
    return status, reason, headers, body, keep


async def _chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            await _headers(reader)  # trailers, ignored
            return b"".join(parts)
        total += size
        _check_size(total, max_body)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _check_size(size: int, max_body: int) -> None:
    if size > max_body:
        raise ValueError(f"response body larger than {max_body} bytes")


def _status(line: bytes) -> tuple[str, int, str]:
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"malformed status line {line[:80]!r}")
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""


async def _headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    size = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size += len(line)
        if size > _MAX_HEADER_BYTES:
            raise ValueError("response headers too large")
        if line == b"\r\n":
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
