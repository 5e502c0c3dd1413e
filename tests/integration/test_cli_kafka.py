"""``pipeline kafka start | status | stop`` on a real JVM broker leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
        assert f"running at {bootstrap} (answering)" in status.stdout
        assert len(kafka_pids(home)) == 1
        again = cli("kafka", "start", home=home)  # idempotent: finds the running broker
        assert bootstrap in again.stdout and len(kafka_pids(home)) == 1
    finally:
        stopped = cli("kafka", "stop", home=home)
    assert stopped.returncode == 0
    assert "stopped" in stopped.stdout
    assert kafka_pids(home) == [], "a broker process was left behind"
    assert not probe(bootstrap, timeout=2.0)
    assert cli("kafka", "status", home=home).returncode == 3
