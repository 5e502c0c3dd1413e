"""A single-node Apache Kafka broker (KRaft, broker+controller) on 127.0.0.1.

The broker runs as a detached JVM so that ``pipeline kafka start`` can return while it keeps
running; its state (pid, ports) lives in ``state.json`` in its work directory, which is how
``status`` and ``stop`` find it again.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.broker.java import find_java, parse_java_major
from pipeline.broker.select import probe
from pipeline.errors import BrokerStartError, PortInUseError

__all__ = ["BrokerStatus", "LocalBroker", "find_java", "free_port", "parse_java_major"]
_LOG4J2 = """status = error
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_port_free(port: int, role: str) -> None:
    """Raise :class:`PortInUseError` when ``127.0.0.1:port`` is taken.

    The probe binds with ``SO_REUSEADDR``, as the broker's JVM does: a port whose only
    sockets are in TIME_WAIT (a broker that just stopped) is free for a restart.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise PortInUseError(
                f"Port {port} on 127.0.0.1 (the broker's {role} port) is already in use. Stop "
                f"whatever listens there ('ss -ltnp | grep :{port}'), or choose another port "
                f"(--port), or leave the port unset to pick a free one."
            ) from exc


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    """What ``pipeline kafka status`` reports."""

    running: bool
    answering: bool = False
    pid: int | None = None
    bootstrap: str | None = None
    rss_mb: float | None = None
    uptime_s: float | None = None
    workdir: Path | None = None


class LocalBroker:
    """A single-node KRaft Kafka broker on loopback, run from cached jars.

    Args:
        workdir: Holds config, data, log and ``state.json``.
        jars: Directory of the broker's jars (see :func:`pipeline.broker.ensure_jars`); only
            :meth:`start` needs it, :meth:`status` and :meth:`stop` work without.
        java: The ``java`` executable (see :func:`find_java`); only :meth:`start` needs it.
        port: Client port; a free one when not given.
        heap_mb: JVM heap (kept small: the broker is for one machine's tests).

    Example:
        >>> broker = LocalBroker(Path("/tmp/kafka"), jars=jars, java=java)  # doctest: +SKIP
        >>> bootstrap = broker.start()                                     # doctest: +SKIP
        >>> broker.stop()                                                  # doctest: +SKIP
    """

    def __init__(
        self,
        workdir: Path,
        *,
        jars: Path | None = None,
        java: Path | None = None,
        port: int | None = None,
        heap_mb: int = 384,
    ) -> None:
        self.workdir = workdir
        self.jars = jars
        self.java = java
        self.port = port
        self.heap_mb = heap_mb
        self._proc: subprocess.Popen[bytes] | None = None  # set when this object started it

    @property
    def log_file(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def _state_file(self) -> Path:
        return self.workdir / "state.json"

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker (or find it running) and return its bootstrap address.

        Raises:
            PortInUseError: The client or controller port is taken.
            BrokerStartError: The JVM exited, or did not answer within ``timeout``.
        """
        current = self.status()
        if current.running and current.bootstrap:
            return current.bootstrap
        if self.jars is None or self.java is None:
            raise BrokerStartError("LocalBroker.start() needs both jars= and java=.")
        java, jars = self.java, self.jars
        self.workdir.mkdir(parents=True, exist_ok=True)
        port = self.port or self._previous_port() or free_port()
        check_port_free(port, "client")
        controller = free_port()
        check_port_free(controller, "controller")
        data = self.workdir / "data"
        config = self._write_config(port, controller, data)
        if not (data / "meta.properties").exists():
            self._format(java, jars, config)
        bootstrap = f"127.0.0.1:{port}"
        cmd = [
            str(java),
            f"-Xms{min(128, self.heap_mb)}m",
            f"-Xmx{self.heap_mb}m",
            "-XX:+UseSerialGC",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            "-cp",
            f"{jars}/*",
            "kafka.Kafka",
            str(config),
        ]
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,  # survives the CLI; not hit by the terminal's Ctrl-C
            )
        self._proc = proc
        started = time.time()
        self._state_file.write_text(
            json.dumps({"pid": proc.pid, "bootstrap": bootstrap, "started": started})
        )
        deadline = started + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                self._state_file.unlink(missing_ok=True)
                raise BrokerStartError(
                    f"The Kafka broker exited during start (exit code {proc.returncode}). "
                    f"Last lines of {self.log_file}:\n{self.log_tail()}"
                )
            if probe(bootstrap, timeout=2.0):
                return bootstrap
            time.sleep(0.2)
        self.stop()
        raise BrokerStartError(
            f"The Kafka broker did not answer at {bootstrap} within {timeout:.0f}s. "
            f"Last lines of {self.log_file}:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the broker: SIGTERM (clean shutdown), then SIGKILL after ``timeout``.

        Returns:
            Whether a running broker was stopped.
        """
        pid = self._live_pid()
        self._state_file.unlink(missing_ok=True)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while time.time() < deadline and self._running(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while self._running(pid):
                time.sleep(0.05)
        self._proc = None
        return True

    def _running(self, pid: int) -> bool:
        if self._proc is not None and self._proc.pid == pid:
            return self._proc.poll() is None  # also reaps our own child
        return _alive(pid)

    def status(self) -> BrokerStatus:
        """Whether the broker runs, answers, and how much memory it holds."""
        pid = self._live_pid()
        if pid is None:
            return BrokerStatus(running=False, workdir=self.workdir)
        state = json.loads(self._state_file.read_text())
        bootstrap = str(state["bootstrap"])
        return BrokerStatus(
            running=True,
            answering=probe(bootstrap, timeout=5.0),
            pid=pid,
            bootstrap=bootstrap,
            rss_mb=_rss_mb(pid),
            uptime_s=time.time() - float(state["started"]),
            workdir=self.workdir,
        )

    def address(self) -> str | None:
        """The bootstrap address of the running broker (no network call), or ``None``."""
        if self._live_pid() is None:
            return None
        return str(json.loads(self._state_file.read_text())["bootstrap"])

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the broker's log, for error messages."""
        if not self.log_file.exists():
            return "(no log written)"
        text = self.log_file.read_text(errors="replace").rstrip().splitlines()
        return "\n".join(text[-lines:]) or "(log is empty)"

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _live_pid(self) -> int | None:
        """The pid from ``state.json`` if that process still is this broker's JVM."""
        try:
            pid = int(json.loads(self._state_file.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return None
        # A reused pid must never be killed: check that it is our JVM with our config.
        if "kafka.Kafka" not in cmdline or str(self.workdir) not in cmdline:
            return None
        return pid if _alive(pid) else None

    def _previous_port(self) -> int | None:
        """The client port of the last run, if still free: a restart keeps its address."""
        config = self.workdir / "server.properties"
        if not config.exists():
            return None
        m = re.search(
            r"^advertised\.listeners=PLAINTEXT://127\.0\.0\.1:(\d+)$", config.read_text(), re.M
        )
        if not m:
            return None
        port = int(m.group(1))
        try:
            check_port_free(port, "client")
        except PortInUseError:
            return None
        return port

    def _write_config(self, port: int, controller: int, data: Path) -> Path:
        (self.workdir / "log4j2.properties").write_text(_LOG4J2)
        config = self.workdir / "server.properties"
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "3",
            # The framework creates its topics explicitly; a typo must not create a topic.
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            # Check for compactable logs every second rather than every 15 s, so a test (or a
            # user) sees a compacted changelog shrink soon after its segment rolls.
            "log.cleaner.backoff.ms": "1000",
        }
        config.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        return config

    def _format(self, java: Path, jars: Path, config: Path) -> None:
        cmd = [
            str(java),
            "-Xmx256m",
            "-cp",
            f"{jars}/*",
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={_cluster_id()}",
            "-c",
            str(config),
            "--ignore-formatted",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            raise BrokerStartError(
                f"Formatting the broker's storage in {config.parent} failed:\n{out}"
            )


def _cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 chars).

    Like Kafka's own ``Uuid.randomUuid()``, an id that starts with ``-`` is drawn again: the
    storage tool's argument parser would read it as an option (one id in 64 does).
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _alive(pid: int) -> bool:
    try:
        # A zombie (exited, not yet reaped by its parent) is not alive for our purposes.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None
