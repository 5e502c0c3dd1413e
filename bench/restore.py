"""Benchmark ``restore``: how fast a stage rebuilds a 1,000,000-key table from its changelog.

A changelog topic in the ``P.S.state`` layout (compacted, co-partitioned, 3 partitions) is
filled once with the dedup-by-sequence entries of 1,000,000 distinct keys, encoded as
:mod:`pipeline.runtime.state` writes them: ``SEQ_PREFIX + key ->
writers.encode((writer, position(seq, 0), seen_ms))`` (one writer per key), each on the
partition of its key (murmur2). Then, in rotated order:

- ``raw_read``: the baseline, the client's ceiling: per partition, a fresh aiokafka consumer
  with the framework's restore settings reads the partition to its end and applies nothing;
- ``transport_read``: the framework's read path alone (``KafkaTransport.restore``, no apply);
- ``memory``: a real stage worker (``run_stages``) on a pipeline whose ``state_topic`` is the
  filled topic, in-memory stores: assignment -> ``_restore`` -> ``PartitionTable.apply``;
  the figure is the worker's own ``stats.restored`` / ``stats.restore_seconds``;
- ``rocks``: the same with ``RocksStores`` (``RunOptions(state_dir=...)``, no checkpoint, so
  a full restore).

``raw_all_partitions`` (one consumer reading the three partitions together) and an in-process
``apply`` timing (``PartitionTable.apply`` over the same records, no broker) are informational.
``ratio`` = memory / raw_read (best runs); ``ratio_rocks`` = rocks / raw_read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bench import common, report, workload
from bench.contenders.restore_paths import (
    apply_timing,
    changelog_record,
    create_changelog,
    fill_changelog,
    raw_read,
    transport_read,
    worker_restore,
)

NAME = "restore"
STORES = ("memory", "rocks")
BASELINE = "raw_read"


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    keys: int = 1_000_000
    partitions: int = 3
    repeat: int = 2
    stores: tuple[str, ...] = STORES
    all_partitions: bool = True  # the informational one-consumer read
    apply_timing: bool = True  # the informational in-process apply timing
    results: Path = common.RESULTS


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    load_at_start = common.load_average()
    store = workload.schema_store()
    changelog, source = common.unique("restore-state"), common.unique("restore-in")
    await create_changelog(bootstrap, source, changelog, store, config.partitions, topics)
    fill_s, fill_bytes = await fill_changelog(bootstrap, changelog, config.keys, config.partitions)
    total = await common.end_offsets(bootstrap, changelog)
    print(
        f"[{NAME}] filled {changelog} with {total:,} changelog records "
        f"({fill_bytes / total:.0f} B key+value each) in {fill_s:.1f}s"
    )
    order = [BASELINE, "transport_read", *config.stores]
    if config.all_partitions:
        order.append("raw_all_partitions")
    runs: dict[str, list[common.RunResult]] = {name: [] for name in order}
    for r in range(config.repeat):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            result = await _run_one(name, bootstrap, changelog, source, store, config, topics)
            result.committed_records = total  # "verified": read exactly the changelog's records
            runs[name].append(result)
            _progress(result)
            await common.settle()
    summaries = {name: report.summarize(results) for name, results in runs.items()}
    applied = apply_timing(config.keys) if config.apply_timing else None
    ratio = report.ratio(summaries, "memory", BASELINE)
    doc: dict[str, Any] = {
        "benchmark": NAME,
        "ratio": ratio,
        "ratio_of_medians": report.ratio(summaries, "memory", BASELINE, "median"),
        "ratio_rocks": report.ratio(summaries, "rocks", BASELINE),
        "ratios": {
            f"{name}/{BASELINE}": report.ratio(summaries, name, BASELINE) for name in order[1:]
        },
        "restore_seconds_best": {
            name: summaries[name]["seconds"] for name in order if name in summaries
        },
        "apply_in_process": applied,
        "conditions": {
            "keys": config.keys,
            "changelog_records": total,
            "changelog_bytes_per_record": round(fill_bytes / total, 1),
            "example_record": _example(),
            "partitions": config.partitions,
            "repeat": config.repeat,
            "fill_seconds": round(fill_s, 2),
            "best_of": "highest records/s among verified runs",
            "verified": "records read or restored == records in the changelog",
            "timing": "memory/rocks: the worker's stats.restore_seconds (open store, read, "
            "apply, per partition, sequentially, as on assignment); raw/transport reads: "
            "the same per-partition loop with a fresh consumer each, timed around it",
            "broker": broker,
            "load_average_1_5_15min_at_start": load_at_start,
            **common.machine(),
            "rocksdict": _version("rocksdict"),
        },
        "contenders": summaries,
    }
    print()
    title = (
        f"{NAME}: {total:,} changelog records ({config.keys:,} keys, "
        f"{config.partitions} partitions), {doc['conditions']['cores']} cores, broker "
        f"{broker}, best and median of {config.repeat} runs, load at start {load_at_start}"
    )
    print(report.table(title, summaries, BASELINE))
    if applied:
        print("PartitionTable.apply_many alone, in process, no broker:")
        for name, a in applied.items():
            rate = f"{a['records_per_s']:>12,.0f}/s"
            print(f"  {name:<26}{a['us_per_record']:>7.3f} us/record {rate}")
    print(
        f"ratio memory/{BASELINE}: {_r(ratio)}, rocks/{BASELINE}: {_r(doc['ratio_rocks'])} "
        f"(best runs)"
    )
    path = report.write(NAME, doc, config.results)
    print(f"[{NAME}] results: {path}")
    return doc


async def _run_one(
    name: str,
    bootstrap: str,
    changelog: str,
    source: str,
    store: Any,
    config: Config,
    topics: common.Topics,
) -> common.RunResult:
    if name == BASELINE:
        return await raw_read(bootstrap, changelog, config.partitions, name, together=False)
    if name == "raw_all_partitions":
        return await raw_read(bootstrap, changelog, config.partitions, name, together=True)
    if name == "transport_read":
        return await transport_read(bootstrap, changelog, source, config.partitions, name)
    if name in STORES:
        return await worker_restore(
            bootstrap,
            changelog=changelog,
            source=source,
            store=store,
            partitions=config.partitions,
            expected=await common.end_offsets(bootstrap, changelog),
            rocks=name == "rocks",
            topics=topics,
            label=name,
        )
    raise ValueError(f"unknown restore contender {name!r}")


def _example() -> dict[str, str]:
    key, value = changelog_record(0)
    return {"key": repr(key), "value": value.hex(), "key_bytes": str(len(key))}


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _r(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _progress(result: common.RunResult) -> None:
    if result.error:
        print(f"[{NAME}] {result.contender:<18} FAILED: {result.error}")
        return
    ok = "verified" if result.verified else f"NOT VERIFIED: {result.output_records} records"
    print(
        f"[{NAME}] {result.contender:<18} {result.records_per_s or 0:>10,.0f} rec/s  "
        f"{result.records:,} records in {result.seconds or 0:.2f}s  ({ok})"
    )
