"""Reusable filter stages on ``pipeline``: each factory returns a :class:`pipeline.Stage`.

Compose them like any stage: ``Pipeline(...) | validate(...) | enrich(...) | route(...)``.

- :mod:`stages.validate`: business rules; invalid records dead-lettered or routed to a
  rejected stream.
- :mod:`stages.transform`: map / filter / flat-map stages from plain functions.
- :mod:`stages.table` and :mod:`stages.enrich`: join records with a table loaded from a
  compacted topic.
- :mod:`stages.route`: content-based routing (a tagging stage plus per-route branches).
- :mod:`stages.window`: tumbling event-time windows, counted and summed per key.
- :mod:`stages.throttle`: rate limits per instance or per key.
- :mod:`stages.http` and :mod:`stages.io`: an HTTP client (on aiohttp) and a stage that POSTs
  records.
- :mod:`stages.testing`: a simulated clock and an HTTP stub for tests.

Example:
    >>> from stages import Rule, validate
    >>> check = validate("check", schema="shop.Order",
    ...                  rules=[Rule("total is positive", lambda o: o["total"] > 0)])
    >>> check.name, check.input, check.output
    ('check', 'shop.Order', 'shop.Order')
"""

from stages.enrich import Merge, Missing, MissingEntry, OnMissing, enrich
from stages.http import (
    HttpClient,
    HttpClientError,
    HttpError,
    HttpResponse,
    HttpServerError,
    HttpUnavailable,
)
from stages.io import IDEMPOTENCY_HEADER, http_post
from stages.route import ROUTE_HEADER, Unroutable, branch, branches, route, routes_of, take_route
from stages.table import KafkaTable, MemoryTable, Table, TableUnavailable
from stages.throttle import RateLimiter, throttle
from stages.transform import ResultError, filter_stage, flat_map_stage, map_stage
from stages.validate import FAILED_HEADER, Rule, ValidationFailed, validate
from stages.window import WindowResult, tumbling_window

__all__ = [
    "FAILED_HEADER",
    "IDEMPOTENCY_HEADER",
    "ROUTE_HEADER",
    "HttpClient",
    "HttpClientError",
    "HttpError",
    "HttpResponse",
    "HttpServerError",
    "HttpUnavailable",
    "KafkaTable",
    "MemoryTable",
    "Merge",
    "Missing",
    "MissingEntry",
    "OnMissing",
    "RateLimiter",
    "ResultError",
    "Rule",
    "Table",
    "TableUnavailable",
    "Unroutable",
    "ValidationFailed",
    "WindowResult",
    "branch",
    "branches",
    "enrich",
    "filter_stage",
    "flat_map_stage",
    "http_post",
    "map_stage",
    "route",
    "routes_of",
    "take_route",
    "throttle",
    "tumbling_window",
    "validate",
]
