"""A stage's dead letters: count, show and replay them (the logic behind ``pipeline dlq``).

Every stage has a dead-letter topic (``P.S.dlq``) that holds the original records with
``dlq.*`` error headers (:mod:`pipeline.runtime.deadletter`). This module reads it from the
beginning to the end offsets it finds when it starts (``read_committed``, so dead letters of an
exactly-once stage whose transaction did not commit are never seen), and:

- :func:`summarize` counts dead letters by error class and by partition;
- :func:`show` returns the first few, decoded with the stage's input schema where possible;
- :func:`replay` re-publishes the ones that match a :class:`Where` filter to the stage's input
  topic through an idempotent producer. A replayed record keeps its key, value and headers
  (so its ``seq`` and ``event-id``), loses the old ``dlq.*`` error headers (they never grow
  across replays) and gains ``dlq.replayed`` (this run's replay id) and ``dlq.replayed.stage``.

Within one run, a dead letter is replayed at most once: copies with the same origin (input
topic, partition, offset) are skipped. Across runs, replaying again re-publishes the same
records; the stage's dedup table recognises those it already processed and counts them as
duplicates (see :mod:`pipeline.runtime.parking`), while those that failed again are processed.

Example:
    >>> report = await replay(bootstrap, pipeline, "enrich",     # doctest: +SKIP
    ...                       where=Where.parse(["error_class=ValueError"]))
    >>> report.replayed                                          # doctest: +SKIP
    12
"""

from pipeline.dlq.kafka import decode_value, read_dead_letters, replay, show, summarize
from pipeline.dlq.records import (
    DeadLetterRecord,
    DlqSummary,
    Replay,
    ReplayItem,
    ReplayReport,
    Where,
)
from pipeline.runtime.parking import new_replay_id

__all__ = [
    "DeadLetterRecord",
    "DlqSummary",
    "Replay",
    "ReplayItem",
    "ReplayReport",
    "Where",
    "decode_value",
    "new_replay_id",
    "read_dead_letters",
    "replay",
    "show",
    "summarize",
]
