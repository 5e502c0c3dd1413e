"""Tumbling windows: count (and sum) per key over fixed event-time windows.

Event time is the Kafka record timestamp (ms). A record at time ``t`` belongs to the window
``[t - t % size, t - t % size + size)`` of its key. Each input partition keeps a watermark,
the highest timestamp it has seen; a window closes once the watermark reaches its end plus
the grace period, i.e. when a later record *of the same partition* (any key) passes it. Its
result is then emitted, keyed by the window's key. Windows therefore close only as records
arrive: the last windows of a stream stay open until something later comes along.

A record whose window has already closed is late: it is dropped, counted in the stage's
``filtered`` stat (and as ``late`` in ``counts``). A record added to a window emits nothing and
is counted as ``filtered`` too; the results are the stage's ``produced`` records.

Everything lives in the stage's state table, so open windows survive restarts and
rebalances (the table is restored from its changelog before a partition is processed):

- the key's own state (``record.state``): its open windows, ``{start: [count, sum]}``;
- per partition, synthetic keys (via :func:`pipeline.partition_state.partition_state`): the
  watermark and open windows, and an index of each window's keys in chunks of
  :data:`CHUNK` so that adding a key rewrites at most one chunk, whatever the cardinality.

Each result carries an event id of its own, ``<window start>/<key>``: a replay after a crash
emits the same ids, which deduplication downstream recognises, while two windows of one key
closed by the same record stay two events. (A result for the record's own key also keeps its
sequence number, numbered with ``seq-part``.)

Example:
    >>> per_minute = tumbling_window("per_minute", size=60, grace=5,   # doctest: +SKIP
    ...                              input="shop.Order", output="shop.OrderCount",
    ...                              sum_field="total")
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import StageError
from pipeline.partition_state import partition_state
from pipeline.record import ID_HEADER, Emit, KeyState, Record
from pipeline.stage import DedupPolicy, Stage, stage
from stages._common import bump, check_callable, check_positive, field_getter

__all__ = ["CHUNK", "WindowResult", "tumbling_window"]

#: Keys per index chunk of one window (bounds the state rewritten when a key joins it).
CHUNK = 256

_NS = b"\x00stages.window/"
_META = _NS + b"meta"


@dataclass(frozen=True, slots=True)
class WindowResult:
    """The aggregate of one key over one closed window.

    Attributes:
        key: The record key.
        start: Window start (ms since the epoch, inclusive).
        end: Window end (exclusive).
        count: Records in the window.
        sum: Sum of the summed field, or ``None`` when the window sums nothing.

    Example:
        >>> WindowResult(b"k", 0, 60_000, 3, 7.5).as_dict()
        {'key': 'k', 'window_start': 0, 'window_end': 60000, 'count': 3, 'sum': 7.5}
    """

    key: bytes
    start: int
    end: int
    count: int
    sum: float | None

    def as_dict(self) -> dict[str, Any]:
        """The default output value (``sum`` only when the window sums a field)."""
        out: dict[str, Any] = {
            "key": self.key.decode("utf-8", "replace"),
            "window_start": self.start,
            "window_end": self.end,
            "count": self.count,
        }
        if self.sum is not None:
            out["sum"] = self.sum
        return out


class _Windows:
    """The window stage's function and its state layout."""

    def __init__(
        self,
        size_ms: int,
        grace_ms: int,
        value_of: Callable[[Any], Any] | None,
        result: Callable[[WindowResult], Any],
        counts: Counter[str] | None,
    ) -> None:
        self.size = size_ms
        self.grace = grace_ms
        self.value_of = value_of
        self.result = result
        self.counts = counts

    def __call__(self, value: Any, record: Record) -> list[Any]:
        key = record.key
        if key is None:
            raise StageError("tumbling windows need keyed records", retriable=False)
        meta_state = partition_state(record, _META)
        meta = meta_state.get() or {"wm": None, "open": {}}
        ts = record.timestamp
        wm = ts if meta["wm"] is None else max(meta["wm"], ts)
        opened: dict[str, list[int]] = meta["open"]
        outputs: list[Any] = []
        for slot in sorted(opened, key=int):
            if int(slot) + self.size + self.grace > wm:
                break
            outputs += self._close(record, int(slot), opened.pop(slot))
        start = ts - ts % self.size
        if start + self.size + self.grace <= wm:
            bump(self.counts, "late")
        else:
            self._add(record, key, value, start, opened)
        meta_state.set({"wm": wm, "open": opened})
        return outputs

    def _add(
        self, record: Record, key: bytes, value: Any, start: int, opened: dict[str, list[int]]
    ) -> None:
        amount = 0.0
        if self.value_of is not None:
            raw = self.value_of(value)
            amount = 0.0 if raw is None else float(raw)
        state = record.state
        windows: dict[str, list[float]] = state.get() or {}
        slot = str(start)
        agg = windows.get(slot)
        if agg is None:
            windows[slot] = [1, amount]
            self._index(record, key, start, opened)
        else:
            agg[0] += 1
            agg[1] += amount
        state.set(windows)

    def _index(self, record: Record, key: bytes, start: int, opened: dict[str, list[int]]) -> None:
        """Add ``key`` to window ``start``'s index: append to its last chunk, or open one."""
        chunks, in_last = opened.get(str(start), (0, CHUNK))
        if in_last >= CHUNK:
            chunks, in_last = chunks + 1, 0
        chunk = _chunk(record, start, chunks - 1)
        keys: list[str] = chunk.get() or []
        keys.append(key.decode("latin-1"))  # any bytes, losslessly, as JSON text
        chunk.set(keys)
        opened[str(start)] = [chunks, in_last + 1]

    def _close(self, record: Record, start: int, index: list[int]) -> list[Any]:
        outputs = []
        for i in range(index[0]):
            chunk = _chunk(record, start, i)
            for text in chunk.get() or []:
                key = text.encode("latin-1")
                state = partition_state(record, key)
                windows = state.get() or {}
                agg = windows.pop(str(start), None)
                if agg is None:  # pragma: no cover - the index and the key disagree
                    continue
                if windows:
                    state.set(windows)
                else:
                    state.delete()
                total = agg[1] if self.value_of is not None else None
                done = WindowResult(key, start, start + self.size, int(agg[0]), total)
                # An event id of the window's own: one record may close several windows of
                # one key, and deduplication downstream must not take them for one event.
                ident = [(ID_HEADER, b"%d/" % start + key)]
                outputs.append(Emit(self.result(done), key=key, headers=ident))
            chunk.delete()
        bump(self.counts, "windows", len(outputs))
        return outputs


def _chunk(record: Record, start: int, i: int) -> KeyState:
    return partition_state(record, _NS + f"{start}/{i}".encode())


def tumbling_window(
    name: str,
    *,
    size: float,
    input: str,
    output: str,
    grace: float = 0.0,
    sum_field: str | Callable[[Any], Any] | None = None,
    result: Callable[[WindowResult], Any] | None = None,
    dedup: DedupPolicy | None = None,
    counts: Counter[str] | None = None,
) -> Stage:
    """A stage that counts (and sums) each key's records per tumbling event-time window.

    Args:
        name: Stage name.
        size: Window length in seconds (a whole number of milliseconds).
        input: Schema of the values read.
        output: Schema of the results: by default a record with ``key`` (string),
            ``window_start`` and ``window_end`` (long, ms), ``count`` (long) and, with
            ``sum_field``, ``sum`` (double).
        grace: Seconds a window stays open after its end, for records that arrive late.
        sum_field: A field (name, dotted path or function of the value) to sum; ``None``
            values add nothing.
        result: Shapes a :class:`WindowResult` into the output value (default
            :meth:`WindowResult.as_dict`).
        dedup: Deduplication of the stage's input (keep it on: a redelivered record must
            not count twice).
        counts: If given, counts ``windows`` (results emitted) and ``late`` records.

    Raises:
        DefinitionError: A non-positive ``size``, a negative ``grace``, a bad
            ``sum_field`` or ``result``.

    Example:
        >>> s = tumbling_window("w", size=60, input="t.Event", output="t.Count")
        >>> s.name, s.is_async
        ('w', False)
    """
    size_ms = round(check_positive(name, "size", size) * 1000)
    grace_ms = round(check_positive(name, "grace", grace, zero=True) * 1000)
    if size_ms < 1:
        check_positive(name, "size in milliseconds", size_ms)
    value_of = None if sum_field is None else field_getter(name, sum_field)
    if result is not None:
        check_callable(name, "result", result)
    windows = _Windows(size_ms, grace_ms, value_of, result or WindowResult.as_dict, counts)
    return stage(name, input=input, output=output, dedup=dedup)(windows)
