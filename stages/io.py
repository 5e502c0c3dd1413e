"""I/O stages: call an HTTP endpoint for each record, with key-ordered concurrency and retries.

:func:`http_post` POSTs each record as JSON (or what ``body`` makes of it) to a URL, through
a pooled keep-alive :class:`~stages.http.HttpClient`. The worker runs up to ``concurrency``
calls at once, for different keys; each key's records are sent one after another, in order,
and the input offset is committed only past records whose call has finished.

Failures follow the status (see :mod:`stages.http`): a timeout, a lost connection, a 5xx or
a 408/425/429 is retriable, so the worker retries the record with the stage's
:class:`~pipeline.stage.RetryPolicy` backoff and dead-letters it when the attempts run out;
any other non-2xx status (a 4xx) dead-letters it at once. The dead letter's error class says
which: ``HttpServerError``, ``HttpClientError`` or ``HttpUnavailable``.

Delivery is at least once: a record retried after a timeout, or redelivered after a crash,
is POSTed again. Each request carries an ``Idempotency-Key`` header, the record's event id
in hex, the same on every attempt, so the endpoint can recognise a repeat.

The stage is a sink by default (``output=None``): the call is the work. With ``output`` it
writes ``result(value, response)`` (default: the value unchanged) for each successful call.

Example:
    >>> notify = http_post("notify", "http://mailer:8080/send",       # doctest: +SKIP
    ...                    input="shop.Order", concurrency=16,
    ...                    body=lambda o: {"to": o["email"], "order": o["id"]},
    ...                    retry=RetryPolicy(max_attempts=5, initial_backoff=0.5))
    >>> Pipeline("shop", source="shop.in", key="id", schemas=store) | notify  # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from pipeline.errors import ConfigError, DefinitionError
from pipeline.record import Record
from pipeline.stage import DedupPolicy, RetryPolicy, Stage, stage
from stages._common import bump, check_callable
from stages.http import HttpClient, HttpResponse, check_url, raise_for_status
from stages.throttle import RateLimiter

__all__ = ["IDEMPOTENCY_HEADER", "http_post"]

#: Request header carrying the record's event id (hex), equal across attempts.
IDEMPOTENCY_HEADER = "Idempotency-Key"


def http_post(
    name: str,
    url: str,
    *,
    input: str,
    output: str | None = None,
    body: Callable[[Any], Any] | None = None,
    result: Callable[[Any, HttpResponse], Any] | None = None,
    client: HttpClient | None = None,
    concurrency: int = 8,
    retry: RetryPolicy | None = None,
    limiter: RateLimiter | None = None,
    dedup: DedupPolicy | None = None,
    counts: Counter[str] | None = None,
) -> Stage:
    """A stage that POSTs each record to ``url`` as JSON.

    Args:
        name: Stage name.
        url: The endpoint (``http://`` or ``https://``).
        input: Schema of the values read.
        output: Schema of the values written, or ``None`` for a sink.
        body: Makes the JSON payload from the value (default: the value itself).
        result: With ``output``: makes the output from the value and the 2xx response
            (default: the value unchanged).
        client: The HTTP client (timeout, common headers); a new one by default.
        concurrency: Calls in flight at once, for different keys.
        retry: Retries of retriable failures before the record is dead-lettered.
        limiter: Paces the calls (per instance, or per key), e.g. to a service's quota.
        dedup: Deduplication of the stage's input.
        counts: If given, counts ``sent`` (2xx) and ``status:<code>`` for other statuses.

    Raises:
        DefinitionError: A URL that is not http(s), a ``result`` without ``output``, a
            ``body``/``result`` that is not callable, a bad concurrency.

    Example:
        >>> s = http_post("notify", "http://127.0.0.1:9/hook", input="t.E", concurrency=4)
        >>> s.output is None, s.is_async, s.concurrency
        (True, True, 4)
    """
    try:
        check_url(url)
    except ConfigError as exc:
        raise DefinitionError(f"stage '{name}': {exc.message}") from None
    if body is not None:
        check_callable(name, "body", body)
    if result is not None:
        check_callable(name, "result", result)
        if output is None:
            raise DefinitionError(
                f"stage '{name}': result= makes output values, but the stage has no output "
                f"schema (pass output=...)"
            )
    if client is not None and not isinstance(client, HttpClient):
        raise DefinitionError(f"stage '{name}': client must be an HttpClient")
    if limiter is not None and not isinstance(limiter, RateLimiter):
        raise DefinitionError(f"stage '{name}': limiter must be a RateLimiter")
    http = client or HttpClient()
    what = f"POST {url}"

    async def post(value: Any, record: Record) -> Any:
        if limiter is not None:
            await limiter.acquire(record.key)
        headers = {IDEMPOTENCY_HEADER: record.id.hex()} if record.id else None
        payload = value if body is None else body(value)
        response = await http.post_json(url, payload, headers=headers)
        if not response.ok:
            bump(counts, f"status:{response.status}")
        raise_for_status(response, what)
        bump(counts, "sent")
        if output is None:
            return True  # a sink: any non-None result counts the record as processed
        return value if result is None else result(value, response)

    return stage(
        name, input=input, output=output, concurrency=concurrency, retry=retry, dedup=dedup
    )(post)
