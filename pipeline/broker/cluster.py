"""A local replicated Kafka cluster: N nodes on 127.0.0.1, each its own JVM.

Every node is a broker and a voter of the KRaft controller quorum (Kafka's *combined* mode):
three voters survive the loss of one, as Kafka recommends for a quorum, at the cost of one JVM
per node instead of six on a two-core machine. Internal topics (offsets, transactions) and, by
:class:`~pipeline.dsl.TopicPolicy`'s default, the pipeline's topics get ``min(3, nodes)``
replicas and ``min.insync.replicas=2``.

The cluster's shape (its id, each node's controller port) is written to ``cluster.json`` on
first start; each node keeps its client port in its own config (:mod:`.local`), so a node
killed and started again comes back at the same address with the same data. :meth:`kill` and
:meth:`start_node` are the fault drills of ``pipeline kafka kill NODE`` / ``start NODE``.

Example:
    >>> cluster = LocalCluster(Path("/tmp/kc"), size=3, jars=jars, java=java)  # doctest: +SKIP
    >>> bootstrap = cluster.start()                                          # doctest: +SKIP
    >>> cluster.kill(2); cluster.start_node(2)                               # doctest: +SKIP
    >>> cluster.stop()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.broker.local import BrokerStatus, LocalBroker, Quorum, free_port, new_cluster_id
from pipeline.broker.probe import leaders
from pipeline.broker.secure import BrokerSecurity
from pipeline.errors import BrokerStartError, LocalBrokerError
from pipeline.security import Connection

__all__ = ["LocalCluster", "NodeStatus", "local_bootstrap", "local_connection"]


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """One node as ``pipeline kafka status`` shows it."""

    broker: BrokerStatus
    leads: int | None  # partitions it leads (None: the cluster did not answer)


class LocalCluster:
    """``size`` KRaft nodes (broker + controller each) on loopback.

    Args:
        workdir: Holds ``cluster.json`` and a ``node-<id>`` directory per node.
        size: Number of nodes (at least 1; 3 for a quorum that survives one loss). Ignored
            when ``cluster.json`` exists: an existing cluster keeps its shape.
        jars: The broker's jars; only starting needs them.
        java: The ``java`` executable; only starting needs it.
        port: Client port of node 1 (node i gets ``port + i - 1``); free ports by default.
        heap_mb: JVM heap per node.
        secure: Run every node secure (see :mod:`.secure`); a cluster set up secure stays so.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        size: int = 3,
        jars: Path | None = None,
        java: Path | None = None,
        port: int | None = None,
        heap_mb: int = 384,
        secure: bool = False,
    ) -> None:
        if size < 1:
            raise LocalBrokerError(f"a cluster needs at least one node, not {size}")
        self.workdir = workdir
        self.jars = jars
        self.java = java
        self.port = port
        self.heap_mb = heap_mb
        material = BrokerSecurity(workdir / "secure")
        self.security = material if secure or material.exists else None
        self.quorum = self._read_quorum()
        self.size = len(self.quorum.voters) if self.quorum else size

    @property
    def _file(self) -> Path:
        return self.workdir / "cluster.json"

    @property
    def exists(self) -> bool:
        """Whether this cluster was ever started (its shape is on disk)."""
        return self.quorum is not None

    def _read_quorum(self) -> Quorum | None:
        try:
            shape = json.loads(self._file.read_text())
        except (OSError, ValueError):
            return None
        voters = tuple((int(n["id"]), int(n["controller_port"])) for n in shape["nodes"])
        return Quorum(str(shape["cluster_id"]), voters)

    def _create_quorum(self) -> Quorum:
        voters = tuple((i, free_port()) for i in range(1, self.size + 1))
        quorum = Quorum(new_cluster_id(), voters)
        self.workdir.mkdir(parents=True, exist_ok=True)
        nodes = [{"id": n, "controller_port": c} for n, c in voters]
        self._file.write_text(json.dumps({"cluster_id": quorum.cluster_id, "nodes": nodes}))
        return quorum

    def node(self, node_id: int) -> LocalBroker:
        """The node ``node_id`` (1-based)."""
        if not 1 <= node_id <= self.size:
            raise LocalBrokerError(
                f"there is no node {node_id}: the cluster in {self.workdir} has nodes "
                f"1..{self.size}"
            )
        port = None if self.port is None else self.port + node_id - 1
        return LocalBroker(
            self.workdir / f"node-{node_id}",
            jars=self.jars,
            java=self.java,
            port=port,
            heap_mb=self.heap_mb,
            node_id=node_id,
            quorum=self.quorum,
            security=self.security,
        )

    @property
    def nodes(self) -> list[LocalBroker]:
        return [self.node(i) for i in range(1, self.size + 1)]

    def start(self, timeout: float = 120.0) -> str:
        """Start every node that is not running and return the bootstrap address (all nodes).

        The nodes are launched together (none can answer before a majority of the quorum
        runs), then waited for.

        Raises:
            PortInUseError: A node's port is taken.
            BrokerStartError: A node exited, or the cluster did not answer within ``timeout``.
        """
        if self.quorum is None:
            self.quorum = self._create_quorum()
        nodes = self.nodes
        launched = []
        try:
            for node in nodes:
                node.launch()
                launched.append(node)
            deadline = time.time() + timeout
            for node in nodes:
                node.wait(max(1.0, deadline - time.time()))
        except LocalBrokerError:
            for node in launched:
                node.stop()
            raise
        return self.bootstrap()

    def start_node(self, node_id: int, timeout: float = 90.0) -> str:
        """Start one node (after :meth:`kill` or :meth:`stop_node`); returns its address."""
        if self.quorum is None:
            raise BrokerStartError(f"no cluster in {self.workdir}: start the cluster first")
        node = self.node(node_id)
        address = node.launch()
        node.wait(timeout)
        return address

    def kill(self, node_id: int) -> bool:
        """SIGKILL one node (a crash); returns whether it was running."""
        return self.node(node_id).kill()

    def stop_node(self, node_id: int, timeout: float = 30.0) -> bool:
        """Stop one node cleanly (a rolling restart's step)."""
        return self.node(node_id).stop(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop every node; returns whether any was running."""
        stopped = False
        for node in reversed(self.nodes):
            stopped = node.stop(timeout=timeout) or stopped
        return stopped

    def bootstrap(self) -> str:
        """Every node's address, comma-separated (a client finds the cluster through any)."""
        addresses = []
        for node in self.nodes:
            ports = node.ports()
            if ports is not None:
                addresses.append(f"127.0.0.1:{ports[0]}")
        return ",".join(addresses)

    def connection(self, bootstrap: str | None = None) -> Connection:
        """How to reach the cluster (as its admin when it is secure)."""
        address = bootstrap or self.bootstrap()
        if self.security is None:
            return Connection(address)
        return self.security.admin_connection(address)

    def address(self) -> str | None:
        """The bootstrap address if any node runs (no network call), else ``None``."""
        if not any(node.address() for node in self.nodes):
            return None
        return self.bootstrap()

    def status(self) -> list[NodeStatus]:
        """Every node: running, answering, KRaft role, and how many partitions it leads."""
        nodes = [node.status() for node in self.nodes]
        running = [n.bootstrap for n in nodes if n.running and n.answering and n.bootstrap]
        led = leaders(self.connection(",".join(running))) if running else None
        return [
            NodeStatus(n, None if led is None else led.get(n.node_id, 0) if n.running else 0)
            for n in nodes
        ]

    def leader_of_most(self, topic: str) -> int | None:
        """The node that leads most partitions of ``topic`` (the fault drills' target)."""
        from pipeline.broker.probe import topic_leaders

        counts: dict[int, int] = {}
        for node in (topic_leaders(self.connection(), topic) or {}).values():
            counts[node] = counts.get(node, 0) + 1
        return max(counts, key=lambda n: (counts[n], -n)) if counts else None


def local_bootstrap(home: Path) -> str | None:
    """The address of the broker or cluster ``pipeline kafka start`` runs under ``home``."""
    cluster = LocalCluster(home / "cluster")
    if cluster.exists:
        address = cluster.address()
        if address:
            return address
    return LocalBroker(home / "broker").address()


def local_connection(home: Path) -> Connection | None:
    """The running local broker or cluster under ``home`` as a connection: its admin's when
    it runs secure, plaintext otherwise (``None``: nothing runs)."""
    cluster = LocalCluster(home / "cluster")
    if cluster.exists:
        address = cluster.address()
        if address:
            return cluster.connection(address)
    broker = LocalBroker(home / "broker")
    address = broker.address()
    return broker.connection(address) if address else None
