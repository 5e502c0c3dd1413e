"""The faust-streaming contender (run as ``python -m bench.contenders.faust_app CONFIG``).

An idiomatic agent: raw bytes in and out, the same fastavro decode / transform / encode as the
other contenders, and ``await output_topic.send(...)`` per record. faust publishes those sends
when the event is acknowledged and commits acknowledged offsets every
``broker_commit_interval`` (2.8 s). Once the agent has processed every record, a helper task
forces the commit that covers the last one (as a shutdown would), so faust is not charged for
waiting on its commit timer. The clock stops when faust's own committed offsets cover all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench import workload
from bench.contenders.external import load_config, write_report


def main(argv: list[str], build: Callable[[dict[str, Any]], Any] | None = None) -> None:
    """Build the app (``build``, default: the plain agent's) and run Faust's worker on it."""
    config = load_config(argv)
    try:
        app = (build or build_agent)(config)
    except Exception as exc:
        write_report(config, {"error": f"{type(exc).__name__}: {exc}"})
        raise
    sys.argv = [argv[0], "worker", "--loglevel", "warn", "--without-web"]
    app.main()  # blocks until SIGTERM; exits the process


def build_agent(config: dict[str, Any]) -> Any:
    import faust

    target = int(config["target"])
    process = workload.RawAvro(workload.schema_store()).processor()
    app = faust.App(
        config["group"],  # the app id is the consumer group
        broker=f"kafka://{config['bootstrap']}",
        store="memory://",
        datadir=os.path.join(config["workdir"], "faust"),
        topic_partitions=int(config["partitions"]),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
    )
    source = app.topic(config["source"], key_serializer="raw", value_serializer="raw")
    output = app.topic(config["output"], key_serializer="raw", value_serializer="raw")
    state: dict[str, Any] = {"t_first": None, "processed": 0}
    processed_all = asyncio.Event()

    @app.agent(source)
    async def price(stream: Any) -> None:
        async for key, value in stream.items():
            if state["t_first"] is None:
                state["t_first"] = time.monotonic()
            await output.send(key=key, value=process(value))
            state["processed"] += 1
            if state["processed"] >= target:
                processed_all.set()

    @app.task  # type: ignore[untyped-decorator]
    async def finish() -> None:
        await processed_all.wait()
        await report_when_committed(app, config, state)

    return app


async def report_when_committed(app: Any, config: dict[str, Any], state: dict[str, Any]) -> None:
    """Once every record is processed: force faust's commits until they cover the target (as
    a shutdown would), write the report, and stop the worker."""
    target = int(config["target"])
    report: dict[str, Any]
    try:
        consumer = app.consumer
        deadline = time.monotonic() + 120
        committed = 0
        while committed < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"faust committed {committed} of {target} records")
            await consumer.commit()
            offsets = getattr(consumer, "_committed_offset", {})
            committed = sum(o for tp, o in offsets.items() if tp.topic == config["source"])
            if committed < target:
                await asyncio.sleep(0.005)
        report = {
            "t_first": state["t_first"],
            "t_end": time.monotonic(),
            "processed": state["processed"],
            "committed": committed,
        }
    except Exception as exc:
        report = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    write_report(config, report)
    os.kill(os.getpid(), signal.SIGTERM)  # faust's worker shuts down cleanly on SIGTERM


if __name__ == "__main__":
    main(sys.argv)
