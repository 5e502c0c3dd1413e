"""Pytest fixtures for a real Kafka broker, registered as the ``pipeline`` pytest plugin.

- ``kafka_broker`` (session): one broker for the whole session, picked by
  :func:`pipeline.broker.open_broker`: ``PIPELINE_BOOTSTRAP``, else testcontainers when a
  Docker engine answers, else the project's local JVM broker.
- ``kafka_bootstrap`` (session): its bootstrap address.
- ``names`` (per test): unique topic, group and pipeline names.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.broker.select import BrokerHandle, open_broker
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


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Names:
    """Names (topics, groups, pipelines) unique to this test."""
    return Names(request.node.name)
