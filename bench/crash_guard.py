"""Benchmark ``crash_guard``: what crash-loop protection costs a stage on the hot path.

The same stage (``stage_throughput``'s, dedup off) over the same pre-loaded input, in the
same run, runs alternating:

- ``unguarded``: ``CrashPolicy.off()``: commits carry no metadata;
- ``guarded``: the default ``CrashPolicy()``: every commit carries the delivery mark (a short
  string per partition) and each assignment commits one more time (see
  :mod:`pipeline.runtime.crashes`).

``ratio`` = guarded / unguarded (best run of each); target >= 0.95. A worker that follows a
dead one pays more (a mark per chunk of the dead worker's range): not measured here, bounded
in tests/unit/test_crashes.py.
"""

from __future__ import annotations

from typing import Any

from bench import common, report, workload
from bench.contenders.stage import run_stage, sync_price_stage

NAME = "crash_guard"
CONTENDERS = ("unguarded", "guarded")


Config = common.OneStage


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    store = workload.schema_store()
    load_at_start = common.load_average()
    source = common.unique("crash")
    await topics.create(source)
    seconds = await common.preload(bootstrap, source, store, config.records, config.keys)
    print(f"[{NAME}] pre-loaded {config.records:,} records in {seconds:.1f}s")

    async def run_one(name: str) -> common.RunResult:
        return await run_stage(
            bootstrap, source=source, store=store,
            stage=sync_price_stage(crash_guard=name == "guarded"), target=config.records,
            partitions=config.partitions, topics=topics, label=name,
        )  # fmt: skip

    return await report.pair(
        NAME, CONTENDERS, run_one, repeat=config.repeat, target=0.95, results=config.results,
        title=f"{NAME}: {config.records:,} records, one stage, best of {config.repeat}",
        conditions=config.conditions(store, broker, load_at_start),
    )  # fmt: skip
