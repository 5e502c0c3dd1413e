"""``pipeline kafka start | status | stop | kill``: the local broker or replicated cluster.

One node lives in ``$PIPELINE_HOME/broker``; a cluster (``start --brokers 3``) in
``$PIPELINE_HOME/cluster``. ``start NODE`` and ``kill NODE`` are fault drills on one node of the
cluster (or on the single broker, node 1): a killed node keeps its data and its address.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pipeline.cli.console import console
from pipeline.config import Settings
from pipeline.errors import LocalBrokerError

if TYPE_CHECKING:
    from pipeline.broker import BrokerStatus, LocalBroker
    from pipeline.broker.cluster import LocalCluster
    from pipeline.broker.secure import BrokerSecurity

app = typer.Typer(
    help="Run a local Apache Kafka broker, or a replicated cluster (--brokers 3).",
    no_args_is_help=True,
)
out = console()

NodeArg = Annotated[
    int | None,
    typer.Argument(help="One node of the local cluster (a fault drill); default: all."),
]


def _broker(
    settings: Settings, *, port: int | None = None, provision: bool = False, secure: bool = False
) -> LocalBroker:
    """The single-node broker; only ``start`` needs Java and jars."""
    from pipeline.broker import LocalBroker, ensure_jars, find_java
    from pipeline.broker.secure import BrokerSecurity

    workdir = settings.home / "broker"
    security = BrokerSecurity(workdir / "secure") if secure else None
    if not provision:
        return LocalBroker(workdir, security=security)
    java, _ = find_java(settings.java_home)
    jars = ensure_jars(settings.home, settings.kafka_version)
    return LocalBroker(
        workdir, jars=jars, java=java, port=port, heap_mb=settings.broker_heap_mb,
        security=security,
    )  # fmt: skip


def _cluster(
    settings: Settings,
    *,
    size: int = 3,
    port: int | None = None,
    provision: bool = False,
    secure: bool = False,
) -> LocalCluster:
    from pipeline.broker import ensure_jars, find_java
    from pipeline.broker.cluster import LocalCluster

    workdir = settings.home / "cluster"
    if not provision:
        return LocalCluster(workdir, secure=secure)
    java, _ = find_java(settings.java_home)
    jars = ensure_jars(settings.home, settings.kafka_version)
    heap = min(settings.broker_heap_mb, 256)  # three JVMs on a small machine
    return LocalCluster(
        workdir, size=size, jars=jars, java=java, port=port, heap_mb=heap, secure=secure
    )


def _refuse_plain_to_secure(workdir: Path, kind: str) -> None:
    """A broker formatted without security has no admin user: it cannot become secure."""
    from pipeline.broker.secure import BrokerSecurity

    formatted = any(workdir.glob("**/meta.properties"))
    if formatted and not BrokerSecurity(workdir / "secure").exists:
        raise LocalBrokerError(
            f"the local {kind} in {workdir} was set up without security; start it afresh "
            f"secure with 'pipeline kafka start --secure --fresh' (its topics are deleted)"
        )


def _in_use(settings: Settings) -> str:
    """Which local setup commands without ``--brokers`` act on: the cluster once it exists."""
    return "cluster" if _cluster(settings).exists else "broker"


@app.command("start")
def start(
    node: NodeArg = None,
    brokers: Annotated[
        int, typer.Option(min=1, max=9, help="Nodes: 1 broker, or a replicated cluster (3).")
    ] = 1,
    port: Annotated[
        int | None,
        typer.Option(help="Client port (of node 1); default: the last run's, else a free one."),
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Delete the broker's data first.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 120.0,
    secure: Annotated[
        bool,
        typer.Option(
            help="SASL_SSL (SCRAM) for clients, mTLS between nodes, ACLs enforced; an admin "
            "super user. A broker set up secure stays secure."
        ),
    ] = False,
) -> None:
    """Start the local broker (KRaft, 127.0.0.1), a cluster, or one node of it."""
    settings = Settings()
    if node is not None:
        _start_node(settings, node, timeout)
        return
    kind = "cluster" if brokers > 1 else "broker"
    if fresh:
        (_cluster(settings) if kind == "cluster" else _broker(settings)).stop()
        shutil.rmtree(settings.home / kind, ignore_errors=True)
    if kind == "broker" and _cluster(settings).exists:
        raise LocalBrokerError(
            f"a local cluster exists in {settings.home / 'cluster'}: start it with "
            f"'pipeline kafka start --brokers {_cluster(settings).size}', or delete it with "
            f"'pipeline kafka stop --delete' to run a single broker"
        )
    if kind == "cluster":
        existing = _cluster(settings)
        if existing.exists and existing.size != brokers:
            raise LocalBrokerError(
                f"the local cluster in {existing.workdir} has {existing.size} nodes, not "
                f"{brokers}: start it with --brokers {existing.size}, or start afresh with "
                f"--fresh"
            )
        if secure:
            _refuse_plain_to_secure(settings.home / "cluster", "cluster")
        cluster = _cluster(settings, size=brokers, port=port, provision=True, secure=secure)
        with out.status(f"Starting {brokers} Apache Kafka {settings.kafka_version} nodes ..."):
            bootstrap = cluster.start(timeout=timeout)
        version = settings.kafka_version
        out.print(f"Kafka {version} cluster of {brokers} running at [bold]{bootstrap}[/]")
    else:
        if secure:
            _refuse_plain_to_secure(settings.home / "broker", "broker")
        broker = _broker(settings, port=port, provision=True, secure=secure)
        with out.status(f"Starting Apache Kafka {settings.kafka_version} ..."):
            bootstrap = broker.start(timeout=timeout)
        status = broker.status(ask=False)
        out.print(
            f"Kafka {settings.kafka_version} running at [bold]{bootstrap}[/] (pid {status.pid})"
        )
    out.print(f"  export PIPELINE_BOOTSTRAP={bootstrap}")
    local = _cluster(settings) if kind == "cluster" else _broker(settings)
    if local.security is not None:
        _print_secure(local.security, settings)


def _print_secure(security: BrokerSecurity, settings: Settings) -> None:
    out.print(
        "  secure: SASL_SSL with SCRAM-SHA-512/256, TLS from a local CA, ACLs enforced.\n"
        "  On this machine the CLI connects as the admin user by itself; a client of its own "
        "(a stage with its own principal) sets:"
    )
    out.print(
        "  export PIPELINE_SECURITY_PROTOCOL=SASL_SSL PIPELINE_SASL_MECHANISM=SCRAM-SHA-512\n"
        f"  export PIPELINE_SSL_CAFILE={security.cafile}\n"
        "  export PIPELINE_SASL_USERNAME=<user> PIPELINE_SASL_PASSWORD_FILE=<file>\n"
        "  (users: 'pipeline kafka user NAME --password-file FILE'; their ACLs: "
        "'pipeline acl MODULE:PIPELINE --apply'; the admin password is in "
        f"{security.directory / 'admin.password'})",
        soft_wrap=True,
    )


def _start_node(settings: Settings, node: int, timeout: float) -> None:
    if _in_use(settings) == "broker":
        _single_node(node)
        bootstrap = _broker(settings, provision=True).start(timeout=timeout)
    else:
        bootstrap = _cluster(settings, provision=True).start_node(node, timeout=timeout)
    out.print(f"node {node} running at [bold]{bootstrap}[/]")


def _single_node(node: int) -> None:
    if node != 1:
        raise LocalBrokerError(
            f"the local broker is a single node (1), there is no node {node}; a cluster "
            f"starts with 'pipeline kafka start --brokers 3'"
        )


@app.command("user")
def user(
    name: Annotated[str, typer.Argument(help="The SCRAM user (a stage's principal).")],
    password_file: Annotated[
        Path,
        typer.Option(help="File holding the password; a missing file gets a new random password."),
    ],
) -> None:
    """Create a SCRAM user (SHA-512 and SHA-256) or change its password, as an admin.

    Works against any cluster the CLI connects to (PIPELINE_BOOTSTRAP and the security
    settings); against the secure local broker it connects as its admin by itself.
    """
    import asyncio

    from pydantic import SecretStr

    from pipeline.cli.commands import bootstrap_address
    from pipeline.ops.users import ensure_password_file, set_password

    generated = ensure_password_file(password_file)
    password = SecretStr(password_file.read_text().strip())
    target = bootstrap_address(None)
    asyncio.run(set_password(target, name, password))
    how = "a new random password written to" if generated else "the password in"
    out.print(f"user '{name}' (SCRAM-SHA-512/256): {how} {password_file}", highlight=False)


@app.command("kill")
def kill(node: Annotated[int, typer.Argument(help="The node to SIGKILL.")] = 1) -> None:
    """SIGKILL one node (a crash, for fault drills); 'start NODE' brings it back."""
    settings = Settings()
    if _in_use(settings) == "broker":
        _single_node(node)
        killed = _broker(settings).kill()
    else:
        killed = _cluster(settings).kill(node)
    out.print(f"node {node} killed." if killed else f"node {node} was not running.")


@app.command("status")
def status() -> None:
    """Show every local node: running, answering, role, partitions led, memory."""
    settings = Settings()
    nodes: list[tuple[BrokerStatus, int | None]]
    if _in_use(settings) == "broker":
        nodes = [(_broker(settings).status(), None)]
    else:
        nodes = [(n.broker, n.leads) for n in _cluster(settings).status()]
    if not any(n.running for n, _ in nodes):
        out.print("Kafka: stopped")
        raise typer.Exit(3)
    table = Table("node", "state", "address", "controller", "leads", "pid", "RSS", "up", box=None)
    for n, leads in nodes:
        if not n.running:
            table.add_row(str(n.node_id), "[red]stopped[/]", *[""] * 6)
            continue
        state = "answering" if n.answering else "[yellow]NOT answering[/]"
        table.add_row(
            str(n.node_id), state, n.bootstrap or "", n.role or "?",
            "" if leads is None else str(leads), str(n.pid), f"{n.rss_mb or 0:.0f} MB",
            f"{n.uptime_s or 0:.0f}s",
        )  # fmt: skip
    where = settings.home / _in_use(settings)
    count = f"{len(nodes)} nodes" if len(nodes) > 1 else "1 node"
    local = _cluster(settings) if _in_use(settings) == "cluster" else _broker(settings)
    secure = "; secure (SASL_SSL, mTLS between nodes, ACLs)" if local.security else ""
    out.print(f"Kafka: {count} in {where}; each a broker and a KRaft controller voter{secure}")
    out.print(table)


@app.command("stop")
def stop(
    node: NodeArg = None,
    timeout: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 30.0,
    delete: Annotated[bool, typer.Option(help="Delete the data too.")] = False,
) -> None:
    """Stop the local broker or cluster cleanly (SIGKILL after the timeout), or one node."""
    settings = Settings()
    kind = _in_use(settings)
    if node is not None:
        if kind == "broker":
            stopped = node == 1 and _broker(settings).stop(timeout=timeout)
        else:
            stopped = _cluster(settings).stop_node(node, timeout=timeout)
        out.print(f"node {node} stopped." if stopped else f"node {node} was not running.")
        return
    target = _cluster(settings) if kind == "cluster" else _broker(settings)
    address = target.address()
    if target.stop(timeout=timeout):
        out.print(f"Kafka at {address} stopped.")
    else:
        out.print("Kafka was not running.")
    if delete:
        shutil.rmtree(settings.home / kind, ignore_errors=True)
        out.print(f"deleted {settings.home / kind}")
