"""Testing: an in-memory driver (no broker) and pytest fixtures for a real broker.

- :class:`TestDriver` runs a pipeline's stages on the in-memory log;
- :class:`MemoryBroker` / :class:`MemoryTransport` are that log;
- :mod:`pipeline.testing.fixtures` (a pytest plugin) gives ``kafka_bootstrap`` and ``names``.
"""

from pipeline.testing.driver import DeadLetter, TestDriver, VirtualClock
from pipeline.testing.memory import MemoryBroker, MemoryRecord, MemoryTransport
from pipeline.testing.names import Names

__all__ = [
    "DeadLetter",
    "MemoryBroker",
    "MemoryRecord",
    "MemoryTransport",
    "Names",
    "TestDriver",
    "VirtualClock",
]
