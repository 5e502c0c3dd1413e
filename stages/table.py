"""Lookup tables for enrichment: a compacted Kafka topic read into memory, or a dict.

A :class:`KafkaTable` is a *global* table (every instance holds every partition), because
the records being enriched are keyed by something else (orders by order id, the table by
customer id), so co-partitioning cannot place a record beside its table entry.

Lifecycle:

1. Building the table (at import, in the pipeline module) does nothing but store settings.
2. The first :meth:`KafkaTable.wait_ready` (the enrich stage awaits it on its first record),
   :meth:`KafkaTable.start` or ``async with table`` starts a background aiokafka consumer in
   the running event loop. It assigns itself every partition of the topic, reads from the
   beginning, and marks the table *ready* once it has reached the end offsets it saw at start
   (read_committed: aborted writes never show). Lookups never see a half-loaded table.
3. It keeps consuming, so later updates and deletions (tombstones) reach lookups within a
   fetch wait. A lookup may still run slightly behind a write to the table topic.
4. :meth:`KafkaTable.stop` or leaving ``async with`` stops the consumer. In a ``pipeline run``
   process nothing calls it: the consumer task is cancelled, and closed, when the event loop
   shuts down. A table used from a new event loop (each ``TestDriver.run()`` is one) loads
   again from the beginning in that loop.

If the loader fails (a missing topic, no broker), :meth:`~KafkaTable.wait_ready` raises the
error and later lookups raise :class:`TableUnavailable` (retriable): records are retried and
then dead-lettered, never enriched from a table that stopped following its topic.

Example:
    >>> customers = KafkaTable(bootstrap, "shop.customers",        # doctest: +SKIP
    ...                        decode=store.codec("shop.Customer").decode)
    >>> async with customers:                                      # doctest: +SKIP
    ...     customers.get("c-1")
    {'id': 'c-1', 'name': 'Ada', 'tier': 'gold'}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kerr

from pipeline.errors import ConfigError, PipelineError, StageError, TopicError
from pipeline.runtime.diagnose import start_client
from pipeline.runtime.kafka import translate
from pipeline.security import Bootstrap, connection

__all__ = ["KafkaTable", "MemoryTable", "Table", "TableUnavailable"]

log = logging.getLogger(__name__)

_SKIP_LOG_LIMIT = 20


class TableUnavailable(StageError):
    """The table cannot answer: it is not loaded in time, or its loader failed (retriable)."""

    retriable = True


@runtime_checkable
class Table(Protocol):
    """What the enrich stage needs from a table (any object with these four members).

    Example:
        >>> isinstance(MemoryTable(), Table), isinstance({}, Table)
        (True, False)
    """

    @property
    def name(self) -> str:
        """A label for messages (the topic, for a Kafka table)."""
        ...

    @property
    def ready(self) -> bool:
        """Whether lookups see the whole table."""
        ...

    async def wait_ready(self) -> None:
        """Load the table if needed and return once it is ready; raise if loading failed."""
        ...

    def get(self, key: str | bytes) -> Any:
        """The row of ``key``, or ``None``."""
        ...


class _Gate:
    """A one-way "ready" flag that coroutines of any event loop can wait for."""

    def __init__(self) -> None:
        self.is_open = False
        self.error: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def open(self) -> None:
        self.is_open = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def reset(self) -> None:
        self.is_open, self.error = False, None

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_result(None)

    async def wait(self) -> None:
        while not self.is_open:
            if self.error is not None:
                raise self.error
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)


def _key(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


class MemoryTable:
    """A table held in a dict: for tests, and for small static reference data.

    Args:
        rows: Initial rows by key.
        name: A label for messages.
        ready: Whether lookups may start at once; ``False`` makes the enrich stage wait until
            :meth:`mark_ready` (to test the lifecycle).

    Example:
        >>> table = MemoryTable({"c-1": {"tier": "gold"}})
        >>> table.get("c-1"), table.get(b"c-1"), table.get("c-2")
        ({'tier': 'gold'}, {'tier': 'gold'}, None)
    """

    def __init__(
        self,
        rows: Mapping[str | bytes, Any] | None = None,
        *,
        name: str = "memory",
        ready: bool = True,
    ) -> None:
        self._name = name
        self._rows: dict[bytes, Any] = {_key(k): v for k, v in (rows or {}).items()}
        self._gate = _Gate()
        if ready:
            self._gate.open()

    @property
    def name(self) -> str:
        return self._name

    @property
    def ready(self) -> bool:
        return self._gate.is_open

    async def wait_ready(self) -> None:
        await self._gate.wait()

    def mark_ready(self) -> None:
        """Let waiting lookups proceed."""
        self._gate.open()

    def get(self, key: str | bytes) -> Any:
        return self._rows.get(_key(key))

    def put(self, key: str | bytes, row: Any) -> None:
        """Insert or replace the row of ``key``."""
        self._rows[_key(key)] = row

    def delete(self, key: str | bytes) -> None:
        """Remove the row of ``key`` (no error if there is none)."""
        self._rows.pop(_key(key), None)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._rows)


class KafkaTable:
    """A table loaded from a compacted topic and kept up to date by a background consumer.

    Args:
        bootstrap: Bootstrap servers, or a :class:`pipeline.Connection` (secure clusters).
        topic: The compacted topic: key = table key, value = row, null value = deletion.
        decode: Turns a value's bytes into a row (``json.loads`` by default; pass
            ``store.codec("x.Customer").decode`` for Avro). A value it cannot decode is
            skipped, logged and counted in :attr:`skipped`.
        name: A label for messages (default: the topic).
        fetch_wait_ms: How long the consumer's fetch waits for new records.

    Attributes:
        loaded: Rows read before the table became ready.
        updates: Changes applied after it became ready.
        skipped: Values that could not be decoded.

    Example:
        >>> table = KafkaTable("127.0.0.1:9092", "customers")
        >>> table.ready, table.name
        (False, 'customers')
    """

    def __init__(
        self,
        bootstrap: Bootstrap,
        topic: str,
        *,
        decode: Callable[[bytes], Any] = json.loads,
        name: str | None = None,
        fetch_wait_ms: int = 200,
    ) -> None:
        if not bootstrap or not topic:
            raise ConfigError("KafkaTable needs a bootstrap address and a topic")
        if not callable(decode):
            raise ConfigError(f"KafkaTable({topic}): decode must be callable")
        self.bootstrap = bootstrap
        self.topic = topic
        self._decode = decode
        self._name = name or topic
        self._fetch_wait_ms = fetch_wait_ms
        self._rows: dict[bytes, Any] = {}
        self._gate = _Gate()
        self._task: asyncio.Task[None] | None = None
        self.loaded = self.updates = self.skipped = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def ready(self) -> bool:
        return self._gate.is_open and self._gate.error is None

    def get(self, key: str | bytes) -> Any:
        """The current row of ``key``, or ``None``.

        Raises:
            TableUnavailable: The table is not loaded, or its loader has failed.
        """
        if not self.ready:
            raise TableUnavailable(self._unavailable())
        return self._rows.get(_key(key))

    def __len__(self) -> int:
        return len(self._rows)

    async def start(self) -> None:
        """Start loading in the running event loop (no-op while it is loading or loaded)."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and task.get_loop() is loop and not task.done():
            return
        # A first start, a loader that failed or was stopped, or one of another (closed)
        # event loop, whose consumer cannot serve this one: load again, from the beginning.
        self._gate.reset()
        self._rows.clear()
        self.loaded = self.updates = self.skipped = 0
        self._task = loop.create_task(self._run(), name=f"table-{self._name}")

    async def wait_ready(self) -> None:
        """Start loading if needed; return once the table is ready.

        A loader that failed is started again, so a record retried after a broker outage
        finds the table loading anew rather than the old error.

        Raises:
            TopicError: The topic does not exist.
            BrokerUnavailableError: No broker answers.
        """
        await self.start()
        await self._gate.wait()
        if self._gate.error is not None:
            raise self._gate.error

    async def stop(self) -> None:
        """Stop the background consumer; lookups fail until the table is started again."""
        task, self._task = self._task, None
        self._gate.reset()
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> KafkaTable:
        await self.wait_ready()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def _unavailable(self) -> str:
        if self._gate.error is not None:
            return f"table {self._name} stopped following {self.topic}: {self._gate.error}"
        return f"table {self._name} is not loaded yet"

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer(
            **connection(self.bootstrap).client_args(),
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            client_id=f"table-{self._name}",
        )
        try:
            try:
                await start_client(consumer, self.bootstrap, f"loading table {self._name}")
                await self._follow(consumer)
            except (kerr.KafkaError, OSError) as exc:
                raise translate(exc, f"loading table {self._name}", topic=self.topic) from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, PipelineError):
                exc = PipelineError(f"loading table {self._name} failed: {exc!r}")
            log.error("table %s: %s", self._name, exc)
            self._gate.fail(exc)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        began = time.monotonic()
        parts = consumer.partitions_for_topic(self.topic)
        if not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(self.topic)
        if not parts:
            raise TopicError(
                f"table {self._name}: topic {self.topic} does not exist", topic=self.topic
            )
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        behind = {tp for tp in tps if ends[tp] > 0}
        while True:
            if not behind and not self._gate.is_open:
                self._gate.open()
                log.info(
                    "table %s: loaded %d rows from %s in %.2fs",
                    self._name, len(self._rows), self.topic, time.monotonic() - began,
                )  # fmt: skip
            batch = await consumer.getmany(timeout_ms=self._fetch_wait_ms, max_records=10_000)
            for msgs in batch.values():
                for msg in msgs:
                    self._apply(msg.key, msg.value)
            for tp in list(behind):
                if await consumer.position(tp) >= ends[tp]:
                    behind.discard(tp)

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        if key is None:
            self._skip("a record without a key")
            return
        if value is None:
            self._rows.pop(key, None)
        else:
            try:
                row = self._decode(value)
            except Exception as exc:
                self._skip(f"key {key!r}: {type(exc).__name__}: {exc}")
                return
            self._rows[key] = row
        if self._gate.is_open:
            self.updates += 1
        else:
            self.loaded += 1

    def _skip(self, what: str) -> None:
        self.skipped += 1
        if self.skipped <= _SKIP_LOG_LIMIT:
            log.warning("table %s: skipped %s (%d skipped)", self._name, what, self.skipped)
