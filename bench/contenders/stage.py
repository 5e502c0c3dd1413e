"""The framework contender: a ``@stage`` in a :class:`Pipeline`, run by ``run_stages``.

The stage runs exactly as ``pipeline run`` runs it, in this process. The only instrument is a
subclass of :class:`KafkaTransport` that notes when the first records arrive and what each
commit covers; it adds one call per fetched batch and per commit, nothing per record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any
from unittest import mock

from bench import common, workload
from pipeline.dsl import Pipeline, TopicPolicy
from pipeline.priority import Priority
from pipeline.runtime import runner
from pipeline.runtime.runner import RunOptions, run_stages
from pipeline.runtime.stats import StageStats
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.runtime.transport import Batching
from pipeline.schema import SchemaStore
from pipeline.security import Bootstrap
from pipeline.stage import CrashPolicy, DedupPolicy, Stage, stage

STAGE_NAME = "price"


def timed_transport(base: type[Any], probe: common.Probe) -> type[Any]:
    """A subclass of the runner's transport that reports first records and commits."""

    class TimedTransport(base):  # type: ignore[misc]
        async def fetch(self, *args: Any, **kwargs: Any) -> Mapping[Any, list[Any]]:
            batches: Mapping[Any, list[Any]] = await super().fetch(*args, **kwargs)
            if batches:
                probe.received()
            return batches

        async def commit(self, offsets: Mapping[Any, int], *args: Any, **kwargs: Any) -> Any:
            out = await super().commit(offsets, *args, **kwargs)
            topic = self.input_topic  # priority lanes: several transports, one per topic
            probe.committed({_partition_key(topic, tp): o for tp, o in offsets.items()})
            return out

    return TimedTransport


def _partition_key(topic: str, tp: Any) -> tuple[str, int]:
    """Offsets come keyed by topic-partition, or by partition number of the input topic."""
    return (topic, tp) if isinstance(tp, int) else (tp.topic, tp.partition)


@contextlib.contextmanager
def instrumented(probe: common.Probe) -> Iterator[None]:
    """Make ``run_stages`` build its transports as :func:`timed_transport` ones."""
    base = getattr(runner, "KafkaTransport", None)
    if not isinstance(base, type) or not all(hasattr(base, m) for m in ("fetch", "commit")):
        raise RuntimeError(
            "pipeline.runtime.runner no longer builds a KafkaTransport with fetch() and "
            "commit(); update bench/contenders/stage.py to instrument the new construction point"
        )
    with mock.patch.object(runner, "KafkaTransport", timed_transport(base, probe)):
        yield


async def run_stage(
    bootstrap: Bootstrap,
    *,
    source: str | Priority,
    store: SchemaStore,
    stage: Stage,
    target: int,
    partitions: int,
    topics: common.Topics,
    batching: Batching = Batching(),
    label: str = "stage",
    time_limit: float = 600,
    ops: bool = False,
    wrap: Callable[[Awaitable[list[StageStats]]], Awaitable[list[StageStats]]] | None = None,
) -> common.RunResult:
    """Run ``stage`` over ``source`` until its commits cover ``target`` records.

    Args:
        time_limit: Give up (and report an error) after this many seconds.
        ops: Serve the HTTP surface (``/metrics`` on a free port) and make a span per record.
        wrap: Runs the worker coroutine (e.g. under a profiler); called with it, awaited.
    """
    pipeline = Pipeline(
        common.unique("stage"),
        source=source,
        key=workload.KEY_FIELD,
        schemas=store,
        topics=TopicPolicy(partitions=partitions),
    ).then(stage)
    lanes = pipeline.lanes_of(stage.name)
    node = lanes[-1]  # with priority lanes: the lightest (the one a bench loads)
    assert node.output_topic is not None
    topics.adopt(node.output_topic, *(t for n in lanes for t in (n.dlq_topic, n.state_topic)))
    # The framework creates its topics as it would at start-up; waiting for them here keeps
    # a new topic's first leader election out of the timed window, as for every contender.
    await ensure_topics(bootstrap, topic_specs(pipeline))
    await common.wait_for_topic(bootstrap, node.output_topic, partitions)
    result = common.RunResult(label, notes={"output_topic": node.output_topic})
    probe = common.Probe(target)
    options = RunOptions(
        batching=batching,
        shutdown_timeout=60,
        http=("127.0.0.1", 0) if ops else None,
        tracing=ops,
    )
    warnings_before, common.TALLY.first = common.TALLY.count, []
    try:
        with instrumented(probe):
            work = run_stages(pipeline, [stage.name], bootstrap, options=options, stop=probe.done)
            watchdog = asyncio.get_running_loop().call_later(time_limit, probe.done.set)
            try:
                stats = await (wrap(work) if wrap is not None else work)
            finally:
                watchdog.cancel()
        result.seconds = probe.seconds()
        result.records = probe.total
        result.timed_records = probe.at_end
        result.notes["stats"] = stats[0].as_dict() if stats else None
        result.notes["framework_warnings"] = common.TALLY.since(warnings_before)
    except Exception as exc:  # report it, let the other contenders run
        result.error = common.describe(exc)
        return result
    await common.verify(bootstrap, result, node.output_topic, node.group, node.input_topic)
    result.notes["state_topic_records"] = await common.end_offsets(bootstrap, node.state_topic)
    return result


def sync_price_stage(*, dedup: bool = False, crash_guard: bool = True) -> Stage:
    """The throughput stage: decode, :func:`~bench.workload.transform`, encode.

    Args:
        dedup: Keep the default dedup policy; otherwise dedup is off, so that the stage does
            exactly what the baselines do.
        crash_guard: Keep the default crash-loop protection (on), or turn it off.
    """

    @stage(
        STAGE_NAME, input=workload.ORDER, output=workload.ORDER, dedup=_dedup(dedup),
        crash=CrashPolicy() if crash_guard else CrashPolicy.off(),
    )  # fmt: skip
    def price(order: dict[str, Any]) -> dict[str, Any]:
        return workload.transform(order)

    return price


def sleepy_stage(concurrency: int, sleep: float, *, dedup: bool = False) -> Stage:
    """An async stage that waits ``sleep`` seconds per record (a call to a slow service)."""

    @stage(
        STAGE_NAME,
        input=workload.ORDER,
        output=workload.ORDER,
        concurrency=concurrency,
        dedup=_dedup(dedup),
    )
    async def price(order: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(sleep)
        return workload.transform(order)

    return price


def _dedup(default: bool) -> DedupPolicy:
    return DedupPolicy() if default else DedupPolicy.off()


async def on_each_target(
    bench: str,
    targets: Mapping[str, tuple[Bootstrap, common.Topics]],
    *,
    records: int,
    keys: int,
    partitions: int,
    repeat: int,
) -> dict[str, Any]:
    """The same sync stage on each target (a broker or cluster and its topics): pre-load the
    same input on each, then run alternating ``repeat`` times; the summaries by target."""
    from bench import report

    store = workload.schema_store()
    sources = {}
    for name, (address, where) in targets.items():
        source = common.unique(f"{bench}-{name}")
        await where.create(source)
        seconds = await common.preload(address, source, store, records, keys)
        sources[name] = source
        print(f"[{bench}] pre-loaded {records:,} records on {name} in {seconds:.1f}s")

    async def run_one(name: str) -> common.RunResult:
        address, where = targets[name]
        return await run_stage(
            address, source=sources[name], store=store, stage=sync_price_stage(),
            target=records, partitions=partitions, topics=where, label=name,
        )  # fmt: skip

    runs = await common.alternate(bench, tuple(targets), repeat, run_one)
    return {name: report.summarize(results) for name, results in runs.items()}


async def compare_targets(
    bench: str,
    targets: Mapping[str, tuple[Bootstrap, common.Topics]],
    described: Mapping[str, str],
    *,
    contender: str,
    baseline: str,
    records: int,
    keys: int,
    partitions: int,
    repeat: int,
    results: Any,
) -> dict[str, Any]:
    """:func:`on_each_target`, then the benchmark's document (ratio ``contender`` /
    ``baseline``, the conditions with ``described`` saying what each target is), printed and
    written to ``results``."""
    from bench import report

    load_at_start = common.load_average()
    summaries = await on_each_target(
        bench, targets, records=records, keys=keys, partitions=partitions, repeat=repeat
    )
    doc = {
        "benchmark": bench,
        "ratio": report.ratio(summaries, contender, baseline),
        "ratio_of_medians": report.ratio(summaries, contender, baseline, "median"),
        "conditions": {
            "records": records,
            "record_bytes_mean": round(common.record_bytes(workload.schema_store(), keys=keys), 1),
            "partitions": partitions,
            "keys": keys,
            "repeat": repeat,
            "stage": "sync price stage, dedup off, at-least-once (acks=all, idempotent)",
            **described,
            "timing": "first records received -> commit covering the last record",
            "load_average_1_5_15min_at_start": load_at_start,
            **common.machine(),
        },
        "contenders": summaries,
    }
    title = f"{bench}: {records:,} records, {partitions} partitions, one stage; best of {repeat}"
    report.finish(bench, doc, title, contender, baseline, results)
    return doc
