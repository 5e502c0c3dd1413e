"""Benchmark ``cluster``: one stage on a replicated 3-broker cluster against one broker.

The same stage (decode, transform, encode; dedup off, as ``stage_throughput``'s ``stage``) reads
the same pre-loaded input on each, in the same run, runs alternating:

- ``one_broker``: the benchmark's broker (one node, replication 1);
- ``three_brokers``: a local cluster of three nodes started for the run
  (:class:`~pipeline.broker.cluster.LocalCluster`), every topic with 3 replicas and
  ``min.insync.replicas=2`` (TopicPolicy's default on three brokers); acks=all then waits for a
  second copy of every write, the cost a user pays for surviving a broker.

``ratio`` = three_brokers / one_broker (best run of each). On one machine the three brokers
share its cores with the stage, so the ratio is a lower bound of what separate machines give.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from bench import common
from bench.contenders.stage import compare_targets
from pipeline.broker.cluster import LocalCluster
from pipeline.broker.select import local_parts
from pipeline.config import Settings

NAME = "cluster"
CONTENDERS = ("one_broker", "three_brokers")


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    records: int = 100_000
    partitions: int = 3
    keys: int = 10_000
    repeat: int = 3
    results: Path = common.RESULTS


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    """Start the cluster, pre-load both, run the stage on each ``repeat`` times."""
    java, jars = local_parts(Settings())
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as workdir:
        cluster = LocalCluster(Path(workdir), size=3, jars=jars, java=java, heap_mb=256)
        cluster_bootstrap = await asyncio.to_thread(cluster.start)
        try:
            return await _run(bootstrap, broker, cluster_bootstrap, config, topics)
        finally:
            await asyncio.to_thread(cluster.stop)


async def _run(
    bootstrap: str, broker: str, cluster_bootstrap: str, config: Config, topics: common.Topics
) -> dict[str, Any]:
    ctopics = common.Topics(cluster_bootstrap, config.partitions, replication=3)
    targets = {"one_broker": (bootstrap, topics), "three_brokers": (cluster_bootstrap, ctopics)}
    described = {
        "one_broker": f"{broker}, replication 1",
        "three_brokers": "local 3-node KRaft cluster (combined broker+controller JVMs, "
        "256 MB heap each) on the same machine, replication 3, min.insync.replicas 2",
    }
    try:
        return await compare_targets(
            NAME, targets, described, contender="three_brokers", baseline="one_broker",
            records=config.records, keys=config.keys, partitions=config.partitions,
            repeat=config.repeat, results=config.results,
        )  # fmt: skip
    finally:
        await ctopics.delete_all()
