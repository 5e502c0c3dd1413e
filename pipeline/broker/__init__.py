"""A real Apache Kafka broker for development, tests, the demo and benchmarks.

:mod:`.jars` fetches the broker's jars once into a cache, :mod:`.local` runs a single-node KRaft
broker on loopback, and :mod:`.select` picks the broker everything else talks to.
"""

from pipeline.broker.jars import ensure_jars
from pipeline.broker.local import BrokerStatus, LocalBroker, find_java
from pipeline.broker.probe import probe
from pipeline.broker.select import BrokerHandle, open_broker

__all__ = [
    "BrokerHandle",
    "BrokerStatus",
    "LocalBroker",
    "ensure_jars",
    "find_java",
    "open_broker",
    "probe",
]
