"""The framework stage run with a chosen delivery guarantee, and a clock on its commits.

The same ``price`` stage as ``stage_throughput`` (dedup off unless asked), in a
``Pipeline(..., delivery=...)`` run by ``run_stages``. The transport is instrumented like the
``stage`` contender's (first records, commits covering the input), plus a :class:`CommitClock`
that notes, per call and never per record, how long fetches, commits and (exactly-once) each
transaction and its phases take. The output is read back afterwards (``read_committed`` for
exactly-once) and counted: every input's ``event-id`` must be there exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import common, workload
from bench.contenders.stage import sleepy_stage, sync_price_stage, timed_transport
from pipeline.dsl import Pipeline, TopicPolicy
from pipeline.record import ID_HEADER
from pipeline.runtime import runner
from pipeline.runtime.runner import RunOptions, run_stages
from pipeline.runtime.stats import StageStats
from pipeline.runtime.topics import ensure_topics, topic_specs
from pipeline.runtime.transactions import PartitionProducers
from pipeline.runtime.transport import Batching
from pipeline.schema import SchemaStore

#: The transactional producer's calls timed one by one (the rest of a transaction is the
#: flush of its buffered records: AddPartitionsToTxn, produce, acks).
TXN_PHASES = ("begin_transaction", "send_offsets_to_transaction", "commit_transaction")


@dataclass
class CommitClock:
    """Where a run's wall time goes, measured per fetch, per commit and per transaction.

    Only calls inside the timed window (after the first records arrived, until the commit
    that covers the last record) are counted.
    """

    probe: common.Probe
    fetch_s: float = 0.0
    fetches: int = 0
    commit_ms: list[float] = field(default_factory=list)
    txn_ms: list[float] = field(default_factory=list)
    txn_records: list[int] = field(default_factory=list)  # buffered outputs + changelog
    txn_first: list[bool] = field(default_factory=list)  # the first of its producer
    offsets_s: float = 0.0  # at-least-once: the consumer's offset commit inside commit()
    cpu_first: float | None = None  # process CPU time when the first records arrived
    cpu_end: float | None = None  # ... and when the commit covering the last record returned
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TXN_PHASES, 0.0))

    def in_window(self, began: float) -> bool:
        t_end = self.probe.t_end
        return self.probe.t_first is not None and (t_end is None or began <= t_end)

    def summary(self, seconds: float | None) -> dict[str, Any]:
        wall = seconds or 0.0
        commit_s = sum(self.commit_ms) / 1000
        out: dict[str, Any] = {
            "commits": len(self.commit_ms),
            "commits_per_s": _per_s(len(self.commit_ms), wall),
            "commit_ms_mean": _mean(self.commit_ms),
            "commit_ms_p50": _pct(self.commit_ms, 50),
            "commit_ms_p95": _pct(self.commit_ms, 95),
            "share_of_wall_in_commit": _share(commit_s, wall),
            "share_of_wall_in_fetch": _share(self.fetch_s, wall),
            "share_of_wall_elsewhere": _share(wall - commit_s - self.fetch_s, wall),
            "fetches": self.fetches,
            "records_per_commit": round(self.probe.target / len(self.commit_ms), 1)
            if self.commit_ms
            else None,
        }
        if self.cpu_first is not None and self.cpu_end is not None and wall:
            cpu = self.cpu_end - self.cpu_first
            out["cpu_seconds"] = round(cpu, 3)
            out["cpu_share_of_wall"] = round(cpu / wall, 3)
            out["cpu_us_per_record"] = round(cpu * 1e6 / self.probe.target, 2)
        if self.offsets_s and self.commit_ms:
            per_commit = self.offsets_s * 1000 / len(self.commit_ms)
            out["commit_phase_ms_mean"] = {
                "flush outputs + changelog": round((_mean(self.commit_ms) or 0.0) - per_commit, 3),
                "commit offsets": round(per_commit, 3),
            }
        if self.txn_ms:
            txn_s = sum(self.txn_ms) / 1000
            later = [t for t, first in zip(self.txn_ms, self.txn_first, strict=True) if not first]
            phases = {k: round(v * 1000 / len(self.txn_ms), 3) for k, v in self.phase_s.items()}
            flush_ms = (txn_s - sum(self.phase_s.values())) * 1000 / len(self.txn_ms)
            out["transactions"] = {
                "count": len(self.txn_ms),
                "per_s": _per_s(len(self.txn_ms), wall),
                "per_commit": round(len(self.txn_ms) / max(1, len(self.commit_ms)), 2),
                "ms_mean": _mean(self.txn_ms),
                "ms_p50": _pct(self.txn_ms, 50),
                "ms_p95": _pct(self.txn_ms, 95),
                "ms_max": round(max(self.txn_ms), 3),
                "first_per_producer_ms_mean": _mean(
                    [t for t, first in zip(self.txn_ms, self.txn_first, strict=True) if first]
                ),
                "later_ms_p50": _pct(later, 50),
                "later_ms_p95": _pct(later, 95),
                "later_over_50ms": sum(t > 50 for t in later),
                "records_mean": round(statistics.fmean(self.txn_records), 1),
                "share_of_wall": _share(txn_s, wall),
                "phase_ms_mean": {**phases, "flush_outputs (the rest)": round(flush_ms, 3)},
            }
        return out


def _per_s(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds else None


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, len(ordered) * q // 100)], 3)


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 3) if whole else None


def clocked_transport(base: type[Any], clock: CommitClock) -> type[Any]:
    """:func:`timed_transport` plus the :class:`CommitClock` (one call per batch, per commit)."""
    timed = timed_transport(base, clock.probe)
    perf = time.monotonic
    seen: set[int] = set()  # transactional producers that ran a transaction already

    class ClockedTransport(timed):  # type: ignore[misc,valid-type]
        async def fetch(self, *args: Any, **kwargs: Any) -> Any:
            started, t0 = clock.probe.t_first is not None, perf()
            out = await super().fetch(*args, **kwargs)
            if not started and clock.probe.t_first is not None:
                clock.cpu_first = time.process_time()
            if started and clock.probe.t_end is None:
                clock.fetch_s += perf() - t0
                clock.fetches += 1
            return out

        async def commit(self, *args: Any, **kwargs: Any) -> Any:
            t0, ended = perf(), clock.probe.t_end is not None
            out = await super().commit(*args, **kwargs)
            if not ended and clock.probe.t_end is not None:
                clock.cpu_end = time.process_time()
            if clock.in_window(t0):
                clock.commit_ms.append((perf() - t0) * 1000)
            return out

        async def _commit_offsets(self, *args: Any) -> Any:
            t0 = perf()
            out = await super()._commit_offsets(*args)
            if clock.in_window(t0):
                clock.offsets_s += perf() - t0
            return out

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            txn = self._txn  # the partition producers (pipeline.runtime.transactions)
            transaction = txn._transaction

            async def timed_transaction(producer: Any, writer: Any, *rest: Any) -> Any:
                t0, buffered = perf(), writer.buffered
                first = id(producer) not in seen
                seen.add(id(producer))
                out = await transaction(producer, writer, *rest)
                if clock.in_window(t0):
                    clock.txn_ms.append((perf() - t0) * 1000)
                    clock.txn_records.append(buffered)
                    clock.txn_first.append(first)
                return out

            txn._transaction = timed_transaction

        def _new_producer(self, partition: int | None) -> Any:
            producer = super()._new_producer(partition)
            if partition is not None:  # a transactional producer: time its phases
                for name in TXN_PHASES:
                    setattr(producer, name, _timed(getattr(producer, name), name, clock))
            return producer

    return ClockedTransport


def _timed(
    call: Callable[..., Awaitable[Any]], name: str, clock: CommitClock
) -> Callable[..., Awaitable[Any]]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await call(*args, **kwargs)
        finally:
            if clock.in_window(t0):
                clock.phase_s[name] += time.monotonic() - t0

    return timed


@contextlib.contextmanager
def instrumented(clock: CommitClock) -> Iterator[None]:
    """Make ``run_stages`` build its transports as :func:`clocked_transport` ones."""
    base = getattr(runner, "KafkaTransport", None)
    needed = ("fetch", "commit", "_new_producer", "_commit_offsets")
    if (
        not isinstance(base, type)
        or not all(hasattr(base, m) for m in needed)
        or not hasattr(PartitionProducers, "_transaction")
    ):
        raise RuntimeError(
            "pipeline.runtime.runner.KafkaTransport no longer has "
            f"{', '.join(needed)} (or PartitionProducers its _transaction); update "
            f"bench/contenders/delivery_stage.py"
        )
    with mock.patch.object(runner, "KafkaTransport", clocked_transport(base, clock)):
        yield


async def run_delivery(
    bootstrap: str,
    *,
    source: str,
    store: SchemaStore,
    delivery: str,
    target: int,
    partitions: int,
    topics: common.Topics,
    batching: Batching = Batching(),
    dedup: bool = False,
    concurrency: int | None = None,
    label: str,
    time_limit: float = 600,
    wrap: Callable[[Awaitable[list[StageStats]]], Awaitable[list[StageStats]]] | None = None,
) -> common.RunResult:
    """Run the price stage with ``delivery`` over ``source`` until commits cover ``target``
    (with ``concurrency``: the I/O-bound async stage, 5 ms per record, in key lanes)."""
    if concurrency:
        stage = sleepy_stage(concurrency, 0.005, dedup=dedup)
    else:
        stage = sync_price_stage(dedup=dedup)
    pipeline = Pipeline(
        common.unique("dlv"),
        source=source,
        key=workload.KEY_FIELD,
        schemas=store,
        topics=TopicPolicy(partitions=partitions),
        delivery=delivery,
    ).then(stage)
    node = pipeline.node(stage.name)
    assert node.output_topic is not None
    topics.adopt(node.output_topic, node.dlq_topic, node.state_topic)
    await ensure_topics(bootstrap, topic_specs(pipeline))
    await common.wait_for_topic(bootstrap, node.output_topic, partitions)
    result = common.RunResult(label, notes={"output_topic": node.output_topic})
    clock = CommitClock(common.Probe(target))
    options = RunOptions(batching=batching, shutdown_timeout=60)
    warnings_before, common.TALLY.first = common.TALLY.count, []
    try:
        with instrumented(clock):
            done = clock.probe.done
            work = run_stages(pipeline, [stage.name], bootstrap, options=options, stop=done)
            watchdog = asyncio.get_running_loop().call_later(time_limit, done.set)
            try:
                stats = await (wrap(work) if wrap is not None else work)
            finally:
                watchdog.cancel()
        result.seconds = clock.probe.seconds()
        result.records = clock.probe.total
        result.timed_records = clock.probe.at_end
        result.notes["clock"] = clock.summary(result.seconds)
        result.notes["stats"] = stats[0].as_dict() if stats else None
        result.notes["framework_warnings"] = common.TALLY.since(warnings_before)
    except Exception as exc:  # report it, let the other runs go on
        result.error = common.describe(exc)
        return result
    isolation = "read_committed" if delivery == "exactly_once" else "read_uncommitted"
    check = await read_back(bootstrap, node.output_topic, isolation, target)
    result.output_records = check["records"]
    result.committed_records = await common.committed(bootstrap, node.group, source)
    result.notes["read_back"] = check
    result.notes["output_end_offsets"] = await common.end_offsets(bootstrap, node.output_topic)
    return result


async def read_back(
    bootstrap: str, topic: str, isolation: str, expected: int, limit: float = 120
) -> dict[str, Any]:
    """Read ``topic`` to its end with ``isolation``; count records and distinct event ids."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level=isolation,
        max_poll_records=10_000,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    records, ids, no_id = 0, set(), 0
    t0 = time.monotonic()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)  # read_committed: the last stable offset
        while time.monotonic() - t0 < limit:
            if all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                break
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for msgs in batches.values():
                for msg in msgs:
                    records += 1
                    eid = next((v for k, v in msg.headers if k == ID_HEADER), None)
                    if eid is None:
                        no_id += 1
                    else:
                        ids.add(eid)
    finally:
        await consumer.stop()
    distinct = len(ids) + no_id
    return {
        "isolation": isolation,
        "records": records,
        "distinct_event_ids": len(ids),
        "duplicates": records - distinct,
        "exactly_n": records == expected == distinct,
        "seconds": round(time.monotonic() - t0, 2),
    }
