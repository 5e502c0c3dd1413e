"""Dead-letter helpers without a stage: replay headers, ``--where``, replay planning, logs."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pipeline import ConfigError
from pipeline.dlq import DeadLetterRecord, Replay, Where
from pipeline.record import ID_HEADER, SEQ_HEADER
from pipeline.runtime import deadletter as dlq
from pipeline.runtime.deadletter import ClassLog
from pipeline.runtime.parking import Park, new_replay_id
from pipeline.runtime.state import RocksStores, StateTable
from pipeline.stage import DedupPolicy


def test_replay_headers_strip_every_dlq_header_and_keep_the_rest_in_order() -> None:
    original = [
        (SEQ_HEADER, b"\x00" * 8), (dlq.ERROR_CLASS, b"E"), ("trace-id", b"t"),
        (dlq.REPLAYED, b"old"), (dlq.REPLAYED_STAGE, b"s"), (ID_HEADER, b"e"),
        (dlq.TRACEBACK, b"x"),
    ]  # fmt: skip
    assert dlq.replay_headers(original, replay_id="r", stage="work") == [
        (SEQ_HEADER, b"\x00" * 8), ("trace-id", b"t"), (ID_HEADER, b"e"),
        (dlq.REPLAYED, b"r"), (dlq.REPLAYED_STAGE, b"work"),
    ]  # fmt: skip


def _dl(error: str, key: bytes = b"k", origin: tuple[str, int, int] = ("in", 0, 1)) -> Any:
    headers = (
        (dlq.ERROR_CLASS, error.encode()), (dlq.STAGE, b"work"), (dlq.TOPIC, origin[0].encode()),
        (dlq.PARTITION, str(origin[1]).encode()), (dlq.OFFSET, str(origin[2]).encode()),
    )  # fmt: skip
    return DeadLetterRecord(0, origin[2], key, b"v", headers)


def test_where_matches_every_term_with_comma_alternatives() -> None:
    where = Where.parse(["error_class=ValueError,KeyError", "key=a"])
    assert where.matches(_dl("KeyError", b"a"))
    assert not where.matches(_dl("KeyError", b"b"))
    assert not where.matches(_dl("DecodeError", b"a"))
    assert Where.parse(["partition=2"]).matches(_dl("E", origin=("in", 2, 5)))
    assert not Where.parse(["topic=other"]).matches(_dl("E"))
    assert Where.parse(["stage=work"]).matches(_dl("E"))
    assert str(where) == "error_class=KeyError,ValueError and key=a"


@pytest.mark.parametrize(
    ("expr", "says"),
    [("error_class", "FIELD=VALUE"), ("=x", "FIELD=VALUE"), ("colour=red", "unknown field")],
)
def test_where_rejects_what_it_cannot_read(expr: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Where.parse([expr])


def test_replay_filters_and_never_replays_one_dead_letter_twice_in_a_run() -> None:
    run = Replay("work", "in", Where.parse(["error_class=ValueError"]), replay_id="r")
    records = [
        _dl("ValueError", origin=("in", 0, 1)),
        _dl("DecodeError", origin=("in", 0, 2)),
        _dl("ValueError", origin=("in", 0, 1)),  # the same dead letter written twice
        _dl("ValueError", origin=("in", 1, 1)),
    ]
    items = [run.offer(r) for r in records]
    assert [i is not None for i in items] == [True, False, False, True]
    r = run.report
    assert (r.read, r.matched, r.replayed, r.skipped) == (4, 3, 2, 1)
    assert items[3] is not None and items[3].partition == 1


def test_replay_ids_are_unique_and_ordered_by_time() -> None:
    ids = [new_replay_id() for _ in range(50)]
    assert len(set(ids)) == 50
    assert sorted(ids)[0][:15] == ids[0][:15]  # same second: ordered by the stamp first


def test_parks_live_in_a_persistent_store_across_a_checkpointed_restart(tmp_path: Path) -> None:
    stores = RocksStores(tmp_path)
    table = StateTable("p.work.state", DedupPolicy(), stores)
    part, _ = table.open(0)
    park = Park("r1", "p.in", 0, 3, "DecodeError")
    part.park(b"k", park.encode())
    table.saved(0, 42)  # a clean close: the store holds the changelog up to offset 42
    table.close(0)
    again, start = table.open(0)
    assert start == 42  # nothing to restore: the park must come from the store itself
    assert Park.decode(again.parked(b"k") or b"") == park
    table.close(0)


async def test_class_log_sums_up_a_burst_once_it_is_over(caplog: pytest.LogCaptureFixture) -> None:
    counts: Counter[str] = Counter()
    classes = ClassLog("work", interval=0.05)
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime.handler"):
        for cls in ("ValueError", "DecodeError", "ValueError"):
            counts[cls] += 1
            classes.dead_lettered(counts)
        await asyncio.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "stage work: dead letters by error class: ValueError=1 (1 in all)",  # at once
        "stage work: dead letters by error class: ValueError=2, DecodeError=1 (3 in all)",
    ]
