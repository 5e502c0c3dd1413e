"""``pipeline run | graph | topics | publish | tail``: thin commands over the public API."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.cli.console import console
from pipeline.config import Settings
from pipeline.errors import AuthorizationError, CodecError, ConfigError, DecodeError, TopicError
from pipeline.loader import load_pipeline
from pipeline.runtime.diagnose import start_client
from pipeline.security import Connection

if TYPE_CHECKING:
    from pipeline.dsl import Pipeline
    from pipeline.runtime.transport import Batching

out = console()
err = console(stderr=True)

BootstrapOpt = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        "-b",
        help="Bootstrap servers (default: PIPELINE_BOOTSTRAP, "
        "else the broker of 'pipeline kafka start').",
    ),
]
KEY_HELP = "Sequence-key field (default: the schema's 'sequence_key' attribute)."
SchemasOpt = Annotated[Path, typer.Option(help="Directory of .avsc files.")]


def bootstrap_address(given: str | None) -> Connection:
    """Where and how to connect: ``--bootstrap``, else ``PIPELINE_BOOTSTRAP``, else the
    running local broker; with the security of the ``PIPELINE_SECURITY_PROTOCOL``/``SASL``/
    ``SSL`` settings, else (a secure local broker) its admin user's.

    Raises:
        ConfigError: No broker to connect to, or inconsistent security settings.
    """
    from pipeline.broker.cluster import local_connection

    settings = Settings()
    local = local_connection(settings.home)
    address = given or settings.bootstrap or (local.bootstrap if local else None)
    if not address:
        raise ConfigError(
            "no Kafka broker: pass --bootstrap, set PIPELINE_BOOTSTRAP, or start the local "
            "broker with 'pipeline kafka start'"
        )
    if settings.security_configured:
        return Connection(address, settings.security())
    if local is not None and local.bootstrap == address:
        return local  # the local broker as itself: its admin when it runs secure
    return Connection(address)


def register(app: typer.Typer) -> None:
    """Add the pipeline commands to the ``pipeline`` CLI."""
    topics_app = typer.Typer(help="Create and check a pipeline's topics.", no_args_is_help=True)
    app.add_typer(topics_app, name="topics")
    app.command("run")(run)
    app.command("graph")(graph)
    app.command("publish")(publish)
    app.command("tail")(tail)
    topics_app.command("create")(topics_create)
    deploy_app = typer.Typer(help="Print deployment files (one service per stage).")
    app.add_typer(deploy_app, name="deploy")
    deploy_app.command("compose")(deploy_compose)
    deploy_app.command("k8s")(deploy_k8s)


def run(
    ref: Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")],
    stage: Annotated[list[str] | None, typer.Option("--stage", "-s", help="Stage to run.")] = None,
    all_stages: Annotated[bool, typer.Option("--all", help="Run every stage here.")] = False,
    schedule: Annotated[
        list[str] | None,
        typer.Option(
            help="Run a replica of this schedule (repeatable): of all replicas, one emits."
        ),
    ] = None,
    bootstrap: BootstrapOpt = None,
    stats_file: Annotated[Path | None, typer.Option(help="Write JSON counters here.")] = None,
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds to drain on SIGTERM.")] = 30.0,
    max_records: Annotated[
        int | None, typer.Option(help="Records per fetch (default: Batching's).")
    ] = None,
    batch_wait_ms: Annotated[
        int,
        typer.Option(
            min=0,
            help="At low rates, let each fetch wait up to this many ms for a larger batch: "
            "fewer round trips and less CPU per record, for up to that much latency per hop "
            "(0, the default: a fetch answers as soon as a record is there).",
        ),
    ] = 0,
    state_dir: Annotated[
        Path | None, typer.Option(help="Keep state tables in RocksDB here (default: memory).")
    ] = None,
    session_timeout_ms: Annotated[
        int, typer.Option(help="Group session timeout: how soon a silent instance is replaced.")
    ] = 10_000,
    offset_reset: Annotated[
        str,
        typer.Option(
            help="When a position is gone from the log (retention, deleted records): 'fail' "
            "stops with an error (default); 'earliest' or 'latest' skip on, counted and logged."
        ),
    ] = "fail",
    unreachable_after: Annotated[
        float,
        typer.Option(
            help="Seconds without any reachable broker before the stage logs an "
            "ERROR and is not ready (it keeps retrying)."
        ),
    ] = 30.0,
    http: Annotated[
        str | None,
        typer.Option(
            help="Serve /metrics (Prometheus), /health and /ready at HOST:PORT "
            "(e.g. 127.0.0.1:9400; port 0 picks a free one, logged at start)."
        ),
    ] = None,
    trace: Annotated[
        bool,
        typer.Option(
            help="An OpenTelemetry span per record, joined to its traceparent "
            "(needs the otel extra; the SDK and exporter are the application's)."
        ),
    ] = False,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run one stage (N copies = N competing consumers), or --all stages for development."""
    from pipeline.ops.http import parse_address
    from pipeline.runtime.offsets import OffsetReset
    from pipeline.runtime.runner import RunOptions, run_stages

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    pipeline = load_pipeline(ref)
    if all_stages and stage:
        raise ConfigError("--all runs every stage: give either --all or --stage NAME, not both")
    if schedule and (stage or all_stages):
        raise ConfigError("--schedule runs a schedule's replica on its own: no --stage or --all")
    if schedule:
        _run_schedules(pipeline, schedule, bootstrap, session_timeout_ms)
        return
    if not all_stages and not stage:
        raise ConfigError("say what to run: --stage NAME (repeatable), --all, or --schedule NAME")
    names = [s.name for s in pipeline.stages] if all_stages else list(stage or [])
    options = RunOptions(
        batching=_batching(max_records, batch_wait_ms),
        shutdown_timeout=shutdown_timeout,
        stats_file=stats_file,
        state_dir=state_dir,
        session_timeout_ms=session_timeout_ms,
        offset_reset=OffsetReset.parse(offset_reset),
        unreachable_after=unreachable_after,
        http=parse_address(http) if http else None,
        tracing=trace,
    )
    address = bootstrap_address(bootstrap)
    # Stage resources that open their own clients (e.g. an enrich table) find the broker here.
    os.environ["PIPELINE_BOOTSTRAP"] = address.bootstrap
    logging.getLogger("pipeline").info("Kafka at %s", address.describe())
    try:
        stats = asyncio.run(run_stages(pipeline, names, address, options=options))
    except AuthorizationError as exc:
        if address.security.principal:  # say who was refused (the password never)
            exc.context.setdefault("principal", address.security.principal)
        raise
    for s in stats:  # one JSON line per stage, never wrapped
        sys.stderr.write(json.dumps(s.as_dict()) + "\n")


def _batching(max_records: int | None, wait_ms: int) -> Batching:
    """The worker's batching from ``pipeline run``'s options (Batching's defaults else)."""
    from pipeline.runtime.transport import Batching

    batching = Batching()
    if max_records:
        batching = dataclasses.replace(batching, max_records=max_records)
    if wait_ms:  # the broker holds a fetch until a batch's worth of bytes, or wait_ms
        batching = dataclasses.replace(batching, fetch_wait_ms=wait_ms, fetch_min_bytes=1 << 20)
    return batching


def _run_schedules(
    pipeline: Pipeline, names: list[str], bootstrap: str | None, session_timeout_ms: int
) -> None:
    from pipeline.runtime.scheduler import run_schedules

    schedules = [pipeline.schedule(name) for name in names]  # unknown names fail here
    address = bootstrap_address(bootstrap)
    logging.getLogger("pipeline").info("Kafka at %s", address.describe())
    stats = asyncio.run(
        run_schedules(pipeline, schedules, address, session_timeout_ms=session_timeout_ms)
    )
    for s in stats:
        sys.stderr.write(json.dumps(s.as_dict()) + "\n")


def graph(ref: Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")]) -> None:
    """Print the topology: stages, their topics and groups."""
    pipeline = load_pipeline(ref)
    out.print(
        f"[bold]pipeline {pipeline.name}[/]  ({pipeline.delivery.value}, "
        f"{pipeline.topics.partitions} partitions, sequence key '{pipeline.key}')"
    )
    sources = pipeline.priority.lanes if pipeline.priority else ((pipeline.source, 1),)
    out.print("  source  " + ", ".join(
        topic if len(sources) == 1 else f"{topic} (weight {w})" for topic, w in sources
    ))  # fmt: skip
    for node in pipeline.nodes():
        st = node.stage
        extra = f", concurrency {st.concurrency}" if st.concurrency > 1 else ""
        schemas = f"{st.input} -> {st.output or '(sink)'}{extra}"
        out.print(f"  [bold]{node.index + 1}. {escape(node.label)}[/]  {schemas}")
        out.print(f"       in {node.input_topic}   out {node.output_topic or '-'}")
        out.print(f"       dlq {node.dlq_topic}   state {node.state_topic}   group {node.group}")


def topics_create(
    ref: Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")],
    bootstrap: BootstrapOpt = None,
) -> None:
    """Create the pipeline's topics (source, outputs, dead letters, state); check existing ones."""
    from pipeline.runtime.topics import ensure_topics, topic_specs

    pipeline = load_pipeline(ref)
    specs = topic_specs(pipeline)
    created = asyncio.run(ensure_topics(bootstrap_address(bootstrap), specs))
    for spec in specs:
        mark = "created" if spec.name in created else "exists "
        out.print(f"{mark} {spec.name} ({spec.role}, {spec.partitions} partitions)")


def publish(
    topic: Annotated[str, typer.Argument()],
    file: Annotated[Path, typer.Argument(metavar="FILE.jsonl", exists=True, dir_okay=False)],
    schema: Annotated[str, typer.Option(help="Full name of the input schema.")],
    key: Annotated[
        str | None,
        typer.Option(help="Sequence-key field (default: the schema's 'sequence_key' attribute)."),
    ] = None,
    schemas: SchemasOpt = Path("schemas"),
    bootstrap: BootstrapOpt = None,
) -> None:
    """Publish one event per JSON line; report sent and rejected lines (with reasons)."""
    from pipeline.publish import Publisher
    from pipeline.schema import SchemaStore

    store = SchemaStore.from_directory(schemas)
    codec = store.codec(schema)
    raw = codec.schema.raw
    key_field = key or (raw.get("sequence_key") if isinstance(raw, dict) else None)
    if not key_field:
        raise ConfigError(f'no sequence key: pass --key FIELD (or add "sequence_key" to {schema})')
    rejected: list[tuple[int, str]] = []
    total = sum(1 for _ in file.open("rb"))

    address = bootstrap_address(bootstrap)

    took = 0.0

    async def go() -> int:
        nonlocal took
        async with Publisher(address, topic, codec, key_field) as pub:
            began = time.monotonic()
            with Progress(
                TextColumn("publishing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=err,
                transient=False,
            ) as bar:
                task = bar.add_task("publish", total=total)
                with file.open(encoding="utf-8") as lines:
                    for lineno, line in enumerate(lines, 1):
                        if lineno % 1000 == 0:  # the bar's lock and refresh, not per line
                            bar.update(task, completed=lineno)
                        if not line.strip():
                            continue
                        try:
                            pub.buffer(json.loads(line))
                            if lineno % pub.batch_records == 0:
                                await pub.flush()
                        except json.JSONDecodeError as exc:
                            rejected.append(
                                (lineno, f"invalid JSON: {exc.msg} at column {exc.colno}")
                            )
                        except CodecError as exc:
                            rejected.append((lineno, str(exc)))
                bar.update(task, completed=total)
            await pub.flush()
            took = time.monotonic() - began
            return pub.sent

    sent = asyncio.run(go())
    rate = f" ({sent / took:,.0f} records/s)" if took > 0 else ""
    out.print(f"sent {sent}, rejected {len(rejected)} to {topic} in {took:.1f}s{rate}")
    for lineno, reason in rejected[:50]:
        out.print(f"  line {lineno}: {reason}", highlight=False)
    if len(rejected) > 50:
        out.print(f"  ... and {len(rejected) - 50} more")
    if rejected:
        raise typer.Exit(2)


def tail(
    topic: Annotated[str, typer.Argument()],
    schemas: SchemasOpt = Path("schemas"),
    limit: Annotated[int, typer.Option(help="Stop after N records (0: no limit).")] = 20,
    follow: Annotated[
        bool,
        typer.Option(help="Keep waiting for new records (Ctrl-C stops); else stop at the end."),
    ] = False,
    from_beginning: Annotated[bool, typer.Option(help="Start at the oldest record.")] = True,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Print a topic's records, decoded (raw bytes when they are not valid records)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from pipeline.record import SEQ_HEADER, decode_seq
    from pipeline.schema import SchemaStore

    store = SchemaStore.from_directory(schemas)
    address = bootstrap_address(bootstrap)

    def decode(data: bytes | None) -> Any:
        schema = store.by_fingerprint(data[2:10]) if data and len(data) >= 10 else None
        if schema is None:
            return f"<{len(data or b'')} raw bytes: {(data or b'')[:40]!r}>"
        try:
            return store.codec(schema.name).decode(data)  # type: ignore[arg-type]
        except DecodeError as exc:
            return f"<undecodable: {exc}>"

    async def go() -> None:
        consumer = AIOKafkaConsumer(
            **address.client_args(), enable_auto_commit=False, isolation_level="read_committed"
        )
        await start_client(consumer, address, f"reading topic {topic}")
        shown = 0
        try:
            known = await consumer._client.fetch_all_metadata()
            parts = known.partitions_for_topic(topic)
            if parts is None:
                raise TopicError(f"topic {topic} does not exist", topic=topic)
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            if from_beginning:
                await consumer.seek_to_beginning(*tps)
            else:
                await consumer.seek_to_end(*tps)
            # Without --follow, stop at the end the topic has now.
            ends = await consumer.end_offsets(tps)
            while not limit or shown < limit:
                positions = [await consumer.position(tp) for tp in tps]
                if not follow and all(p >= ends[tp] for p, tp in zip(positions, tps, strict=True)):
                    return
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        seq = dict(r.headers).get(SEQ_HEADER)
                        key = (r.key or b"").decode(errors="replace")
                        shown_seq = decode_seq(seq) if seq else "-"
                        out.print(
                            f"{r.partition}@{r.offset} key={key} seq={shown_seq} {decode(r.value)}",
                            highlight=False,
                        )
                        shown += 1
                        if limit and shown >= limit:
                            return
        finally:
            await consumer.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())


ImageOpt = Annotated[str, typer.Option(help="Container image with the project installed.")]


def deploy_compose(
    ref: Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")],
    image: ImageOpt = "kafka-pipeline:latest",
    setup: Annotated[
        list[str] | None,
        typer.Option(
            help="A shell command the one-shot setup service runs after creating "
            "the topics (e.g. seeding a table); repeatable."
        ),
    ] = None,
) -> None:
    """Print a docker-compose file: Kafka, a setup job, one service per stage."""
    from pipeline.deploy import compose, to_yaml

    doc = compose(load_pipeline(ref), ref, image=image, setup=tuple(setup or ()))
    sys.stdout.write(to_yaml([doc]))


def deploy_k8s(
    ref: Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")],
    image: ImageOpt = "kafka-pipeline:latest",
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap inside the cluster.")] = (
        "kafka:9092"
    ),
    secure: Annotated[
        bool,
        typer.Option(
            help="SASL_SSL, each stage as its own principal (pipeline acl); passwords and CA "
            "from Secrets '<stage>-kafka' and 'kafka-ca' (referenced, never inlined)."
        ),
    ] = False,
) -> None:
    """Print per stage a Deployment (probes, resources) and a KEDA ScaledObject on its lag."""
    from pipeline.deploy import kubernetes, to_yaml

    docs = kubernetes(load_pipeline(ref), ref, image=image, bootstrap=bootstrap, secure=secure)
    sys.stdout.write(to_yaml(docs))
