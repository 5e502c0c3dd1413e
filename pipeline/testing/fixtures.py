"""Pytest fixtures for a real Kafka broker, registered as the ``pipeline`` pytest plugin.

- ``kafka_broker`` (session): one broker for the whole session, picked by
  :func:`pipeline.broker.open_broker`: ``PIPELINE_BOOTSTRAP``, else testcontainers when a
  Docker engine answers, else the project's local JVM broker.
- ``kafka_bootstrap`` (session): its bootstrap address.
- ``own_broker`` (per test): a single-node local broker of the test's own, to kill and
  restart (fault drills never touch the session broker).
- ``kafka_cluster`` (per module): a local replicated cluster of three nodes
  (:class:`~pipeline.broker.cluster.LocalCluster`), to kill and restart nodes of; stopped
  after the module, so its three JVMs do not sit beside the rest of the session.
- ``names`` (per test): unique topic, group and pipeline names.

The last two need the local JVM broker: with ``PIPELINE_BOOTSTRAP`` set (an external cluster
that a test must not kill) their tests are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.broker.cluster import LocalCluster
from pipeline.broker.local import LocalBroker
from pipeline.broker.secure import BrokerSecurity
from pipeline.broker.select import BrokerHandle, local_parts, open_broker
from pipeline.config import Settings
from pipeline.testing.names import Names


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """One real Kafka broker for the session."""
    with open_broker(Settings(), workdir=tmp_path_factory.mktemp("kafka")) as handle:
        yield handle


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: BrokerHandle) -> str:
    """The session broker's bootstrap address."""
    return kafka_broker.bootstrap


def _local_only(settings: Settings) -> None:
    if settings.bootstrap:
        pytest.skip("fault drills need the local JVM broker (PIPELINE_BOOTSTRAP is set)")


@pytest.fixture
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A single-node broker of this test's own, started; stopped after the test."""
    settings = Settings()
    _local_only(settings)
    java, jars = local_parts(settings)
    broker = LocalBroker(
        tmp_path_factory.mktemp("own-kafka"), jars=jars, java=java, heap_mb=settings.broker_heap_mb
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local cluster of three nodes (each a broker and a controller voter), started."""
    settings = Settings()
    _local_only(settings)
    java, jars = local_parts(settings)
    cluster = LocalCluster(
        tmp_path_factory.mktemp("kafka-cluster"), size=3, jars=jars, java=java, heap_mb=256
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A single-node secure broker (SASL_SSL, mTLS between its listeners, ACLs enforced) of
    this module's own; ``broker.connection(address)`` is its admin's connection."""
    settings = Settings()
    _local_only(settings)
    java, jars = local_parts(settings)
    workdir = tmp_path_factory.mktemp("secure-kafka")
    broker = LocalBroker(
        workdir, jars=jars, java=java, heap_mb=settings.broker_heap_mb,
        security=BrokerSecurity(workdir / "secure"),
    )  # fmt: skip
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Names:
    """Names (topics, groups, pipelines) unique to this test."""
    return Names(request.node.name)
