"""Run one stage (or all stages, for development) until a signal asks it to stop.

``pipeline run MODULE:PIPELINE --stage NAME`` calls :func:`run_stages` with one stage; N copies
of that command are N competing consumers in the stage's group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from pipeline.dsl import Delivery, Pipeline, StageNode
from pipeline.runtime.compensation import Compensator
from pipeline.runtime.connectivity import BrokerEpisodes, Connectivity
from pipeline.runtime.kafka_transport import KafkaTransport
from pipeline.runtime.offsets import OffsetReset
from pipeline.runtime.priority import LaneGate
from pipeline.runtime.state import RocksStores
from pipeline.runtime.stats import StageStats
from pipeline.runtime.topics import ensure_topics, stage_topic_specs
from pipeline.runtime.transport import Batching
from pipeline.runtime.worker import StageWorker
from pipeline.security import Bootstrap

log = logging.getLogger(__name__)

_STARTING = frozenset({"starting", "setup", "restoring"})


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How stage workers run.

    Example:
        >>> RunOptions(shutdown_timeout=5).create_topics
        True
    """

    batching: Batching = Batching()
    create_topics: bool = True
    shutdown_timeout: float = 30.0  # after SIGTERM: finish, commit and leave within this
    session_timeout_ms: int = 10_000
    stats_file: Path | None = None  # JSON counters, rewritten every stats_interval
    stats_interval: float = 1.0
    state_dir: Path | None = None  # RocksDB local stores here; None keeps state in memory
    offset_reset: OffsetReset = OffsetReset()  # a position gone from the log: stop (default)
    unreachable_after: float = 30.0  # no broker for this long: log at ERROR, not ready
    http: tuple[str, int] | None = None  # serve /metrics, /health, /ready here (port 0: any)
    tracing: bool = False  # an OpenTelemetry span per record (pipeline.ops.tracing)


async def run_stages(
    pipeline: Pipeline,
    stage_names: list[str],
    bootstrap: Bootstrap,
    *,
    options: RunOptions = RunOptions(),
    stop: asyncio.Event | None = None,
    on_stats: Callable[[list[StageStats]], None] | None = None,
) -> list[StageStats]:
    """Run the named stages in this process until ``stop`` is set (or SIGTERM/SIGINT).

    Raises:
        DefinitionError: An unknown stage name.
        TopicError: A topic that breaks co-partitioning (or is missing with
            ``create_topics=False``).
        BrokerUnavailableError: No broker answers.
        FencedError: Another instance took over (exactly-once): this one is a zombie.
        OffsetOutOfRangeError: A position is gone from the log (see ``offset_reset``).
        AuthenticationError: The connection's credentials, certificate or protocol refused.
        AuthorizationError: The stage's principal lacks an ACL it needs.
    """
    nodes = [node for name in stage_names for node in pipeline.lanes_of(name)]
    _quiet_abandoned_kafka_futures()
    # Only the topics these stages read and own: a stage run with its own principal may see
    # nothing else (pipeline acl), and another stage's topics are that stage's to create.
    await ensure_topics(bootstrap, stage_topic_specs(pipeline, nodes), create=options.create_topics)
    stop = stop or asyncio.Event()
    workers: list[StageWorker] = []
    async with contextlib.AsyncExitStack() as surface:
        url = None
        if options.http is not None:
            from pipeline.ops.http import serve  # aiohttp only when asked for

            # Listening first: the workers tell their group where (``pipeline status`` asks
            # each member's /health there); the surface serves the list once it is filled.
            jobs = None if pipeline.jobs is None else (bootstrap, pipeline.jobs.status)
            url = await surface.enter_async_context(serve(workers, *options.http, jobs=jobs))
        gates = {  # the priority lanes of a stage take turns (pipeline.priority)
            name: LaneGate(
                {n.lane: n.weight for n in lanes if n.lane}, options.batching.max_records
            )
            for name in stage_names
            if len(lanes := pipeline.lanes_of(name)) > 1
        }
        workers.extend(
            _worker(pipeline, node, bootstrap, options, url, gates.get(node.name)) for node in nodes
        )
        # A stage with compensate= undoes its part of records dead-lettered later, beside it
        # (one compensator per stage, whatever its lanes).
        compensating = {n.compensate_topic: n for n in nodes if n.compensate_topic}
        helpers = [Compensator(pipeline, n, bootstrap).run for n in compensating.values()]
        return await _run_workers(workers, options, stop, on_stats, helpers)


async def _run_workers(
    workers: list[StageWorker],
    options: RunOptions,
    stop: asyncio.Event,
    on_stats: Callable[[list[StageStats]], None] | None,
    helpers: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, Any]]] = (),
) -> list[StageStats]:
    episodes = BrokerEpisodes.install()
    with signals(stop):
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(w.run(stop), name=f"stage-{w.node.name}") for w in workers
        ]
        tasks += [asyncio.create_task(run(stop), name="compensations") for run in helpers]
        reporter = asyncio.create_task(_report(workers, options, stop, on_stats, episodes))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if not stop.is_set():  # a worker failed: stop the others cleanly too
                stop.set()
            _, late = await asyncio.wait(tasks, timeout=options.shutdown_timeout)
            for task in late:
                log.warning(
                    "stage %s did not stop within %.0fs", task.get_name(), options.shutdown_timeout
                )
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            episodes.uninstall()
            stats = [w.stats for w in workers]
            write_stats(options.stats_file, stats)
    return stats


def _worker(
    pipeline: Pipeline,
    node: StageNode,
    bootstrap: Bootstrap,
    options: RunOptions,
    url: str | None,
    gate: LaneGate | None = None,
) -> StageWorker:
    exactly_once = pipeline.delivery is Delivery.EXACTLY_ONCE
    transport = KafkaTransport(
        bootstrap,
        group=node.group,
        input_topic=node.input_topic,
        state_topic=node.state_topic,
        exactly_once=exactly_once,
        batching=options.batching,
        session_timeout_ms=options.session_timeout_ms,
        advertise=url,
    )
    stores = RocksStores(options.state_dir) if options.state_dir else None
    return StageWorker(
        node,
        pipeline.schemas,
        transport,
        batching=options.batching,
        stores=stores,
        exactly_once=exactly_once,
        offset_reset=options.offset_reset,
        tracing=options.tracing,
        gate=gate,
    )


async def _report(
    workers: list[StageWorker],
    options: RunOptions,
    stop: asyncio.Event,
    on_stats: Callable[[list[StageStats]], None] | None,
    episodes: BrokerEpisodes,
) -> None:
    last_log = 0.0
    loop = asyncio.get_running_loop()
    links = [
        Connectivity(w.node.name, w.transport.connected, options.unreachable_after) for w in workers
    ]
    while not stop.is_set():
        await asyncio.sleep(options.stats_interval)
        episodes.tick()
        if episodes.starting and all(w.stats.state not in _STARTING for w in workers):
            episodes.starting = False  # from now on, broker errors are trouble
        for worker, link in zip(workers, links, strict=True):
            worker.stats.reachable = link.check()
            worker.stats.broker_errors = episodes.errors
        stats = [w.gauges() for w in workers]
        write_stats(options.stats_file, stats)
        if on_stats is not None:
            on_stats(stats)
        if loop.time() - last_log >= 10:
            last_log = loop.time()
            for s in stats:
                log.info("stage %s: %s", s.stage, s.summary())


def write_stats(path: Path | None, stats: list[StageStats]) -> None:
    if path is None:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps([s.as_dict() for s in stats]))
    tmp.replace(path)  # readers never see half a file


def _quiet_abandoned_kafka_futures() -> None:
    """A fenced or failed aiokafka producer leaves internal futures failed with the Kafka
    error no one awaits (its sender fails every pending batch and transaction waiter).
    asyncio would print each as a traceback on exit, after the worker already reported the
    error in one paragraph; keep those at DEBUG. Anything else goes to the default handler."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        message = str(context.get("message", ""))
        if message.startswith("Future exception was never retrieved") and isinstance(
            context.get("exception"), KafkaError
        ):
            log.debug("abandoned aiokafka future: %s", context.get("exception"))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


def dump_tasks() -> None:
    """Log where every asyncio task of the process waits (``kill -USR1 PID``): what a stuck
    stage is waiting for, without stopping it."""
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=12)
        where = " <- ".join(
            f"{f.f_code.co_name} ({Path(f.f_code.co_filename).name}:{f.f_lineno})"
            for f in reversed(frames)
        )
        log.warning("task %s: %s", task.get_name(), where or "(not started)")


@contextlib.contextmanager
def signals(stop: asyncio.Event):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    installed = []
    for sig, handler in (
        (signal.SIGTERM, stop.set), (signal.SIGINT, stop.set), (signal.SIGUSR1, dump_tasks),
    ):  # fmt: skip
        try:
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
