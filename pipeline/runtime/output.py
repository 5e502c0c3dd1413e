"""Turning a stage function's result into output records.

A plain value keeps the input's key, partition-by-key, sequence number and event id; a list
fans out (flat-map outputs share the input's sequence and carry a ``seq-part`` header); an
:class:`~pipeline.record.Emit` may re-key, in which case the output drops the sequence (it
belonged to another key) and gets an event id derived from the input's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.record import ID_HEADER, PART_HEADER, SEQ_HEADER, WRITER_HEADER, Emit
from pipeline.runtime.stats import StageStats
from pipeline.runtime.transport import Transport

PART_SHIFT = 16  # each flat-map level may emit up to 65,536 values per input
_SEQUENCE_HEADERS = (SEQ_HEADER, WRITER_HEADER, PART_HEADER, ID_HEADER)  # dropped on re-key


class Output:
    """Appends a stage's outputs for one input record to the transport.

    Args:
        transport: Where the records are buffered.
        topic: The stage's output topic (``None`` for a sink).
        encode: The output schema's encoder (``None`` for a sink).
        stats: Counters of processed, produced and filtered records.
    """

    __slots__ = ("encode", "keep_partition", "stats", "topic", "transport")

    def __init__(
        self,
        transport: Transport,
        topic: str | None,
        encode: Callable[[Any], bytes] | None,
        stats: StageStats,
    ) -> None:
        self.transport = transport
        self.topic = topic
        self.encode = encode
        self.stats = stats
        # Same partition counts in and out (the pipeline's co-partitioning contract): a
        # record that keeps its key keeps its partition, with no hashing at all.
        self.keep_partition = False

    def emit(self, msg: Any, result: Any, part: int) -> None:
        """Write ``result`` (the stage's return value for ``msg``); count what happened.

        Raises:
            CodecError: An output breaks the output schema; nothing of ``result`` is written
                (every output is encoded before any is appended), the caller dead-letters.
        """
        stats = self.stats
        if result is None:
            stats.filtered += 1
            return
        out, encode = self.topic, self.encode
        if out is None or encode is None:  # a sink: the call was the work
            stats.processed += 1
            return
        t, src = self.transport, msg.partition
        if type(result) is dict:  # the common case first: one value, same key
            data = encode(result)
            dest = src if self.keep_partition else t.partition_for(out, msg.key)
            t.append(out, dest, msg.key, data, msg.headers, msg.timestamp, src)
            stats.produced += 1
        elif isinstance(result, list | tuple):
            if not result:
                stats.filtered += 1
                return
            outputs = [self._one(msg, item, part, i) for i, item in enumerate(result)]
            for key, data, headers in outputs:
                t.append(out, t.partition_for(out, key), key, data, headers, msg.timestamp, src)
            stats.produced += len(outputs)
        else:
            key, data, headers = self._one(msg, result, part, None)
            t.append(out, t.partition_for(out, key), key, data, headers, msg.timestamp, src)
            stats.produced += 1
        stats.processed += 1

    def _one(
        self, msg: Any, item: Any, part: int, index: int | None
    ) -> tuple[bytes | None, bytes, Any]:
        """Key, encoded value and headers of one output; ``index`` numbers flat-map outputs."""
        assert self.encode is not None
        headers = msg.headers if index is None else _with_part(msg.headers, part, index)
        if not isinstance(item, Emit):
            return msg.key, self.encode(item), headers
        data = self.encode(item.value)
        if item.key is None or item.key == msg.key:
            return msg.key, data, [*headers, *item.headers]
        # Re-keyed: the input's sequence belongs to another key; give the output an event id
        # of its own (derived, so a replay derives the same one) and no sequence.
        kept = [h for h in msg.headers if h[0] not in _SEQUENCE_HEADERS]
        eid = next((v for k, v in msg.headers if k == ID_HEADER), b"") + b"/" + item.key
        if index is not None:  # several outputs to one new key stay distinct
            eid += b"#" + str(index).encode()
        return item.key, data, [*kept, (ID_HEADER, eid), *item.headers]


def _with_part(headers: Any, part: int, index: int) -> list[tuple[str, bytes]]:
    """``headers`` with the ``seq-part`` of output ``index`` (nested flat-maps stay distinct)."""
    nested = (part << PART_SHIFT) | index
    return [*(h for h in headers if h[0] != PART_HEADER), (PART_HEADER, str(nested).encode())]
