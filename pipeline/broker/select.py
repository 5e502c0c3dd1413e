"""Pick the Kafka broker that tests, the demo and benchmarks talk to.

Order: an existing cluster named by ``PIPELINE_BOOTSTRAP``; else a testcontainers Kafka when a
Docker engine answers; else the project's local JVM broker (:class:`LocalBroker`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.broker.probe import probe
from pipeline.errors import BrokerUnavailableError
from pipeline.security import PLAINTEXT, Connection, Security

if TYPE_CHECKING:
    from pipeline.config import Settings

log = logging.getLogger(__name__)

KAFKA_IMAGE = "apache/kafka:{version}"


def local_parts(settings: Settings) -> tuple[Path, Path]:
    """The ``java`` executable and the broker's jars (fetched once) for a local broker."""
    from pipeline.broker.jars import ensure_jars
    from pipeline.broker.local import find_java

    java, _ = find_java(settings.java_home)
    return java, ensure_jars(settings.home, settings.kafka_version)


@dataclass(frozen=True, slots=True)
class BrokerHandle:
    """A broker to talk to: its bootstrap address and where it came from."""

    bootstrap: str
    source: str  # "PIPELINE_BOOTSTRAP", "testcontainers" or "local"
    security: Security = PLAINTEXT  # PIPELINE_SECURITY_PROTOCOL & co. for PIPELINE_BOOTSTRAP

    @property
    def connection(self) -> Connection:
        return Connection(self.bootstrap, self.security)


def docker_answers() -> bool:
    """Whether a Docker engine answers (the ``docker`` client alone is not enough)."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no SDK, no socket, no permission: all mean "no engine"
        return False


@contextlib.contextmanager
def open_broker(settings: Settings, workdir: Path | None = None) -> Iterator[BrokerHandle]:
    """Provide a broker for the duration of a ``with`` block.

    Args:
        settings: Where ``bootstrap``, ``use_docker``, ``home`` and the JVM options come from.
        workdir: Work directory for a local broker started here (a temporary one by default).

    Raises:
        BrokerUnavailableError: ``PIPELINE_BOOTSTRAP`` is set but nothing answers there.
        LocalBrokerError: The local broker cannot be provisioned or started.
    """
    if settings.bootstrap:
        security = settings.security()
        if not probe(Connection(settings.bootstrap, security), timeout=10.0):
            raise BrokerUnavailableError(
                f"No Kafka broker answers at {settings.bootstrap} (from PIPELINE_BOOTSTRAP, "
                f"{security.describe()}). Check the address and the security settings, or "
                f"unset PIPELINE_BOOTSTRAP to use a local broker."
            )
        yield BrokerHandle(settings.bootstrap, "PIPELINE_BOOTSTRAP", security)
        return
    if settings.use_docker and docker_answers():
        from testcontainers.kafka import KafkaContainer

        image = KAFKA_IMAGE.format(version=settings.kafka_version)
        with KafkaContainer(image).with_kraft() as container:
            yield BrokerHandle(container.get_bootstrap_server(), "testcontainers")
        return
    import tempfile

    from pipeline.broker.local import LocalBroker

    java, jars = local_parts(settings)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kafka-")))
        broker = LocalBroker(workdir, jars=jars, java=java, heap_mb=settings.broker_heap_mb)
        bootstrap = broker.start()
        stack.callback(broker.stop)
        log.info("local Kafka broker at %s", bootstrap)
        yield BrokerHandle(bootstrap, "local")
