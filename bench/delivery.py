"""Benchmark ``delivery``: the same stage with ``exactly_once`` against ``at_least_once``.

The ``stage_throughput`` workload (~200-byte Avro orders, 3 partitions, dedup off) is
pre-loaded once; every run reads all of it with a fresh pipeline (fresh group, output, state
topics) on the same broker, alternating the two modes (rotated order each round). Afterwards
each run's output is read back (``read_committed`` for exactly-once) and must hold every
input's ``event-id`` exactly once, and the group's committed offsets must cover the input.

``ratio`` = exactly-once / at-least-once records/s (best runs). Target: >= 0.8. Below the
target (or with ``--profile``) one extra exactly-once run goes under pyinstrument. Optional
informational variants: exactly-once with larger fetches (more records per transaction) and
both modes with the dedup table on (its changelog rides in the same transaction).

``alo_c64`` / ``eos_c64``: an I/O-bound async stage (``asyncio.sleep(5 ms)`` per record, the
``concurrency`` bench's stage) at ``concurrency=64`` with the default dedup policy, under each
mode; ``eos_c64/alo_c64`` has its own target (>= 0.8): exactly-once commits what finished,
record by record, as at-least-once does, instead of waiting for a whole fetched batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import common, profiling, report, workload
from bench.contenders.delivery_stage import run_delivery
from bench.profile_summary import profile_and_summarize
from pipeline.runtime.transport import Batching
from pipeline.schema import SchemaStore

NAME = "delivery"
TARGET = 0.8
ALO, EOS = "at_least_once", "exactly_once"


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    records: int = 100_000
    partitions: int = 3
    keys: int = 10_000
    repeat: int = 2
    warmup: bool = True  # one untimed at-least-once pass first (the broker JVM warms up)
    big_fetch: int | None = 10_000  # also run EOS with this many records per fetch (None: no)
    dedup: bool = False  # also run both modes with the default dedup policy
    concurrency: int | None = 64  # also run an I/O-bound async stage at this concurrency
    profile: str = "auto"  # "auto": profile an EOS run when below target; "always"; "never"
    results: Path = common.RESULTS


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    label: str
    delivery: str
    batching: Batching = Batching()
    dedup: bool = False
    concurrency: int | None = None  # the I/O-bound async stage (default dedup) at this


def variants(config: Config) -> list[Variant]:
    out = [Variant(ALO, ALO), Variant(EOS, EOS)]
    if config.big_fetch:
        big, size = Batching(max_records=config.big_fetch), f"fetch{config.big_fetch // 1000}k"
        out += [Variant(f"alo_{size}", ALO, big), Variant(f"eos_{size}", EOS, big)]
    if config.dedup:
        out += [Variant("alo_dedup", ALO, dedup=True), Variant("eos_dedup", EOS, dedup=True)]
    if config.concurrency:
        c = config.concurrency
        out += [
            Variant(f"alo_c{c}", ALO, dedup=True, concurrency=c),
            Variant(f"eos_c{c}", EOS, dedup=True, concurrency=c),
        ]
    return out


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    load_at_start = common.load_average()
    store = workload.schema_store()
    source = common.unique("orders-dlv")
    await topics.create(source)
    preload_s = await common.preload(bootstrap, source, store, config.records, config.keys)
    print(f"[{NAME}] pre-loaded {config.records:,} records into {source} in {preload_s:.1f}s")

    warmup = None
    if config.warmup:
        warmup = await _run_one(Variant("warmup", ALO), bootstrap, source, store, config, topics)
        print(f"[{NAME}] warm-up pass (not counted): {warmup.records_per_s or 0:,.0f} rec/s")
        await common.settle()
    order = variants(config)
    runs: dict[str, list[common.RunResult]] = {v.label: [] for v in order}
    for r in range(config.repeat):
        k = r % len(order)
        for variant in order[k:] + order[:k]:
            result = await _run_one(variant, bootstrap, source, store, config, topics)
            runs[variant.label].append(result)
            _progress(result)
            await common.settle()

    summaries = {name: report.summarize(results) for name, results in runs.items()}
    for name, summary in summaries.items():
        summary["clock_of_best"] = _clock_of_best(summary)
        summary["delivery"] = next(v.delivery for v in order if v.label == name)
    ratio = report.ratio(summaries, EOS, ALO)
    doc: dict[str, Any] = {
        "benchmark": NAME,
        "ratio": ratio,
        "ratio_of_medians": report.ratio(summaries, EOS, ALO, "median"),
        "target": TARGET,
        "target_met": None if ratio is None else ratio >= TARGET,
        "ratios": _ratios(summaries, order),
        "conditions": _conditions(config, broker, store, preload_s, load_at_start, order),
        "warmup": None if warmup is None else warmup.as_dict(),
        "contenders": summaries,
    }
    if config.profile == "always" or (
        config.profile == "auto" and ratio is not None and ratio < TARGET
    ):
        doc["profile"] = await _profile(bootstrap, source, store, config, topics)
    print()
    print(report.table(_title(doc), summaries, ALO))
    print(_breakdown(summaries))
    met = doc["target_met"]
    for name, value in doc["ratios"].items():
        if name != f"{EOS}/{ALO}" and value is not None:
            print(f"  {name:<44}{value:.3f}")
    print(
        f"ratio {EOS}/{ALO}: {'n/a' if ratio is None else f'{ratio:.3f}'} (best), "
        f"{doc['ratio_of_medians']} (medians); target >= {TARGET}: {met}"
    )
    path = report.write(NAME, doc, config.results)
    print(f"[{NAME}] results: {path}")
    return doc


async def _run_one(
    variant: Variant,
    bootstrap: str,
    source: str,
    store: SchemaStore,
    config: Config,
    topics: common.Topics,
    wrap: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
) -> common.RunResult:
    return await run_delivery(
        bootstrap,
        source=source,
        store=store,
        delivery=variant.delivery,
        target=config.records,
        partitions=config.partitions,
        topics=topics,
        batching=variant.batching,
        dedup=variant.dedup,
        concurrency=variant.concurrency,
        label=variant.label,
        wrap=wrap,
    )


async def _profile(
    bootstrap: str, source: str, store: SchemaStore, config: Config, topics: common.Topics
) -> dict[str, Any]:
    """One extra exactly-once run under pyinstrument (not used in any ratio)."""
    if not profiling.available():
        return {"error": "pyinstrument is not installed (pip install pyinstrument)"}
    path = config.results / f"{NAME}.profile.{EOS}.txt"
    holder: dict[str, Any] = {}
    wrap = profile_and_summarize(path, holder)
    result = await _run_one(Variant(EOS, EOS), bootstrap, source, store, config, topics, wrap)
    rate = result.records_per_s or 0
    print(f"[{NAME}] profile of one {EOS} run ({rate:,.0f} rec/s under the profiler): {path}")
    return {
        "file": path.name,
        "run": result.as_dict(),
        "where_the_time_goes": holder.get("summary"),
    }


def _ratios(summaries: dict[str, dict[str, Any]], order: list[Variant]) -> dict[str, Any]:
    """Each variant against at-least-once, and each exactly-once variant against its twin."""
    out = {f"{v.label}/{ALO}": report.ratio(summaries, v.label, ALO) for v in order[1:]}
    for v in order:
        twin = next((w for w in order if w.delivery == ALO and _same(v, w)), None)
        if v.delivery == EOS and twin is not None and twin.label != ALO:
            out[f"{v.label}/{twin.label}"] = report.ratio(summaries, v.label, twin.label)
            out[f"{v.label}/{twin.label} (medians)"] = report.ratio(
                summaries, v.label, twin.label, "median"
            )
    return out


def _same(a: Variant, b: Variant) -> bool:
    return a.batching == b.batching and a.dedup == b.dedup and a.concurrency == b.concurrency


def _clock_of_best(summary: dict[str, Any]) -> dict[str, Any] | None:
    best = summary.get("best_records_per_s")
    for run in summary["runs"]:
        if best is not None and run["records_per_s"] == best:
            clock: dict[str, Any] | None = run["notes"].get("clock")
            return clock
    return None


def _conditions(
    config: Config,
    broker: str,
    store: SchemaStore,
    preload_s: float,
    load_at_start: list[float],
    order: list[Variant],
) -> dict[str, Any]:
    return {
        "records": config.records,
        "record_bytes_mean": round(common.record_bytes(store, keys=config.keys), 1),
        "partitions": config.partitions,
        "keys": config.keys,
        "repeat": config.repeat,
        "stage": "bench price stage (decode, transform, encode), dedup off unless *_dedup; "
        "*_cN: an async stage sleeping 5 ms per record at concurrency N, default dedup",
        "variants": {
            v.label: {
                "delivery": v.delivery,
                "batching": dataclasses.asdict(v.batching),
                "dedup": v.dedup,
                "concurrency": v.concurrency,
            }
            for v in order
        },
        "best_of": "highest records/s among verified runs",
        "verified": "output read back (read_committed for exactly_once) holds every input "
        "event-id exactly once, and the group's committed offsets cover the input",
        "timing": "first records received -> commit covering the last record "
        "(exactly-once: producer start / fencing at assignment is outside the window)",
        "broker": broker,
        "preload_seconds": round(preload_s, 2),
        "load_average_1_5_15min_at_start": load_at_start,
        **common.machine(),
    }


def _title(doc: dict[str, Any]) -> str:
    c = doc["conditions"]
    return (
        f"{NAME}: {c['records']:,} records of ~{c['record_bytes_mean']:.0f} B Avro, "
        f"{c['partitions']} partitions, {c['keys']:,} keys, {c['cores']} cores, broker "
        f"{c['broker']}, best and median of {c['repeat']} runs, load at start "
        f"{c['load_average_1_5_15min_at_start']}"
    )


def _breakdown(summaries: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'best run of':<16}{'commits/s':>10}{'rec/commit':>11}{'commit ms':>10}"
        f"{'p95 ms':>8}{'in commit':>10}{'in fetch':>9}{'txn/s':>8}{'rec/txn':>8}"
        f"{'txn ms':>8}{'EndTxn ms':>10}{'CPU us/rec':>11}{'CPU busy':>9}"
    )
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        c = s.get("clock_of_best")
        if not c:
            continue
        t = c.get("transactions") or {}
        phases = t.get("phase_ms_mean") or {}
        lines.append(
            f"{name:<16}{_f(c['commits_per_s'], 0):>10}{_f(c['records_per_commit'], 0):>11}"
            f"{_f(c['commit_ms_mean'], 1):>10}{_f(c['commit_ms_p95'], 1):>8}"
            f"{_pc(c['share_of_wall_in_commit']):>10}{_pc(c['share_of_wall_in_fetch']):>9}"
            f"{_f(t.get('per_s'), 0):>8}{_f(t.get('records_mean'), 0):>8}"
            f"{_f(t.get('ms_mean'), 1):>8}{_f(phases.get('commit_transaction'), 1):>10}"
            f"{_f(c.get('cpu_us_per_record'), 1):>11}{_pc(c.get('cpu_share_of_wall')):>9}"
        )
    return "\n".join(lines)


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pc(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _progress(result: common.RunResult) -> None:
    if result.error:
        print(f"[{NAME}] {result.contender:<14} FAILED: {result.error}")
        return
    back = result.notes.get("read_back", {})
    ok = (
        "verified"
        if result.verified
        else f"NOT VERIFIED: read back {result.output_records} records "
        f"({back.get('duplicates')} duplicates), committed {result.committed_records}"
    )
    clock = result.notes.get("clock", {})
    txn = clock.get("transactions") or {}
    extra = f", {txn['per_s']:.0f} txn/s" if txn else ""
    print(
        f"[{NAME}] {result.contender:<14} {result.records_per_s or 0:>10,.0f} rec/s  "
        f"{result.records:,} records in {result.seconds or 0:.2f}s, "
        f"{clock.get('commits_per_s') or 0:.0f} commits/s{extra} "
        f"({back.get('isolation')}: {ok})"
    )
