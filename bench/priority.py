"""Benchmark ``priority``: what priority lanes cost a stage when only its low lane has traffic.

The same stage (``stage_throughput``'s, dedup off) over the same pre-loaded input, in the same
run, runs alternating:

- ``plain``: the stage reads the input topic as its one source;
- ``low_lane``: the stage reads ``Priority({high: 8, low: 1})``, the low lane being that same
  input topic and the high lane an empty topic: two workers in one process, the low one alone
  with records (it fetches at full size, no turns), the high one polling an empty topic.

``ratio`` = low_lane / plain (best run of each); target >= 0.9. How the lanes share a backlog
(the heavy lane's share of the first half of the output) is measured in
tests/integration/test_priority.py, which can tell the lanes' records apart.
"""

from __future__ import annotations

from typing import Any

from bench import common, report, workload
from bench.contenders.stage import run_stage, sync_price_stage
from pipeline.priority import Priority

NAME = "priority"
CONTENDERS = ("plain", "low_lane")


Config = common.OneStage


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    store = workload.schema_store()
    load_at_start = common.load_average()
    source, empty = common.unique("prio-low"), common.unique("prio-high")
    await topics.create(source)
    await topics.create(empty)
    seconds = await common.preload(bootstrap, source, store, config.records, config.keys)
    print(f"[{NAME}] pre-loaded {config.records:,} records in {seconds:.1f}s")

    async def run_one(name: str) -> common.RunResult:
        lanes = Priority({empty: 8, source: 1})
        return await run_stage(
            bootstrap, source=source if name == "plain" else lanes, store=store,
            stage=sync_price_stage(), target=config.records, partitions=config.partitions,
            topics=topics, label=name,
        )  # fmt: skip

    return await report.pair(
        NAME, CONTENDERS, run_one, repeat=config.repeat, target=0.9, results=config.results,
        title=f"{NAME}: {config.records:,} records, low lane only, best of {config.repeat}",
        conditions=config.conditions(
            store, broker, load_at_start,
            lanes="Priority({empty high topic: 8, the loaded topic: 1})",
        ),
    )  # fmt: skip
