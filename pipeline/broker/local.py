"""One Apache Kafka node (KRaft, broker and controller in one JVM) on 127.0.0.1.

A node runs as a detached JVM so that ``pipeline kafka start`` can return while it keeps
running; its state (pid, address) lives in ``state.json`` in its work directory, which is how
``status`` and ``stop`` find it again. A node keeps its address: a restart (after a stop, a
crash or a SIGKILL) reuses the ports written in its config, because every client and stage
still dials that address; if something else took the port, the start fails and says so.

Alone, a node is the single-node broker of tests and the demo; three of them with one
:class:`Quorum` are the replicated cluster of :mod:`pipeline.broker.cluster`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.broker.java import find_java, parse_java_major
from pipeline.broker.ports import check_port_free, free_port
from pipeline.broker.probe import probe
from pipeline.broker.secure import BrokerSecurity
from pipeline.errors import BrokerStartError
from pipeline.security import Connection

__all__ = [
    "BrokerStatus", "LocalBroker", "Quorum", "find_java", "free_port", "new_cluster_id",
    "parse_java_major",
]  # fmt: skip
_LOG4J2 = """status = error
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
logger.quorum.name = org.apache.kafka.raft.QuorumState
logger.quorum.level = INFO
"""
# The KRaft role of a node, from the last transition its quorum state logged.
_TRANSITION = re.compile(rb"Completed transition to (\w+)")


@dataclass(frozen=True, slots=True)
class Quorum:
    """The KRaft controller quorum a node belongs to (a local replicated cluster).

    Args:
        cluster_id: Shared by every node; their storage is formatted with it.
        voters: ``(node id, controller port)`` of every voter.
    """

    cluster_id: str
    voters: tuple[tuple[int, int], ...]

    @property
    def replication(self) -> int:
        """The replication factor internal topics get: ``min(3, nodes)``."""
        return min(3, len(self.voters))

    def controller_port(self, node_id: int) -> int:
        return dict(self.voters)[node_id]


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    """What ``pipeline kafka status`` reports."""

    running: bool
    node_id: int = 1
    answering: bool = False
    pid: int | None = None
    bootstrap: str | None = None
    rss_mb: float | None = None
    uptime_s: float | None = None
    workdir: Path | None = None
    role: str | None = None  # KRaft: "leader" or "follower" of the controller quorum, ...


class LocalBroker:
    """A single-node KRaft Kafka broker on loopback, run from cached jars.

    Args:
        workdir: Holds config, data, log and ``state.json``.
        jars: Directory of the broker's jars (see :func:`pipeline.broker.ensure_jars`); only
            :meth:`start` needs it, :meth:`status` and :meth:`stop` work without.
        java: The ``java`` executable (see :func:`find_java`); only :meth:`start` needs it.
        port: Client port; by default the one of the last run, else a free one.
        heap_mb: JVM heap (kept small: the broker is for one machine's tests).
        node_id: This node's id.
        quorum: The controller quorum of a replicated cluster (``None``: a single node that is
            its own quorum).
        security: Run secure (SASL_SSL clients, mTLS between nodes, ACLs; see
            :mod:`.secure`); ``None``: plaintext, or secure if it was set up secure before.

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
        node_id: int = 1,
        quorum: Quorum | None = None,
        security: BrokerSecurity | None = None,
    ) -> None:
        self.workdir = workdir
        self.jars = jars
        self.java = java
        self.port = port
        self.heap_mb = heap_mb
        self.node_id = node_id
        self.quorum = quorum
        remembered = BrokerSecurity(workdir / "secure")
        self.security = security or (remembered if remembered.exists else None)
        self._proc: subprocess.Popen[bytes] | None = None  # set when this object started it

    def connection(self, bootstrap: str) -> Connection:
        """How to reach this broker at ``bootstrap``: as its admin when it is secure."""
        if self.security is None:
            return Connection(bootstrap)
        return self.security.admin_connection(bootstrap)

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
        bootstrap = self.launch()
        self.wait(timeout)
        return bootstrap

    def launch(self) -> str:
        """Start the JVM (or find it running) without waiting for it to answer.

        A node of a replicated cluster cannot answer before a majority of its quorum runs:
        the cluster launches every node first, then waits.
        """
        current = self.status(ask=False)
        if current.running and current.bootstrap:
            return current.bootstrap
        if self.jars is None or self.java is None:
            raise BrokerStartError("LocalBroker.start() needs both jars= and java=.")
        java, jars = self.java, self.jars
        self.workdir.mkdir(parents=True, exist_ok=True)
        previous = self.ports()
        if self.port is not None:
            port = self.port
            check_port_free(port, "client")
        elif previous is not None:
            port = previous[0]
            check_port_free(port, "client", remembered=True)
        else:
            port = free_port()
        if self.quorum is not None:
            controller = self.quorum.controller_port(self.node_id)
        elif previous is not None:
            controller = previous[1]
        else:
            controller = free_port()
        check_port_free(controller, "controller", remembered=previous is not None)
        internal = None
        if self.security is not None:
            internal = previous[2] if previous is not None and previous[2] else free_port()
            check_port_free(internal, "internal", remembered=previous is not None)
        data = self.workdir / "data"
        config = self._write_config(port, controller, data, internal)
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
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
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
        state = {"pid": proc.pid, "bootstrap": bootstrap, "started": time.time()}
        self._state_file.write_text(json.dumps({**state, "log_start": log_start}))
        return bootstrap

    def wait(self, timeout: float = 90.0) -> None:
        """Wait until the launched broker answers.

        Raises:
            BrokerStartError: The JVM exited, or did not answer within ``timeout``.
        """
        try:
            bootstrap = str(json.loads(self._state_file.read_text())["bootstrap"])
        except (OSError, ValueError, KeyError) as exc:
            raise BrokerStartError(f"node {self.node_id} was not launched") from exc
        deadline = time.time() + timeout
        while time.time() < deadline and self._launched_alive():
            if probe(self.connection(bootstrap), timeout=2.0):
                return
            time.sleep(0.2)
        proc = self._proc
        if not self._launched_alive():
            self._state_file.unlink(missing_ok=True)
            code = f" (exit code {proc.returncode})" if proc is not None else ""
            raise BrokerStartError(
                f"The Kafka broker (node {self.node_id}) exited during start{code}. "
                f"Last lines of {self.log_file}:\n{self.log_tail()}"
            )
        self.stop()
        raise BrokerStartError(
            f"The Kafka broker (node {self.node_id}) did not answer at {bootstrap} within "
            f"{timeout:.0f}s. Last lines of {self.log_file}:\n{self.log_tail()}"
        )

    def _launched_alive(self) -> bool:
        # Our own child: ask it (right after the fork its cmdline is not the JVM's yet).
        if self._proc is not None:
            return self._proc.poll() is None
        return self._live_pid() is not None

    def kill(self) -> bool:
        """SIGKILL the broker (a crash, for fault drills); its data and address stay.

        Returns:
            Whether a running broker was killed.
        """
        pid = self._live_pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while self._running(pid):
            time.sleep(0.05)
        self._proc = None
        return True

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

    def status(self, *, ask: bool = True) -> BrokerStatus:
        """Whether the broker runs, answers (when ``ask``), its KRaft role and memory."""
        pid = self._live_pid()
        if pid is None:
            return BrokerStatus(running=False, node_id=self.node_id, workdir=self.workdir)
        state = json.loads(self._state_file.read_text())
        bootstrap = str(state["bootstrap"])
        return BrokerStatus(
            running=True,
            node_id=self.node_id,
            answering=ask and probe(self.connection(bootstrap), timeout=5.0),
            pid=pid,
            bootstrap=bootstrap,
            rss_mb=_rss_mb(pid),
            uptime_s=time.time() - float(state["started"]),
            workdir=self.workdir,
            role=self.role(),
        )

    def role(self) -> str | None:
        """The node's role in the controller quorum, from the last transition it logged in
        this run: ``leader``, ``follower``, ``candidate``, ... (``None`` before the first)."""
        if not self.log_file.exists():
            return None
        with self.log_file.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(self._log_start, size - 256 * 1024)
            f.seek(start)
            found = _TRANSITION.findall(f.read())
        if not found:
            return None
        return str(found[-1].decode()).removesuffix("State").lower()

    @property
    def _log_start(self) -> int:
        """Where this run's lines begin in the (appended) log."""
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads(self._state_file.read_text()).get("log_start", 0))
        return 0

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

    def ports(self) -> tuple[int, int, int | None] | None:
        """The client, controller and (secure) internal ports of the last run: a restart
        keeps its address."""
        config = self.workdir / "server.properties"
        if not config.exists():
            return None
        m = re.search(
            r"^listeners=(?:PLAINTEXT|CLIENT)://127\.0\.0\.1:(\d+),"
            r"CONTROLLER://127\.0\.0\.1:(\d+)(?:,INTERNAL://127\.0\.0\.1:(\d+))?$",
            config.read_text(),
            re.M,
        )
        if not m:
            return None
        internal = int(m.group(3)) if m.group(3) else None
        return (int(m.group(1)), int(m.group(2)), internal)

    def _write_config(
        self, port: int, controller: int, data: Path, internal: int | None = None
    ) -> Path:
        (self.workdir / "log4j2.properties").write_text(_LOG4J2)
        config = self.workdir / "server.properties"
        quorum = self.quorum
        voters = quorum.voters if quorum is not None else ((self.node_id, controller),)
        replicas = quorum.replication if quorum is not None else 1
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": ",".join(f"{n}@127.0.0.1:{c}" for n, c in voters),
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "3",
            # The framework creates its topics explicitly; a typo must not create a topic.
            "auto.create.topics.enable": "false",
            # Replicated like the pipeline's own topics (TopicPolicy): a cluster loses no
            # commit, offset or transaction state with one node.
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min(2, replicas)),
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min(2, replicas)),
            "transaction.state.log.num.partitions": "10",
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            # Check for compactable logs every second rather than every 15 s, so a test (or a
            # user) sees a compacted changelog shrink soon after its segment rolls.
            "log.cleaner.backoff.ms": "1000",
            # A node that stops heartbeating is fenced (and leaves every ISR) after 6 s
            # rather than 9 s: a fault drill on one machine stalls writers for less.
            "broker.session.timeout.ms": "6000",
        }
        if self.security is not None:
            assert internal is not None
            settings.update(self.security.listener_settings(port, internal, controller))
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
            f"--cluster-id={self.quorum.cluster_id if self.quorum else new_cluster_id()}",
            "-c",
            str(config),
            "--ignore-formatted",
            *(self.security.scram_bootstrap() if self.security is not None else ()),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            raise BrokerStartError(
                f"Formatting the broker's storage in {config.parent} failed:\n{out}"
            )


def new_cluster_id() -> str:
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
