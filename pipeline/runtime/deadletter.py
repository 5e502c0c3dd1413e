"""Dead letters: the original record, untouched, plus headers that say what went wrong.

A dead letter keeps the original key, value and headers, and adds ``dlq.*`` headers: stage,
error class, message, shortened traceback, attempt count, original topic/partition/offset and
time. Previous ``dlq.*`` headers are dropped first, so they never grow across replays.

A replay (:mod:`pipeline.dlq`) strips the error headers again and adds ``dlq.replayed`` (the
replay id) and ``dlq.replayed.stage`` (the stage the record is replayed to); the rest of the
record (key, value, ``seq``, ``event-id``, other headers) is kept, so dedup recognises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections import Counter
from collections.abc import Sequence

PREFIX = "dlq."
STAGE = "dlq.stage"
ERROR_CLASS = "dlq.error.class"
ERROR_MESSAGE = "dlq.error.message"
TRACEBACK = "dlq.error.trace"
ATTEMPTS = "dlq.attempts"
TOPIC = "dlq.topic"
PARTITION = "dlq.partition"
OFFSET = "dlq.offset"
TIME = "dlq.time"
REPLAYED = "dlq.replayed"
REPLAYED_STAGE = "dlq.replayed.stage"
# A replay receipt, written to the dead-letter topic once a replay's records are durable: the
# dead letter it replayed (``partition@offset`` in the dead-letter topic). Not a dead letter.
RECEIPT = "dlq.receipt"
PARKED = "Parked"  # the error class of records parked behind a dead letter of their key

log = logging.getLogger("pipeline.runtime.handler")  # where the stage's other lines go

_MAX_MESSAGE = 1000
_MAX_TRACE = 2000


class Parked(Exception):  # named as the error class operators see: "Parked"
    """Why a record was parked: an earlier record of its key is a dead letter (park mode)."""


def error_class(exc: BaseException) -> str:
    """The name dead letters are grouped by (``DecodeError``, ``ValueError``, ...)."""
    return type(exc).__name__


def short_traceback(exc: BaseException, limit: int = 6) -> str:
    """The last frames of ``exc``'s traceback, cut to a header-friendly size."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-limit)
    text = "".join(lines)
    return text if len(text) <= _MAX_TRACE else "..." + text[-_MAX_TRACE:]


def dead_letter_headers(
    original: Sequence[tuple[str, bytes]],
    *,
    stage: str,
    exc: BaseException,
    attempts: int,
    topic: str,
    partition: int,
    offset: int,
) -> list[tuple[str, bytes]]:
    """The headers of a dead letter: the original ones (minus old ``dlq.*``) plus the error."""
    kept = strip_dead_letter_headers(original)
    message = str(exc)[:_MAX_MESSAGE]
    kept += [
        (STAGE, stage.encode()),
        (ERROR_CLASS, error_class(exc).encode()),
        (ERROR_MESSAGE, message.encode("utf-8", "replace")),
        (TRACEBACK, short_traceback(exc).encode("utf-8", "replace")),
        (ATTEMPTS, str(attempts).encode()),
        (TOPIC, topic.encode()),
        (PARTITION, str(partition).encode()),
        (OFFSET, str(offset).encode()),
        (TIME, str(int(time.time() * 1000)).encode()),
    ]
    return kept


def strip_dead_letter_headers(headers: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """``headers`` without any ``dlq.*`` header (error headers and old replay marks)."""
    return [(k, v) for k, v in headers if not k.startswith(PREFIX)]


def replay_headers(
    headers: Sequence[tuple[str, bytes]], *, replay_id: str, stage: str
) -> list[tuple[str, bytes]]:
    """The headers a dead letter is replayed with: the original ones plus the replay marks.

    Example:
        >>> replay_headers([("seq", b"1"), (ERROR_CLASS, b"ValueError")], replay_id="r", stage="s")
        [('seq', b'1'), ('dlq.replayed', b'r'), ('dlq.replayed.stage', b's')]
    """
    kept = strip_dead_letter_headers(headers)
    kept += [(REPLAYED, replay_id.encode()), (REPLAYED_STAGE, stage.encode())]
    return kept


def by_class(counts: Counter[str]) -> str:
    """``ValueError=3, DecodeError=2``: dead letters by error class, most first."""
    return ", ".join(f"{cls}={n}" for cls, n in counts.most_common()) or "none"


class ClassLog:
    """Logs a stage's dead letters by error class for operators, at most every ``interval``.

    The first dead letter after a quiet ``interval`` is logged at once; later ones within the
    interval are summed up in one line when it ends, so the last burst always gets a line.

    Example:
        >>> ClassLog("enrich").dead_lettered(Counter({"ValueError": 2}))  # logs at once
    """

    def __init__(self, stage: str, interval: float = 10.0) -> None:
        self.stage = stage
        self.counts: Counter[str] = Counter()
        self.interval = interval
        self._logged = -interval
        self._pending: asyncio.TimerHandle | None = None

    def dead_lettered(self, counts: Counter[str]) -> None:
        """A dead letter was counted in ``counts``: log now, or make sure a line follows soon."""
        self.counts = counts
        wait = self._logged + self.interval - time.monotonic()
        if wait <= 0:
            self._log()
        elif self._pending is None:
            with contextlib.suppress(RuntimeError):  # no event loop: the next dead letter logs
                self._pending = asyncio.get_running_loop().call_later(wait, self._log)

    def _log(self) -> None:
        self._pending = None
        self._logged = time.monotonic()
        total = sum(self.counts.values())
        log.warning(
            "stage %s: dead letters by error class: %s (%d in all)",
            self.stage, by_class(self.counts), total,
        )  # fmt: skip
