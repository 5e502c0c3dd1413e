"""Per-stage counters: cheap increments on the hot path, read by logs, the CLI and the demo."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline.runtime.deadletter import by_class


class Buckets:
    """A histogram fed once per batch or commit (never per record): cumulative bucket counts
    and a sum, as Prometheus histograms expose them.

    Example:
        >>> h = Buckets((0.1, 1.0))
        >>> h.observe(0.05, count=3); h.observe(0.5)
        >>> h.counts, h.total, round(h.sum, 2)
        ([3, 4], 4, 0.65)
    """

    __slots__ = ("bounds", "counts", "sum", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # observations <= each bound (cumulative)
        self.sum = 0.0
        self.total = 0

    def observe(self, value: float, count: int = 1) -> None:
        """Record ``count`` observations of ``value`` (a batch's per-record mean, e.g.)."""
        self.total += count
        self.sum += value * count
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += count


#: Bucket bounds in seconds: per-record handling times, commits, end-to-end latencies.
RECORD_SECONDS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
COMMIT_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: What a worker is doing (``StageStats.state``); only ``running`` is ready.
STATES = ("starting", "setup", "restoring", "running", "paused", "probing", "stopped", "failed")


@dataclass(slots=True)
class StageStats:
    """Counts of what happened to a stage's records.

    Every input record ends as exactly one of: output (``processed``), filtered out,
    duplicate, or dead letter; ``consumed`` is their sum once the stage is idle (records the
    breaker holds are counted once they are handled for good).
    """

    stage: str
    consumed: int = 0
    processed: int = 0  # inputs that produced one or more outputs
    produced: int = 0  # output records written
    filtered: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    retries: int = 0
    gaps: int = 0
    commits: int = 0
    restored: int = 0  # changelog records read back into the state table
    restore_seconds: float = 0.0
    skipped: int = 0  # records passed over by an explicit offset reset (out of range)
    held: int = 0  # records held now, waiting for the breaker's verdict (a gauge)
    ids_held: int = 0  # event ids the dedup table remembers now (a gauge)
    in_flight: int = 0  # records being handled now (key lanes: queued or running; a gauge)
    pauses: int = 0  # times the breaker paused the stage (a dependency was down)
    writers_evicted: int = 0  # writers forgotten because of DedupPolicy.max_writers
    ids_evicted: int = 0  # event ids forgotten because of DedupPolicy.max_ids
    broker_errors: int = 0  # transient broker errors retried (this process's clients)
    recoveries: int = 0  # commits that failed and were started over from the committed offsets
    reachable: bool = True  # False: no broker reachable for longer than unreachable_after
    state: str = "starting"  # one of STATES
    dead_by_error: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    # Histograms, fed per batch (inline worker) and per commit: see pipeline.ops.metrics.
    handle_seconds: Buckets = field(default_factory=lambda: Buckets(RECORD_SECONDS))
    commit_seconds: Buckets = field(default_factory=lambda: Buckets(COMMIT_SECONDS))
    latency_seconds: Buckets = field(default_factory=lambda: Buckets(LATENCY_SECONDS))

    @property
    def ready(self) -> bool:
        """Whether the worker runs normally: set up, restored, not paused by the breaker,
        and reaching a broker."""
        return self.state == "running" and self.reachable

    def rate(self) -> float:
        """Consumed records per second since start."""
        elapsed = time.monotonic() - self.started
        return self.consumed / elapsed if elapsed > 0 else 0.0

    def summary(self) -> str:
        """One log line of the counters."""
        return (
            f"in {self.consumed}, out {self.produced}, filtered {self.filtered}, "
            f"duplicates {self.duplicates}, dead letters {self.dead_letters}"
            + (f" ({by_class(self.dead_by_error)})" if self.dead_by_error else "")
            + f", {self.rate():.0f} rec/s"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "stage": self.stage,
            "consumed": self.consumed,
            "processed": self.processed,
            "produced": self.produced,
            "filtered": self.filtered,
            "duplicates": self.duplicates,
            "dead_letters": self.dead_letters,
            "retries": self.retries,
            "gaps": self.gaps,
            "commits": self.commits,
            "restored": self.restored,
            "restore_seconds": round(self.restore_seconds, 3),
            "skipped": self.skipped,
            "held": self.held,
            "ids_held": self.ids_held,
            "in_flight": self.in_flight,
            "pauses": self.pauses,
            "writers_evicted": self.writers_evicted,
            "ids_evicted": self.ids_evicted,
            "broker_errors": self.broker_errors,
            "recoveries": self.recoveries,
            "reachable": self.reachable,
            "state": self.state,
            "ready": self.ready,
            "dead_by_error": dict(self.dead_by_error),
            "records_per_s": round(self.rate(), 1),
        }
