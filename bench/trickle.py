"""Benchmark ``trickle``: CPU per record of a stage at a trickle against the same at full speed.

One stage process, started as a user starts it (``pipeline run bench.trickle_app:pipeline
--stage price``: the throughput stage with the default dedup policy), on fresh topics. In
each run, after a warm-up (``warmup`` records, the process up and its group formed):

1. **trickle**: ``rate`` records/s for ``seconds``, published one at a time by the framework's
   publisher (as an application sends); the stage's CPU time (``/proc``, user + system) from
   the first of them to the last one's output, per record;
2. **full speed** (the baseline): ``records`` published at once, read by the stage as fast as
   it goes; its CPU time per record likewise.

``ratio`` = CPU per record at the trickle / CPU per record at full speed (the lowest of each
over the runs). Target: <= 2. Measured for each setting of ``pipeline run --batch-wait-ms``
in ``waits`` (0, the default: a fetch answers at the first record; N: it may wait up to N ms
per hop for a larger batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import common, report, workload
from pipeline.publish import Publisher
from pipeline.security import connection

NAME = "trickle"
RATE, SECONDS = 2000, 10.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Config:
    rate: int = RATE
    seconds: float = SECONDS
    records: int = 60_000  # full speed
    warmup: int = 2_000
    partitions: int = 3
    keys: int = 1000
    repeat: int = 2
    waits: tuple[int, ...] = (0, 40)  # pipeline run --batch-wait-ms
    results: Any = common.RESULTS


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    store = workload.schema_store()
    load_at_start = common.load_average()
    runs: dict[str, list[dict[str, Any]]] = {f"batch_wait_ms={w}": [] for w in config.waits}
    for _ in range(config.repeat):
        for wait in config.waits:
            found = await _one(bootstrap, config, store, topics, wait)
            runs[f"batch_wait_ms={wait}"].append(found)
            print(f"[{NAME}] --batch-wait-ms {wait}: {found}")
    best = {
        name: {
            phase: min(r[phase]["cpu_us_per_record"] for r in found)
            for phase in ("trickle", "full_speed")
        }
        for name, found in runs.items()
    }
    ratios = {name: round(b["trickle"] / b["full_speed"], 2) for name, b in best.items()}
    doc = {
        "benchmark": NAME,
        "cpu_per_record_ratio": ratios,
        "targets": {
            f"trickle_cpu_per_record_at_most_2x_full_speed ({name})": r <= 2
            for name, r in ratios.items()
        },
        "conditions": {
            "rate_per_s": config.rate,
            "seconds": config.seconds,
            "full_speed_records": config.records,
            "warmup_records": config.warmup,
            "partitions": config.partitions,
            "keys": config.keys,
            "record_bytes_mean": round(common.record_bytes(store, keys=config.keys), 1),
            "stage": "pipeline run bench.trickle_app:pipeline --stage price (default dedup)",
            "cpu": "user + system time of the stage process (/proc), first record to last output",
            "best_of": "lowest CPU per record of each phase over the runs",
            "broker": broker,
            "repeat": config.repeat,
            "load_average_1_5_15min_at_start": load_at_start,
            **common.machine(),
        },
        "best_cpu_us_per_record": best,
        "runs": runs,
    }
    print()
    for name, b in best.items():
        print(
            f"{name}: CPU per record at {config.rate}/s {b['trickle']} us, at full speed "
            f"{b['full_speed']} us: ratio {ratios[name]}"
        )
    print(f"[{NAME}] results: {report.write(NAME, doc, config.results)}")
    return doc


async def _one(
    bootstrap: str, config: Config, store: Any, topics: common.Topics, wait_ms: int
) -> dict[str, Any]:
    name = common.unique("trickle")
    source = f"{name}.in"
    await topics.create(source)
    topics.adopt(*(f"{name}.price{suffix}" for suffix in ("", ".dlq", ".state")))
    output = f"{name}.price"
    env = {
        **os.environ,
        "BENCH_TRICKLE_NAME": name,
        "BENCH_TRICKLE_SOURCE": source,
        "BENCH_TRICKLE_PARTITIONS": str(config.partitions),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.cli", "run", "bench.trickle_app:pipeline",
        "--stage", "price", "--bootstrap", bootstrap, "--log-level", "WARNING",
        "--batch-wait-ms", str(wait_ms), env=env, cwd=ROOT,
    )  # fmt: skip
    codec = store.codec(workload.ORDER)
    paced = int(config.rate * config.seconds)
    values = iter(workload.orders(config.warmup + paced + config.records, config.keys))
    ends = _Ends(bootstrap, output)
    await ends.consumer.start()
    try:
        async with Publisher(bootstrap, source, codec, workload.KEY_FIELD) as pub:
            await pub.publish_many(_take(values, config.warmup))
            expected = config.warmup
            await ends.wait_for(expected, proc, within=180)
            await asyncio.sleep(1.0)  # warm-up commits done

            cpu0, t0 = _cpu(proc.pid), time.monotonic()
            sent = []
            for i, value in enumerate(_take(values, paced)):
                sent.append(asyncio.ensure_future(pub.publish(value)))
                ahead = t0 + (i + 1) / config.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await asyncio.gather(*sent)
            expected += paced
            await ends.wait_for(expected, proc, within=120)
            cpu1, t1 = _cpu(proc.pid), time.monotonic()

            await pub.publish_many(_take(values, config.records))
            expected += config.records
            await ends.wait_for(expected, proc, within=300)
            cpu2, t2 = _cpu(proc.pid), time.monotonic()
    finally:
        await ends.consumer.stop()
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return {
        "trickle": _phase(paced, cpu0, cpu1, t1 - t0),
        "full_speed": _phase(config.records, cpu1, cpu2, t2 - t1),
    }


def _phase(
    records: int, before: tuple[float, float], after: tuple[float, float], wall: float
) -> dict[str, Any]:
    user, system = after[0] - before[0], after[1] - before[1]
    cpu = user + system
    return {
        "records": records,
        "cpu_s": round(cpu, 2),
        "user_s": round(user, 2),
        "system_s": round(system, 2),
        "wall_s": round(wall, 2),
        "records_per_s": round(records / wall),
        "cpu_us_per_record": round(cpu / records * 1e6, 1),
        "records_per_cpu_s": round(records / cpu) if cpu else None,
    }


def _take(values: Any, n: int) -> list[Any]:
    return [next(values) for _ in range(n)]


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class _Ends:
    """The record count of one topic, read with one client kept for the run."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.consumer = AIOKafkaConsumer(**connection(bootstrap).client_args())

    async def count(self) -> int:
        c = self.consumer
        await c._client.force_metadata_update()
        tps = [TopicPartition(self.topic, p) for p in c.partitions_for_topic(self.topic) or ()]
        return sum((await c.end_offsets(tps)).values()) if tps else 0

    async def wait_for(self, count: int, proc: asyncio.subprocess.Process, within: float) -> None:
        deadline = time.monotonic() + within
        while await self.count() < count:
            if proc.returncode is not None:
                raise RuntimeError(f"the stage process exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic} did not reach {count} records in {within:g}s")
            await asyncio.sleep(0.05)
