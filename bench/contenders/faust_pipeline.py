"""The framework's stage run by faust-streaming through :mod:`pipeline.faust` (run as
``python -m bench.contenders.faust_pipeline CONFIG``).

The same stage as ``stage_throughput``'s (decode, transform, encode; dedup off unless the
config says ``dedup``), as an agent of the app :func:`pipeline.faust.faust_app` builds, with
Faust's default commit interval (2.8 s) as the plain agent has. The clock and the end are the
plain agent's (:func:`bench.contenders.faust_app.report_when_committed`): from the first record
handled until Faust's committed offsets cover every record.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from bench import workload
from bench.contenders import faust_app
from bench.contenders.faust_app import report_when_committed
from bench.contenders.stage import sync_price_stage


def build(config: dict[str, Any]) -> Any:
    from pipeline.dsl import Pipeline, TopicPolicy
    from pipeline.faust import FaustOptions, faust_app

    pipeline = Pipeline(
        config["pipeline"],
        source=config["source"],
        key=workload.KEY_FIELD,
        schemas=workload.schema_store(),
        topics=TopicPolicy(partitions=int(config["partitions"])),
    ).then(sync_price_stage(dedup=bool(config.get("dedup"))))
    options = FaustOptions(commit_interval=2.8, datadir=Path(config["workdir"]) / "faust")
    app = faust_app(pipeline, ["price"], config["bootstrap"], options=options)
    stats = app.pipeline_stages.stages[0].stats
    target = int(config["target"])
    state: dict[str, Any] = {"t_first": None, "processed": 0}

    @app.task  # type: ignore[untyped-decorator]
    async def finish() -> None:
        # Polling the stage's own counter: no hook per record in the measured path.
        while stats.consumed == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        state["t_first"] = time.monotonic()
        while stats.consumed < target:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        state["processed"] = stats.consumed
        await report_when_committed(app, config, state)

    return app


if __name__ == "__main__":
    faust_app.main(sys.argv, build)
