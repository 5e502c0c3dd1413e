"""Benchmark ``stage_throughput``: one decode-map-encode-produce-commit stage against baselines.

The input topic is pre-loaded once; every contender reads all of it with its own fresh
consumer group and writes its own fresh output topic, on the same broker, in the same run:

- ``stage``: the framework (``Pipeline | @stage``, run by ``run_stages``), deduplication off,
  so it does exactly the baselines' work;
- ``stage_dedup``: the same with the default dedup policy (informational, not in the ratio);
- ``aiokafka_avro``: the fastest hand-written aiokafka loop doing the same Avro work;
- ``aiokafka_raw``: that loop copying bytes through, no Avro (the client's ceiling);
- ``faust``: an idiomatic faust-streaming agent, in a subprocess;
- ``quix``: an idiomatic Quix Streams application, in a subprocess.

``ratio`` = stage / aiokafka_avro (best run of each). Targets: >= 0.7; faster than faust and
Quix Streams.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import common, profiling, report, workload
from bench.contenders.aiokafka_loop import run_loop
from bench.contenders.external import run_external
from bench.contenders.stage import run_stage, sync_price_stage
from pipeline.runtime.transport import Batching
from pipeline.schema import SchemaStore

NAME = "stage_throughput"
CONTENDERS = ("stage", "stage_dedup", "aiokafka_avro", "aiokafka_raw", "quix", "faust")
ONCE = frozenset({"faust"})  # ten times slower than the rest: one run says enough


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    records: int = 200_000
    partitions: int = 3
    keys: int = 10_000
    repeat: int = 3
    contenders: tuple[str, ...] = CONTENDERS
    faust_records: int | None = None  # None: all records
    warmup: bool = True  # one untimed aiokafka_avro pass first
    profile: str | None = None  # a framework contender to profile once, with pyinstrument
    results: Path = common.RESULTS


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    """Run every contender ``config.repeat`` times (faust once); return the results document."""
    load_at_start = common.load_average()
    store = workload.schema_store()
    source = common.unique("orders")
    await topics.create(source)
    preload_s = await common.preload(bootstrap, source, store, config.records, config.keys)
    print(f"[{NAME}] pre-loaded {config.records:,} records into {source} in {preload_s:.1f}s")

    warmup = None
    if config.warmup:
        # A fresh broker JVM is still compiling its hot paths for the first minute; one
        # untimed pass keeps that from landing on whichever contender happens to run first.
        warmup = await _run_one("aiokafka_avro", bootstrap, source, store, config, topics)
        print(f"[{NAME}] warm-up pass (not counted): {warmup.records_per_s or 0:,.0f} rec/s")
        await common.settle()
    runs: dict[str, list[common.RunResult]] = {c: [] for c in config.contenders}
    order = [c for c in config.contenders if c not in ONCE]
    for r in range(config.repeat):
        k = r % len(order) if order else 0
        for name in order[k:] + order[:k]:  # rotate, so no contender always runs first
            result = await _run_one(name, bootstrap, source, store, config, topics)
            runs[name].append(result)
            _progress(result)
            await common.settle()
    for name in (c for c in config.contenders if c in ONCE):
        result = await _run_one(name, bootstrap, source, store, config, topics)
        runs[name].append(result)
        _progress(result)
        await common.settle()

    summaries = {name: report.summarize(results) for name, results in runs.items()}
    doc = _document(config, broker, store, summaries, preload_s, load_at_start)
    doc["warmup"] = None if warmup is None else warmup.as_dict()
    if config.profile:
        doc["profile"] = await _profile(bootstrap, source, store, config, topics)
    print()
    print(report.table(_title(doc), summaries, "aiokafka_avro"))
    print(_ratios_text(doc))
    path = report.write(NAME, doc, config.results)
    print(f"[{NAME}] results: {path}")
    return doc


async def _run_one(
    name: str,
    bootstrap: str,
    source: str,
    store: SchemaStore,
    config: Config,
    topics: common.Topics,
    wrap: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
) -> common.RunResult:
    n = config.records
    if name in ("stage", "stage_dedup"):
        return await run_stage(
            bootstrap,
            source=source,
            store=store,
            stage=sync_price_stage(dedup=name == "stage_dedup"),
            target=n,
            partitions=config.partitions,
            topics=topics,
            label=name,
            wrap=wrap,
        )
    if name in ("aiokafka_avro", "aiokafka_raw"):
        process = workload.RawAvro(store).processor() if name == "aiokafka_avro" else None
        return await run_loop(
            bootstrap, label=name, source=source, target=n, topics=topics, process=process
        )
    if name in ("faust", "quix"):
        if name == "faust" and config.faust_records and config.faust_records < n:
            # A topic holding exactly the first faust_records records, so the run ends on a
            # record count that the broker can verify, like everyone else's.
            n = config.faust_records
            source = common.unique("orders-faust")
            await topics.create(source)
            await common.preload(bootstrap, source, store, n, config.keys)
        output, group = common.unique(f"{name}-out"), common.unique(name)
        await topics.create(output)
        if name == "faust":
            topics.adopt(f"{group}-__assignor-__leader")  # faust's own topic, for clean-up
        return await run_external(
            f"bench.contenders.{name}_app",
            label=name,
            bootstrap=bootstrap,
            source=source,
            output=output,
            group=group,
            target=n,
            time_limit=max(120.0, n / 500),
            extra={"partitions": config.partitions},
        )
    raise ValueError(f"unknown contender {name!r}; known: {', '.join(CONTENDERS)}")


async def _profile(
    bootstrap: str, source: str, store: SchemaStore, config: Config, topics: common.Topics
) -> dict[str, Any]:
    """One extra framework run under pyinstrument (its figure is not used in any ratio)."""
    if not profiling.available():
        return {"error": "pyinstrument is not installed (pip install pyinstrument)"}
    name = config.profile or "stage"
    path = config.results / f"{NAME}.profile.{name}.txt"
    wrap = profiling.profiler(path)
    result = await _run_one(name, bootstrap, source, store, config, topics, wrap=wrap)
    rate = result.records_per_s or 0
    print(f"[{NAME}] profile of one {name} run ({rate:,.0f} rec/s under the profiler): {path}")
    return {"contender": name, "file": path.name, "run": result.as_dict()}


def _document(
    config: Config,
    broker: str,
    store: SchemaStore,
    summaries: dict[str, dict[str, Any]],
    preload_s: float,
    load_at_start: list[float],
) -> dict[str, Any]:
    r = report.ratio
    batching = Batching()
    rates = {k: v["best_records_per_s"] for k, v in summaries.items()}
    stage = rates.get("stage")
    return {
        "benchmark": NAME,
        "ratio": r(summaries, "stage", "aiokafka_avro"),
        "ratio_of_medians": report.ratio(summaries, "stage", "aiokafka_avro", "median"),
        "ratios": {
            "stage/aiokafka_avro": r(summaries, "stage", "aiokafka_avro"),
            "stage/aiokafka_raw": r(summaries, "stage", "aiokafka_raw"),
            "stage/quix": r(summaries, "stage", "quix"),
            "stage/faust": r(summaries, "stage", "faust"),
            "stage_dedup/aiokafka_avro": r(summaries, "stage_dedup", "aiokafka_avro"),
            "aiokafka_avro/aiokafka_raw": r(summaries, "aiokafka_avro", "aiokafka_raw"),
        },
        "targets": {
            "ratio_at_least_0.7": _cmp(stage, rates.get("aiokafka_avro"), 0.7),
            "stage_faster_than_faust": _cmp(stage, rates.get("faust"), 1.0),
            "stage_faster_than_quix": _cmp(stage, rates.get("quix"), 1.0),
        },
        "conditions": {
            "records": config.records,
            "faust_records": min(config.faust_records or config.records, config.records),
            "record_bytes_mean": round(common.record_bytes(store, keys=config.keys), 1),
            "partitions": config.partitions,
            "keys": config.keys,
            "repeat": config.repeat,
            "best_of": "highest records/s among verified runs (faust: one run)",
            "broker": broker,
            "batching": dataclasses.asdict(batching),
            "preload_seconds": round(preload_s, 2),
            "timing": "first records received -> commit covering the last record",
            "load_average_1_5_15min_at_start": load_at_start,
            **common.machine(),
            **_versions(),
        },
        "contenders": summaries,
    }


def _cmp(a: float | None, b: float | None, factor: float) -> bool | None:
    return None if not a or not b else a >= factor * b if factor != 1.0 else a > b


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("faust-streaming", "quixstreams", "confluent-kafka"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _title(doc: dict[str, Any]) -> str:
    c = doc["conditions"]
    return (
        f"{NAME}: {c['records']:,} records of ~{c['record_bytes_mean']:.0f} B Avro, "
        f"{c['partitions']} partitions, {c['keys']:,} keys, {c['cores']} cores, "
        f"broker {c['broker']}, best of {c['repeat']} (faust: 1 run of "
        f"{c['faust_records']:,})"
    )


def _ratios_text(doc: dict[str, Any]) -> str:
    lines = ["ratios (best runs):"]
    for name, value in doc["ratios"].items():
        lines.append(f"  {name:<28}{'n/a' if value is None else f'{value:.3f}'}")
    targets = ", ".join(f"{k}={v}" for k, v in doc["targets"].items())
    lines.append(f"targets: {targets}")
    return "\n".join(lines)


def _unverified(result: common.RunResult) -> str:
    return (
        f"NOT VERIFIED: the broker holds {result.output_records} outputs and "
        f"{result.committed_records} committed offsets"
    )


def _progress(result: common.RunResult) -> None:
    if result.error:
        print(f"[{NAME}] {result.contender:<14} FAILED: {result.error}")
        return
    ok = "verified" if result.verified else _unverified(result)
    warned = result.notes.get("framework_warnings") or {}
    if warned.get("count"):
        ok += f"; {warned['count']} framework warnings, first: {warned['first'][0]}"
    print(
        f"[{NAME}] {result.contender:<14} {result.records_per_s or 0:>10,.0f} rec/s  "
        f"{result.records:,} records in {result.seconds or 0:.2f}s  ({ok})"
    )
