"""The publisher without a broker: sequence numbers, input validation, partitioning."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import EncodeError, Publisher, SchemaStore, SyncPublisher, publish
from pipeline.publish import SequenceClock
from pipeline.runtime.kafka import murmur2, partition_for

SCHEMAS = Path(__file__).parent / "schemas_worker"
DUMMY = "localhost:1"  # never connected: the publisher is not started


@pytest.fixture(scope="module")
def store() -> SchemaStore:
    return SchemaStore.from_directory(SCHEMAS)


def order(**fields: Any) -> dict[str, Any]:
    return {"order_id": "o-1", "n": 1, "amount": 2.5, "note": "", **fields}


# -- SequenceClock -------------------------------------------------------------------------


def test_sequence_is_strictly_increasing_when_called_faster_than_the_clock() -> None:
    clock = SequenceClock()
    seqs = [clock.next(b"k") for _ in range(20_000)]  # far more than one per microsecond
    assert all(a < b for a, b in itertools.pairwise(seqs))


def test_sequence_with_a_frozen_clock_counts_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish.time, "time_ns", lambda: 5_000_000_000)
    clock = SequenceClock()
    assert [clock.next(b"k") for _ in range(3)] == [5_000_000, 5_000_001, 5_000_002]


def test_sequence_survives_a_clock_going_back(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [9_000_000_000]
    monkeypatch.setattr(publish.time, "time_ns", lambda: now[0])
    clock = SequenceClock()
    first = clock.next(b"k")
    now[0] -= 3_000_000_000  # NTP step backwards
    assert clock.next(b"k") == first + 1


def test_sequence_is_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish.time, "time_ns", lambda: 1_000_000)
    clock = SequenceClock()
    for _ in range(5):
        clock.next(b"busy")
    assert clock.next(b"quiet") == 1_000  # not pushed up by another key's numbers
    assert clock.next(b"busy") == 1_005


def test_sequence_follows_the_clock_across_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [2_000_000_000]
    monkeypatch.setattr(publish.time, "time_ns", lambda: now[0])
    earlier = SequenceClock()
    last = max(earlier.next(b"k") for _ in range(100))  # 100 within one microsecond
    now[0] += 1_000_000  # a restart takes (much more than) a millisecond
    restarted = SequenceClock()  # a new process knows nothing of ``earlier``
    assert restarted.next(b"k") > last


# -- Publisher.check -----------------------------------------------------------------------


@pytest.fixture
async def make_publisher(store: SchemaStore) -> AsyncIterator[Callable[[str, str], Publisher]]:
    """Publishers on a dummy address, never started; closed after the test."""
    made: list[Publisher] = []

    def make(schema: str, key_field: str) -> Publisher:
        made.append(Publisher(DUMMY, "in", store.codec(schema), key_field))
        return made[-1]

    yield make
    for pub in made:
        await pub.__aexit__(None, None, None)  # nothing buffered: only closes the producer


async def test_check_returns_the_key_bytes(make_publisher: Callable[[str, str], Publisher]) -> None:
    pub = make_publisher("test.worker.Order", "order_id")
    assert pub.check(order(order_id="o-42")) == b"o-42"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([order()], "expected a JSON object / dict, got list"),
        ('{"order_id": "o-1"}', "expected a JSON object / dict, got str"),
        (None, "expected a JSON object / dict, got NoneType"),
        (order(n="three"), "n is 'three' (str), expected long"),
        (order(amount=None), "amount is missing or null, expected double"),
        ({"n": 1, "amount": 1.0}, "order_id is missing or null, expected string"),
    ],
    ids=["list", "json-text", "none", "wrong-type", "null-field", "missing-key-field"],
)
async def test_check_rejects_with_a_clear_reason(
    make_publisher: Callable[[str, str], Publisher], value: Any, reason: str
) -> None:
    pub = make_publisher("test.worker.Order", "order_id")
    with pytest.raises(EncodeError) as info:
        pub.check(value)
    assert reason in str(info.value)


async def test_check_rejects_a_null_key_the_schema_allows(
    make_publisher: Callable[[str, str], Publisher],
) -> None:
    pub = make_publisher("test.worker.Ticket", "ticket_id")
    assert pub.check({"ticket_id": "t-1", "text": "hi"}) == b"t-1"
    with pytest.raises(EncodeError, match="sequence key field 'ticket_id' is missing or null"):
        pub.check({"ticket_id": None, "text": "hi"})


def test_sync_publisher_can_be_built_without_an_event_loop(store: SchemaStore) -> None:
    pub = SyncPublisher(DUMMY, "orders.in", store.codec("test.worker.Order"), "order_id")
    assert pub.sent == 0


# -- partitioning --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "java"),
    [  # Kafka's own UtilsTest.testMurmur2 (signed, as Java returns it)
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        ("abc", 479470107),
    ],
)
def test_murmur2_is_the_java_clients(key: str, java: int) -> None:
    assert murmur2(key.encode()) == java & 0xFFFFFFFF


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_murmur2_equals_aiokafkas(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)
    assert partition_for(data, 7) == (aiokafka_murmur2(data) & 0x7FFFFFFF) % 7
