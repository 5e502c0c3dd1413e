"""``pipeline kafka start | status | stop`` on a real JVM broker leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.broker.select import probe
from pipeline.config import Settings


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_BOOTSTRAP"}
    env.update(PIPELINE_HOME=str(home), PIPELINE_USE_DOCKER="false", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, env=env, timeout=180, check=False,
    )  # fmt: skip


def kafka_pids(home: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "kafka.Kafka" in cmdline and str(home) in cmdline:
                pids.append(int(proc.name))
    return pids


async def create_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        await admin.close()


async def topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


def test_start_status_stop(tmp_path: Path, kafka_broker: object) -> None:
    # ``kafka_broker``: the session broker's start has fetched the jars this test links to.
    home = tmp_path / "home"
    home.mkdir()
    # Share the session's jar cache: this test is about the process, not about fetching jars.
    (home / "jars").symlink_to(Settings().home / "jars")
    started = cli("kafka", "start", home=home)
    assert started.returncode == 0, started.stderr
    m = re.search(r"running at (127\.0\.0\.1:\d+)", started.stdout)
    assert m, started.stdout
    bootstrap = m.group(1)
    try:
        assert probe(bootstrap)
        status = cli("kafka", "status", home=home)
        assert status.returncode == 0
        assert re.search(rf"1\s+answering\s+{bootstrap}\s+leader", status.stdout), status.stdout
        assert len(kafka_pids(home)) == 1
        again = cli("kafka", "start", home=home)  # idempotent: finds the running broker
        assert bootstrap in again.stdout and len(kafka_pids(home)) == 1
        # A crash (SIGKILL), then a start: the same address and the same data.
        asyncio.run(create_topic(bootstrap, "kept"))
        assert cli("kafka", "kill", home=home).returncode == 0
        assert kafka_pids(home) == [] and not probe(bootstrap, timeout=2.0)
        assert "stopped" in cli("kafka", "status", home=home).stdout
        restarted = cli("kafka", "start", home=home)
        assert restarted.returncode == 0, restarted.stderr
        assert f"running at {bootstrap}" in restarted.stdout, "the broker moved to another port"
        assert "kept" in asyncio.run(topics(bootstrap))
    finally:
        stopped = cli("kafka", "stop", home=home)
    assert stopped.returncode == 0
    assert "stopped" in stopped.stdout
    assert kafka_pids(home) == [], "a broker process was left behind"
    assert not probe(bootstrap, timeout=2.0)
    assert cli("kafka", "status", home=home).returncode == 3


def test_a_cluster_of_three_with_a_node_killed_and_started(
    tmp_path: Path, kafka_broker: object
) -> None:
    """``start --brokers 3``: three JVMs in one KRaft quorum; ``kill 2`` / ``start 2`` bring a
    node down and back at its address; ``stop`` leaves nothing."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "jars").symlink_to(Settings().home / "jars")
    started = cli("kafka", "start", "--brokers", "3", home=home)
    assert started.returncode == 0, started.stderr
    bootstrap = re.search(r"export PIPELINE_BOOTSTRAP=(\S+)", started.stdout)
    assert bootstrap, started.stdout
    addresses = bootstrap.group(1).split(",")
    try:
        assert len(addresses) == 3 and len(kafka_pids(home)) == 3
        status = cli("kafka", "status", home=home).stdout
        rows = {
            int(m.group(1)): m.group(2)
            for m in re.finditer(r"^ (\d)\s+answering\s+\S+\s+(\w+)", status, re.M)
        }
        assert sorted(rows) == [1, 2, 3], status
        assert sorted(rows.values()) == ["follower", "follower", "leader"], status
        assert cli("kafka", "kill", "2", home=home).returncode == 0
        assert len(kafka_pids(home)) == 2 and not probe(addresses[1], timeout=2.0)
        assert re.search(r"^ 2\s+stopped", cli("kafka", "status", home=home).stdout, re.M)
        assert probe(addresses[0])  # the other two still answer
        back = cli("kafka", "start", "2", home=home)
        assert back.returncode == 0, back.stderr
        assert f"node 2 running at {addresses[1]}" in back.stdout
        wrong = cli("kafka", "start", home=home)  # a single broker while a cluster exists
        assert wrong.returncode == 1 and "--brokers 3" in wrong.stderr
    finally:
        stopped = cli("kafka", "stop", home=home)
    assert stopped.returncode == 0, stopped.stderr
    assert kafka_pids(home) == [], "a broker process was left behind"
