"""The local broker's error cases give one clear paragraph, never a traceback."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.broker import jars as jars_mod
from pipeline.broker.jars import ensure_jars
from pipeline.broker.local import LocalBroker, find_java, new_cluster_id, parse_java_major
from pipeline.errors import (
    BrokerStartError,
    JarsUnavailableError,
    JavaNotFoundError,
    LocalBrokerError,
    PortInUseError,
)


def fake_java(home: Path, body: str) -> Path:
    """A ``java`` that is a shell script: lets each failure be staged without a JVM."""
    bin_dir = home / "bin"
    bin_dir.mkdir(parents=True)
    java = bin_dir / "java"
    java.write_text("#!/bin/sh\n" + body)
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return java


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "JAVA_HOME"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, env=full_env, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('java version "1.8.0_392"', 8),
        ('openjdk version "25" 2025-09-16', 25),
        ("no version here", None),
    ],
)
def test_parse_java_major(output: str, major: int | None) -> None:
    assert parse_java_major(output) == major


def test_java_home_without_java(tmp_path: Path) -> None:
    with pytest.raises(JavaNotFoundError, match="holds no bin/java"):
        find_java(tmp_path)


def test_java_too_old(tmp_path: Path) -> None:
    fake_java(tmp_path, "echo 'java version \"1.8.0_392\"' >&2\n")
    with pytest.raises(JavaNotFoundError, match=r"Java 8 .* too old.*17 or newer"):
        find_java(tmp_path)


def test_no_java_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(JavaNotFoundError, match="'java' is not on PATH"):
        find_java(None)


def test_real_java_found() -> None:
    java, major = find_java(None)
    assert java.exists() and major >= 17


def test_no_maven_and_no_cached_jars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no mvn
    # The second source is unreachable too (nothing listens on port 1).
    monkeypatch.setattr(jars_mod, "RELEASE_ARCHIVE", "http://127.0.0.1:1/kafka-{v}.tgz")
    with pytest.raises(JarsUnavailableError, match=r"No Maven .* no cached broker jars"):
        ensure_jars(tmp_path, "4.1.1")
    assert not jars_mod.jars_dir(tmp_path, "4.1.1").exists(), "no half-filled cache left"


def test_maven_failure_is_reported(tmp_path: Path) -> None:
    mvn = tmp_path / "mvn"
    mvn.write_text("#!/bin/sh\necho '[ERROR] Could not resolve dependencies' >&2\nexit 1\n")
    mvn.chmod(0o755)
    with pytest.raises(JarsUnavailableError, match="Could not resolve dependencies"):
        ensure_jars(tmp_path / "home", "4.1.1", mvn=str(mvn))


def test_cached_jars_are_used_without_maven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = jars_mod.jars_dir(tmp_path, "4.1.1")
    target.mkdir(parents=True)
    (target / ".complete").write_text("4.1.1")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert ensure_jars(tmp_path, "4.1.1") == target


def test_port_in_use(tmp_path: Path) -> None:
    java = fake_java(tmp_path / "jdk", "exit 0\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = LocalBroker(tmp_path / "b", jars=tmp_path, java=java, port=port)
        with pytest.raises(PortInUseError, match=f"Port {port} .* already in use"):
            broker.start()


def test_broker_exiting_during_start_shows_its_log(tmp_path: Path) -> None:
    # Formatting succeeds; the "broker" then logs a fatal error and exits.
    java = fake_java(
        tmp_path / "jdk",
        'case "$*" in *StorageTool*) exit 0;; esac\n'
        "echo 'ERROR Exiting Kafka due to fatal exception: log dir is not writable'\nexit 1\n",
    )
    broker = LocalBroker(tmp_path / "b", jars=tmp_path, java=java)
    with pytest.raises(
        BrokerStartError, match=r"exited during start(.|\n)*log dir is not writable"
    ):
        broker.start(timeout=20)
    assert not broker.status().running


def test_storage_format_failure(tmp_path: Path) -> None:
    java = fake_java(tmp_path / "jdk", "echo 'bad config: node.id' >&2\nexit 1\n")
    with pytest.raises(BrokerStartError, match=r"Formatting .* failed(.|\n)*bad config"):
        LocalBroker(tmp_path / "b", jars=tmp_path, java=java).start()


def test_all_local_broker_errors_share_the_root() -> None:
    for cls in (JavaNotFoundError, JarsUnavailableError, PortInUseError, BrokerStartError):
        assert issubclass(cls, LocalBrokerError)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"PIPELINE_JAVA_HOME": "/nonexistent-jdk"},
            "No Java runtime at /nonexistent-jdk/bin/java",
        ),
        ({"PIPELINE_JAVA_HOME": "OLD"}, "too old"),
    ],
)
def test_cli_prints_one_paragraph_not_a_traceback(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    if env.get("PIPELINE_JAVA_HOME") == "OLD":
        fake_java(tmp_path / "old", "echo 'java version \"11.0.2\"' >&2\n")
        env = {"PIPELINE_JAVA_HOME": str(tmp_path / "old")}
    proc = run_cli(["kafka", "start"], {**env, "PIPELINE_HOME": str(tmp_path / "home")})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:")
    assert expected in " ".join(proc.stderr.split())


def test_cli_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Pre-seed cached jars so the check reaches the port without fetching anything.
        target = jars_mod.jars_dir(tmp_path / "home", "4.1.1")
        target.mkdir(parents=True)
        (target / ".complete").write_text("4.1.1")
        proc = run_cli(
            ["kafka", "start", "--port", str(port)], {"PIPELINE_HOME": str(tmp_path / "home")}
        )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"Port {port} on 127.0.0.1" in " ".join(proc.stderr.split())


def test_cli_status_when_stopped(tmp_path: Path) -> None:
    proc = run_cli(["kafka", "status"], {"PIPELINE_HOME": str(tmp_path)})
    assert proc.returncode == 3
    assert "stopped" in proc.stdout


def test_cluster_ids_never_start_with_a_dash() -> None:
    # One URL-safe base64 id in 64 starts with '-', which the storage tool reads as an option;
    # 20,000 draws would meet ~300 of them if nothing drew again.
    ids = [new_cluster_id() for _ in range(20_000)]
    assert not [cid for cid in ids if cid.startswith("-")]
    assert all(len(cid) == 22 for cid in ids)
    assert len(set(ids)) == len(ids)


def test_free_ports_are_outside_the_range_of_outgoing_connections() -> None:
    """A port from the ephemeral range can become a client's local port before the listener
    it was promised binds it (a stage's --http port, taken by its own Kafka connections)."""
    from pipeline.broker.ports import _ephemeral_range, free_port

    first, last = _ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert not first <= port <= last, (port, first, last)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # and a listener can have it
