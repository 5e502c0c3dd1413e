"""Benchmark ``ops_overhead``: what metrics and tracing cost a stage.

The same stage (``stage_throughput``'s, dedup off) over the same pre-loaded input, whose
records each carry a W3C ``traceparent``, in the same run, runs alternating:

- ``stage``: plain (no HTTP surface, no spans; the headers are passed through);
- ``stage_ops``: with ``--http`` (``/metrics`` served from the same event loop) and ``--trace``
  with no OpenTelemetry SDK configured: no spans are made (none would record), the
  traceparent headers are passed on. What spans cost with an SDK is the SDK's and its
  exporter's, not measured here.

``ratio`` = stage_ops / stage (best run of each); target >= 0.95.
"""

from __future__ import annotations

from typing import Any

from bench import common, report, workload
from bench.contenders.stage import run_stage, sync_price_stage

NAME = "ops_overhead"
CONTENDERS = ("stage", "stage_ops")


Config = common.OneStage


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    store = workload.schema_store()
    load_at_start = common.load_average()
    source = common.unique("ops")
    await topics.create(source)
    seconds = await common.preload(
        bootstrap, source, store, config.records, config.keys, traced=True
    )
    print(f"[{NAME}] pre-loaded {config.records:,} traced records in {seconds:.1f}s")

    async def run_one(name: str) -> common.RunResult:
        return await run_stage(
            bootstrap, source=source, store=store, stage=sync_price_stage(),
            target=config.records, partitions=config.partitions, topics=topics, label=name,
            ops=name == "stage_ops",
        )  # fmt: skip

    return await report.pair(
        NAME, CONTENDERS, run_one, repeat=config.repeat, target=0.95, results=config.results,
        title=f"{NAME}: {config.records:,} traced records, one stage, best of {config.repeat}",
        conditions=config.conditions(
            store, broker, load_at_start, traceparent_bytes=66,
            stage_ops="--http 127.0.0.1:0 and --trace without an SDK (no spans made; "
            "traceparent passed on)",
        ),
    )  # fmt: skip
