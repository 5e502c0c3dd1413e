"""Benchmark ``concurrency``: an I/O-bound async stage at ``concurrency=64`` against ``=1``.

The stage awaits ``asyncio.sleep(0.005)`` per record (a call to a slow service). Both runs read
the same pre-loaded input (1,000 keys) from offset 0 with their own group; ``concurrency=1``
stops after a few thousand records (it does ~190/s), ``concurrency=64`` reads all of it. Then
the ``concurrency=64`` output is read back to check that every key's ``seq`` headers still
increase: key order must survive the concurrency.

``ratio`` = records/s at 64 / records/s at 1. Target: >= 30.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bench import common, report, workload
from bench.contenders.stage import run_stage, sleepy_stage
from pipeline.runtime.transport import Batching

NAME = "concurrency"


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    c1_records: int = 2_000
    c64_records: int = 20_000
    keys: int = 1_000
    partitions: int = 3
    sleep_ms: float = 5.0
    concurrency: int = 64
    results: Path = common.RESULTS


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    load_at_start = common.load_average()
    store = workload.schema_store()
    source = common.unique("orders-conc")
    await topics.create(source)
    total = max(config.c1_records, config.c64_records)
    await common.preload(bootstrap, source, store, total, config.keys)
    print(f"[{NAME}] pre-loaded {total:,} records ({config.keys:,} keys) into {source}")

    sleep = config.sleep_ms / 1000
    high = f"c{config.concurrency}"
    summaries: dict[str, dict[str, Any]] = {}
    outputs: dict[str, str] = {}
    for label, concurrency, target in (
        ("c1", 1, config.c1_records),
        (high, config.concurrency, config.c64_records),
    ):
        result = await run_stage(
            bootstrap,
            source=source,
            store=store,
            stage=sleepy_stage(concurrency, sleep),
            target=target,
            partitions=config.partitions,
            topics=topics,
            label=label,
        )
        outputs[label] = result.notes["output_topic"]
        summaries[label] = report.summarize([result])
        rate = result.records_per_s
        if rate is None:
            print(f"[{NAME}] {label:<4} FAILED: {result.error}")
        else:
            check = "verified" if result.verified else "NOT VERIFIED"
            print(
                f"[{NAME}] {label:<4} {rate:>9,.0f} rec/s  {result.records:,} records in "
                f"{result.seconds or 0:.2f}s  ({check})"
            )
        await common.settle()

    order = await _check_order(bootstrap, outputs.get(high), summaries.get(high, {}))
    ratio = report.ratio(summaries, high, "c1")
    doc: dict[str, Any] = {
        "benchmark": NAME,
        "ratio": ratio,
        "target": 30,
        "target_met": None if ratio is None else ratio >= 30,
        "per_key_order": order,
        "conditions": {
            "c1_records": config.c1_records,
            "c64_records": config.c64_records,
            "concurrency": config.concurrency,
            "keys": config.keys,
            "partitions": config.partitions,
            "sleep_ms_per_record": config.sleep_ms,
            "ideal_c1_records_per_s": round(1000 / config.sleep_ms, 1),
            "ideal_high_records_per_s": round(config.concurrency * 1000 / config.sleep_ms, 1),
            "broker": broker,
            "batching": dataclasses.asdict(Batching()),
            "timing": "first records received -> commit covering the target record count",
            "load_average_1_5_15min_at_start": load_at_start,
            **common.machine(),
        },
        "contenders": summaries,
    }
    print()
    title = (
        f"{NAME}: async stage sleeping {config.sleep_ms:g} ms per record, {config.keys:,} keys, "
        f"{config.partitions} partitions, {doc['conditions']['cores']} cores, broker {broker}"
    )
    print(report.table(title, summaries, "c1"))
    print(f"ratio {high}/c1: {'n/a' if ratio is None else f'{ratio:.1f}'} (target >= 30)")
    if order["checked"]:
        print(
            f"per-key order in the {high} output: {order['violations']} violations over "
            f"{order['records']:,} records of {order['keys']:,} keys"
        )
    else:
        print(f"per-key order in the {high} output: not checked ({order['reason']})")
    path = report.write(NAME, doc, config.results)
    print(f"[{NAME}] results: {path}")
    return doc


async def _check_order(
    bootstrap: str, topic: str | None, summary: dict[str, Any]
) -> dict[str, Any]:
    if topic is None or summary.get("error"):
        return {"checked": False, "reason": "the run failed"}
    expected = int(summary["records"])
    seqs = await common.read_sequences(bootstrap, topic, expected)
    records = sum(len(v) for v in seqs.values())
    violations = common.order_violations(seqs)
    return {
        "checked": True,
        "topic": topic,
        "records": records,
        "expected": expected,
        "keys": len(seqs),
        "violations": violations,
        "ok": violations == 0 and records == expected,
    }
