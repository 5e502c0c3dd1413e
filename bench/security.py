"""Benchmark ``security``: one stage over SASL_SSL (SCRAM, TLS) against the same over PLAINTEXT.

The same stage (decode, transform, encode; dedup off, as ``cluster``'s) reads the same
pre-loaded input on each, in the same run, runs alternating:

- ``plaintext``: the benchmark's broker, PLAINTEXT, no authorizer;
- ``sasl_ssl``: a secure local broker started for the run
  (:mod:`pipeline.broker.secure`: TLS on every connection, SCRAM-SHA-512 login, the
  StandardAuthorizer checking every request), the stage running as the admin (super user:
  the authorizer's check is the same code path for any principal; ACL lookups are cached).

Both brokers are single nodes with the same heap. ``ratio`` = sasl_ssl / plaintext (best run
of each): what encryption and authentication cost a stage on this machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from bench import common
from bench.contenders.stage import compare_targets
from pipeline.broker.local import LocalBroker
from pipeline.broker.secure import BrokerSecurity
from pipeline.broker.select import local_parts
from pipeline.config import Settings
from pipeline.security import Connection

NAME = "security"
CONTENDERS = ("plaintext", "sasl_ssl")


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    records: int = 100_000
    partitions: int = 3
    keys: int = 10_000
    repeat: int = 3
    results: Path = common.RESULTS


async def run(bootstrap: str, broker: str, config: Config, topics: common.Topics) -> dict[str, Any]:
    """Start the secure broker, pre-load both, run the stage on each ``repeat`` times."""
    settings = Settings()
    java, jars = local_parts(settings)
    with tempfile.TemporaryDirectory(prefix="bench-secure-") as workdir:
        secure = LocalBroker(
            Path(workdir), jars=jars, java=java, heap_mb=settings.broker_heap_mb,
            security=BrokerSecurity(Path(workdir) / "secure"),
        )  # fmt: skip
        address = await asyncio.to_thread(secure.start)
        try:
            return await _run(bootstrap, broker, secure.connection(address), config, topics)
        finally:
            await asyncio.to_thread(secure.stop)


async def _run(
    bootstrap: str, broker: str, secure: Connection, config: Config, topics: common.Topics
) -> dict[str, Any]:
    stopics = common.Topics(secure, config.partitions)
    targets: dict[str, tuple[str | Connection, common.Topics]] = {
        "plaintext": (bootstrap, topics),
        "sasl_ssl": (secure, stopics),
    }
    described = {
        "plaintext": f"{broker}, PLAINTEXT listener, no authorizer",
        "sasl_ssl": "secure local broker (one node, same heap): SASL_SSL listener, "
        "SCRAM-SHA-512, TLS 1.3 (Python ssl / JDK 17), StandardAuthorizer on",
    }
    try:
        return await compare_targets(
            NAME, targets, described, contender="sasl_ssl", baseline="plaintext",
            records=config.records, keys=config.keys, partitions=config.partitions,
            repeat=config.repeat, results=config.results,
        )  # fmt: skip
    finally:
        await stopics.delete_all()
