"""The Quix Streams contender (run as ``python -m bench.contenders.quix_app CONFIG``).

An idiomatic Quix Streams 3 application: ``Application(...)``, ``app.dataframe(topic)``,
``sdf.apply(...)`` doing the same fastavro decode / transform / encode on bytes values, and
``sdf.to_topic(out)``; ``app.run(count=N)`` stops it after N outputs with a final checkpoint
(producer flush, then offset commit). Quix checkpoints every ``commit_interval`` (5 s) on its
own; the clock stops at the checkpoint whose commit covers the last record.

Instrument: :meth:`Checkpoint.commit` is wrapped to note the time and the offsets it committed
(once per checkpoint, nothing per record).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench import workload
from bench.contenders.external import load_config, write_report


def main(argv: list[str]) -> None:
    config = load_config(argv)
    try:
        write_report(config, run(config))
    except Exception as exc:
        write_report(
            config, {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        )
        raise


def run(config: dict[str, Any]) -> dict[str, Any]:
    from quixstreams import Application
    from quixstreams.checkpointing import checkpoint as checkpointing

    target = int(config["target"])
    positions: dict[tuple[str, int], int] = {}
    timing: dict[str, Any] = {"t_first": None, "t_end": None, "checkpoints": 0}
    _instrument_commits(checkpointing.Checkpoint, positions, timing, config["source"], target)

    app = Application(
        broker_address=config["bootstrap"],
        consumer_group=config["group"],
        auto_offset_reset="earliest",
        state_dir=os.path.join(config["workdir"], "state"),
        loglevel="WARNING",
    )
    source, output = (
        app.topic(
            name,
            key_serializer="bytes",
            key_deserializer="bytes",
            value_serializer="bytes",
            value_deserializer="bytes",
        )
        for name in (config["source"], config["output"])
    )
    process = workload.RawAvro(workload.schema_store()).processor()

    def price(value: bytes) -> bytes:
        if timing["t_first"] is None:
            timing["t_first"] = time.monotonic()
        return process(value)

    sdf = app.dataframe(source)
    sdf = sdf.apply(price)
    sdf.to_topic(output)
    app.run(count=target, collect=False, timeout=120)
    committed = sum(positions.values())
    if timing["t_end"] is None:
        raise RuntimeError(f"quix committed {committed} of {target} records")
    return {
        "t_first": timing["t_first"],
        "t_end": timing["t_end"],
        "committed": committed,
        "notes": {"checkpoints": timing["checkpoints"]},
    }


def _instrument_commits(
    cls: Any,
    positions: dict[tuple[str, int], int],
    timing: dict[str, Any],
    topic: str,
    target: int,
) -> None:
    original: Callable[..., Any] = cls.commit

    def commit(self: Any, *args: Any, **kwargs: Any) -> Any:
        offsets = {tp: o + 1 for tp, o in self._tp_offsets.items() if tp[0] == topic}
        out = original(self, *args, **kwargs)
        positions.update(offsets)
        timing["checkpoints"] += 1
        if timing["t_end"] is None and sum(positions.values()) >= target:
            timing["t_end"] = time.monotonic()
        return out

    cls.commit = commit


if __name__ == "__main__":
    main(sys.argv)
