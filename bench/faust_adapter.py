"""Benchmark ``faust_adapter``: what :mod:`pipeline.faust` costs over a plain Faust agent.

The same decode / transform / encode over the same pre-loaded input, in the same run, both as
faust-streaming apps in a child process (Faust's own worker, commit interval 2.8 s, the end
forced by one commit as a shutdown would), alternating:

- ``faust_agent``: an idiomatic agent (``bench.contenders.faust_app``): raw bytes in,
  ``await topic.send()`` per record, Faust's producer;
- ``faust_pipeline``: the framework's stage as an agent of :func:`pipeline.faust.faust_app`
  (``bench.contenders.faust_pipeline``): the framework's record handler (headers, dead-letter
  path, counters), dedup off as in the agent, an idempotent producer, each event acknowledged
  only once its output is durable.

``ratio`` = faust_pipeline / faust_agent (best run of each); it tells a Faust user what the
adapter's guarantees cost (target >= 0.5). Records: ``--faust-records`` (default 20,000).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench import common, report, workload
from bench.contenders.external import run_external

NAME = "faust_adapter"
CONTENDERS = ("faust_agent", "faust_pipeline")
RECORDS = 20_000  # Faust handles a few thousand records/s here


@dataclass(frozen=True, slots=True)
class Config(common.OneStage):
    records: int = RECORDS
    repeat: int = 2


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    store = workload.schema_store()
    load_at_start = common.load_average()
    source = common.unique("faustadapter")
    await topics.create(source)
    seconds = await common.preload(bootstrap, source, store, config.records, config.keys)
    print(f"[{NAME}] pre-loaded {config.records:,} records in {seconds:.1f}s")

    async def run_one(name: str) -> common.RunResult:
        if name == "faust_agent":
            output, group = common.unique("faust-out"), common.unique("faust")
            await topics.create(output)
            extra: dict[str, Any] = {"partitions": config.partitions}
        else:
            pipeline = common.unique("faustp")
            output = group = f"{pipeline}.price"  # the stage's output topic and its group
            topics.adopt(output, f"{pipeline}.price.dlq", f"{pipeline}.price.state")
            extra = {"partitions": config.partitions, "pipeline": pipeline}
        return await run_external(
            f"bench.contenders.{'faust_app' if name == 'faust_agent' else 'faust_pipeline'}",
            label=name, bootstrap=bootstrap, source=source, output=output, group=group,
            target=config.records, time_limit=600, extra=extra,
        )  # fmt: skip

    return await report.pair(
        NAME, CONTENDERS, run_one, repeat=config.repeat, target=0.5, results=config.results,
        title=f"{NAME}: {config.records:,} records, one stage as a Faust agent, "
        f"best of {config.repeat}",
        conditions=config.conditions(store, broker, load_at_start),
    )  # fmt: skip
