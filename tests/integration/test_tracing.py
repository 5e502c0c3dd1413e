"""Trace context across three stages on the real broker: the publisher's ``traceparent`` is on
the sink's record and on a dead letter, and with the OpenTelemetry SDK each stage makes a span
per record, all of one event's spans sharing its trace id."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline import Pipeline, Publisher, StageError, TopicPolicy, stage
from pipeline.runtime.runner import RunOptions, run_stages
from pipeline.testing import Names
from tests.integration.apps import chain
from tests.integration.helpers import TopicReader, wait_for_count

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))


@stage(input=chain.EVENT, output=chain.EVENT)
def one(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


@stage(input=chain.EVENT, output=chain.EVENT)
def two(event: dict[str, Any]) -> dict[str, Any]:
    if event["n"] % 10 == 0:
        raise StageError("a tenth is poison (test)", retriable=False)
    event["hops"] += 1
    return event


@stage(input=chain.EVENT, output=chain.EVENT)
async def three(event: dict[str, Any]) -> dict[str, Any]:
    event["hops"] += 1
    return event


def header(record: Any, name: str) -> bytes | None:
    return next((v for k, v in record.headers if k == name), None)


async def test_a_trace_id_crosses_three_stages_into_the_sink_and_the_dead_letters(
    kafka_bootstrap: str, names: Names
) -> None:
    trace.set_tracer_provider(PROVIDER)
    tracer = trace.get_tracer("test")
    name = names.pipeline()
    p = (
        Pipeline(name, source=f"{name}.in", key="key", schemas=chain.SCHEMAS, topics=TopicPolicy(3))
        | one
        | two
        | three
    )
    codec = p.schemas.codec(chain.EVENT)
    stop = asyncio.Event()
    options = RunOptions(tracing=True, shutdown_timeout=20)
    running = asyncio.create_task(
        run_stages(p, ["one", "two", "three"], kafka_bootstrap, options=options, stop=stop)
    )
    published: dict[int, str] = {}
    await asyncio.sleep(1)  # topics exist once run_stages has created them
    async with Publisher(kafka_bootstrap, p.source, codec, "key") as pub:
        for n in range(1, 31):
            with tracer.start_as_current_span(f"request {n}") as span:  # the caller's span
                await pub.publish({"key": f"k{n % 3}", "n": n, "hops": 0, "payload": "t"})
                published[n] = f"{span.get_span_context().trace_id:032x}"
        explicit = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
        await pub.publish({"key": "k9", "n": 31, "hops": 0, "payload": "t"}, traceparent=explicit)
        published[31] = "ab" * 16
    try:
        assert await wait_for_count(kafka_bootstrap, p.sink_topic, 28, 60) >= 28
        assert await wait_for_count(kafka_bootstrap, p.node("two").dlq_topic, 3, 60) >= 3
    finally:
        stop.set()
        await running
    async with TopicReader(kafka_bootstrap, p.sink_topic, read_committed=False) as sink:
        await sink.poll(2000)
    async with TopicReader(kafka_bootstrap, p.node("two").dlq_topic, read_committed=False) as dlq:
        await dlq.poll(2000)
    for records, expect_n in ((sink.records, 28), (dlq.records, 3)):
        assert len(records) == expect_n
        for r in records:
            n = codec.decode(r.value)["n"]
            tp = header(r, "traceparent")
            assert tp is not None, f"record {n} lost its traceparent"
            assert tp.decode().split("-")[1] == published[n], (n, tp)
    spans = EXPORTER.get_finished_spans()
    by_trace: dict[str, set[str]] = defaultdict(set)
    for s in spans:
        if s.name.startswith(name):
            by_trace[f"{s.context.trace_id:032x}"].add(s.name.rsplit(".", 1)[1])
    passed = {n for n in published if n % 10 != 0}
    for n in passed:
        assert by_trace[published[n]] == {"one", "two", "three"}, (n, by_trace[published[n]])
    for n in (10, 20, 30):  # dead-lettered in 'two': its span is there, with an error
        assert by_trace[published[n]] == {"one", "two"}
    failed = [s for s in spans if s.name == f"{name}.two" and not s.status.is_ok]
    assert len(failed) == 3
