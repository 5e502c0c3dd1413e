"""Dead letters: the original record, untouched, plus headers that say what went wrong.

A dead letter keeps the original key, value and headers, and adds ``dlq.*`` headers: stage,
error class, message, shortened traceback, attempt count, original topic/partition/offset and
time. Previous ``dlq.*`` headers are dropped first, so they never grow across replays.
"""

from __future__ import annotations

import time
import traceback
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

_MAX_MESSAGE = 1000
_MAX_TRACE = 2000


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
    kept = [(k, v) for k, v in original if not k.startswith(PREFIX)]
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
