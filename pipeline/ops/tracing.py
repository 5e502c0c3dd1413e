"""W3C trace context across a pipeline, and a span per record with OpenTelemetry.

The ``traceparent`` header is cross-stage context like ``seq``: every stage copies it to its
outputs and a dead letter keeps it, so a trace id published with an event is on the sink's
record and on any dead letter. Where it comes from:

- ``Publisher.publish(value, traceparent=...)`` sets it explicitly;
- otherwise, when the ``otel`` extra (``opentelemetry-api``) is installed and the caller runs
  inside a span, the publisher injects that span's context (what OpenTelemetry's own
  instrumentations do). Without either, no header is added: no bytes, no cost.

With ``pipeline run ... --trace`` (``RunOptions(tracing=True)``) and an OpenTelemetry SDK
configured in the process (:func:`spans_recorded`), each stage wraps every call of its function
in a span named ``<pipeline>.<stage>``, a child of the context in the record's
``traceparent`` (so all stages of one event share its trace id), with the record's topic,
partition and offset as attributes; an exception ends its span with an error status. The
header itself is passed on unchanged: each stage's span is a child of the publisher's, not of
the previous stage's. Exporting spans is the application's choice (the OpenTelemetry SDK and
an exporter, configured before the stages start); only the API is a dependency here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from pipeline.errors import ConfigError
from pipeline.record import TRACE_HEADER, Record

Invoke = Callable[[Any, Record], Any]


def otel_available() -> bool:
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


def spans_recorded() -> bool:
    """Whether this process has an OpenTelemetry SDK (a real tracer provider) configured.

    Without one every span is a no-op that still costs its setup per record; the stages then
    make none (the ``traceparent`` header is passed on all the same), as OpenTelemetry's own
    instrumentations skip work for spans that do not record.
    """
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


@functools.cache
def _current_span() -> Callable[[], Any]:
    from opentelemetry import trace

    return trace.get_current_span


def current_traceparent() -> bytes | None:
    """The W3C ``traceparent`` of the caller's current span, if OpenTelemetry has one.

    A publisher asks for every event: the import is looked up once, not per call.
    """
    ctx = _current_span()().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()


def traced(invoke: Invoke, name: str, *, is_async: bool) -> Invoke:
    """``invoke`` wrapped in a span per call, joined to the record's ``traceparent``.

    Raises:
        ConfigError: The ``otel`` extra is not installed.
    """
    if not otel_available():
        raise ConfigError(
            "tracing needs OpenTelemetry's API: pip install 'kafka-pipeline[otel]' (and the "
            "SDK with an exporter to send the spans somewhere)"
        )
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    tracer = trace.get_tracer("kafka-pipeline")
    propagator = TraceContextTextMapPropagator()

    def parent(record: Record) -> Any:
        for key, value in record.headers:
            if key == TRACE_HEADER:
                return propagator.extract({TRACE_HEADER: value.decode("latin-1")})
        return None

    def attributes(record: Record) -> dict[str, Any]:
        return {
            "messaging.system": "kafka",
            "messaging.destination.name": record.topic or "",
            "messaging.kafka.destination.partition": record.partition or 0,
            "messaging.kafka.message.offset": record.offset or 0,
        }

    if is_async:

        async def acall(value: Any, record: Record) -> Any:
            with tracer.start_as_current_span(
                name, context=parent(record), kind=SpanKind.CONSUMER, attributes=attributes(record)
            ):
                result = invoke(value, record)
                return await result if inspect.isawaitable(result) else result

        return acall

    def call(value: Any, record: Record) -> Any:
        with tracer.start_as_current_span(
            name, context=parent(record), kind=SpanKind.CONSUMER, attributes=attributes(record)
        ):
            return invoke(value, record)

    return call
