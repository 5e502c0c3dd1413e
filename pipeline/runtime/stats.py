"""Per-stage counters: cheap increments on the hot path, read by logs, the CLI and the demo."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline.runtime.deadletter import by_class


@dataclass(slots=True)
class StageStats:
    """Counts of what happened to a stage's records.

    Every input record ends as exactly one of: output (``processed``), filtered out,
    duplicate, or dead letter; ``consumed`` is their sum once the stage is idle.
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
    dead_by_error: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

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
            "dead_by_error": dict(self.dead_by_error),
            "records_per_s": round(self.rate(), 1),
        }
