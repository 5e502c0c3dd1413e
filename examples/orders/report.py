"""The demo's summary: per-stage counts and rates, latency, expected vs observed, and checks.

Every number here is counted twice, independently: by the stages (their stats files) and by
the broker (records that arrived in each topic during the run). The checks say whether the
two agree and whether every record is accounted for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from examples.orders.workload import Expected

# Where the pipeline's stages put the faults the workload injects.
FAULTS = (
    ("retransmissions dropped", "validate", "duplicates", "duplicates"),
    ("undecodable bytes dead-lettered", "validate", "undecodable", "DecodeError"),
    ("invalid orders dead-lettered", "validate", "invalid", "InvalidOrderError"),
    ("unknown customers dead-lettered", "enrich", "unknown_customer", "MissingEntry"),
    ("fraud-flagged orders held (filtered)", "fraud", "flagged", "filtered"),
)


@dataclass(slots=True)
class StageResult:
    """What one stage did in the run, by its own counters and by the broker's offsets."""

    name: str
    stats: dict[str, Any]  # the stage's final StageStats.as_dict()
    arrived: int  # records that arrived in its input topic during the run
    written: int  # records that arrived in its output topic
    dead_written: int  # records that arrived in its dead-letter topic
    leftover: int = 0  # input left unconsumed by an earlier run, consumed in this one
    active_s: float = 0.0  # from the first to the last change of its counters
    cpu_s: float | None = None  # CPU time the process spent while records flowed
    exit_code: int | None = None

    def count(self, key: str) -> int:
        """A counter of the stage (0 when missing)."""
        return int(self.stats.get(key, 0) or 0)

    @property
    def dead_by_class(self) -> dict[str, int]:
        """Dead letters by error class."""
        found = self.stats.get("dead_by_error") or {}
        return {str(k): int(v) for k, v in sorted(found.items())}

    @property
    def accounted(self) -> int:
        """Inputs that ended as output, filter-out, duplicate or dead letter."""
        return sum(self.count(k) for k in ("processed", "filtered", "duplicates", "dead_letters"))


@dataclass(frozen=True, slots=True)
class Latency:
    """Percentiles of one end-to-end latency, in milliseconds."""

    label: str
    samples: int
    p50: float
    p99: float
    maximum: float

    @classmethod
    def of(cls, label: str, values: Sequence[float]) -> Latency | None:
        """Percentiles of ``values`` (nearest rank), or None when there are none."""
        if not values:
            return None
        ordered = sorted(values)

        def rank(q: float) -> float:
            return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

        return cls(label, len(ordered), rank(0.50), rank(0.99), ordered[-1])


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the verdict."""

    name: str
    ok: bool | None  # None: not applicable in this run
    detail: str


@dataclass(slots=True)
class Outcome:
    """Everything the summary shows."""

    published: int
    publish_s: float
    drain_s: float
    stages: list[StageResult]
    outbox: int  # confirmations that arrived in the outbox during the run
    outbox_distinct: int  # distinct order ids among them
    expected: Expected
    latencies: list[Latency] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageResult:
        """The result of stage ``name``."""
        return next(s for s in self.stages if s.name == name)

    @property
    def leftover(self) -> int:
        """Records an earlier run left unconsumed in any stage's input, consumed in this one."""
        return sum(s.leftover for s in self.stages)


Confirmation = tuple[dict[str, Any], int | None]  # (value, broker append time or None)


def latencies(confirmations: Sequence[Confirmation]) -> list[Latency]:
    """End-to-end latencies of the confirmations: from ``placed_at`` to the broker's append
    to the outbox, and to notify's ``confirmed_at``."""
    appended = [t - c["placed_at"] for c, t in confirmations if t is not None]
    confirmed = [c["confirmed_at"] - c["placed_at"] for c, _ in confirmations]
    found = [
        Latency.of("placed -> outbox append (broker LogAppendTime)", appended),
        Latency.of("placed -> confirmation made (notify's clock)", confirmed),
    ]
    return [lat for lat in found if lat is not None]


def notes(*, paced: bool, confirmations: Sequence[Confirmation]) -> list[str]:
    """What the reader of the summary should know about how it was measured."""
    found = [
        "customers: enrich is stages.enrich over a KafkaTable that each enrich process loads "
        "from the compacted topic orders.customers (1,000 rows, from a fixed seed)",
        "active s: from the first to the last change of the stage's stats file (rewritten "
        "once a second, so +-1 s); CPU s: the stage process's CPU time while records flowed, "
        "so rec/s CPU is what one core sustains for that stage",
    ]
    if confirmations and all(t is None for _, t in confirmations):
        found.append(
            "the outbox topic existed before with CreateTime timestamps: only notify's clock "
            "measures latency (delete the topic to get the broker's LogAppendTime)"
        )
    if not paced:
        found.append(
            "orders were published as fast as possible, so latency is mostly time spent "
            "queued behind earlier orders; --rate N publishes N orders/s instead"
        )
    return found


def checks(outcome: Outcome) -> list[Check]:
    """Whether the numbers add up, stage by stage and for the whole pipeline."""
    found: list[Check] = []
    for s in outcome.stages:
        n_in, n_out = s.count("consumed"), s.count("produced")
        parts = (
            f"{n_in:,} = {s.count('processed'):,} + {s.count('filtered'):,} + "
            f"{s.count('duplicates'):,} + {s.count('dead_letters'):,}"
        )
        found += [
            Check(f"{s.name}: in = out + filtered + duplicates + dead letters",
                  n_in == s.accounted and s.count("processed") == n_out, parts),
            Check(f"{s.name}: in = records that arrived in its input topic",
                  n_in == s.arrived, f"{n_in:,} vs {s.arrived:,}"),
            Check(f"{s.name}: out = records written to its output topic",
                  n_out == s.written, f"{n_out:,} vs {s.written:,}"),
            Check(f"{s.name}: dead letters = records in its dead-letter topic",
                  s.count("dead_letters") == s.dead_written,
                  f"{s.count('dead_letters'):,} vs {s.dead_written:,}"),
            Check(f"{s.name}: process exited cleanly (code 0)", s.exit_code == 0,
                  f"exit code {s.exit_code}"),
        ]  # fmt: skip
    leftover = outcome.leftover
    entering = outcome.published + leftover
    gone = sum(s.count(k) for s in outcome.stages for k in ("filtered", "duplicates"))
    dead = sum(s.count("dead_letters") for s in outcome.stages)
    detail = (
        f"{outcome.published:,} published"
        + (f" + {leftover:,} left over" if leftover else "")
        + f" = {outcome.outbox:,} outbox + {gone:,} filtered/duplicates + {dead:,} dead letters"
    )
    found.append(
        Check("pipeline: published = outbox + filtered + duplicates + dead letters",
              entering == outcome.outbox + gone + dead, detail)
    )  # fmt: skip
    found.append(
        Check("outbox: one confirmation per order (no duplicates)",
              outcome.outbox == outcome.outbox_distinct,
              f"{outcome.outbox:,} records, {outcome.outbox_distinct:,} distinct orders")
    )  # fmt: skip
    for label, observed, expected in _faults(outcome):
        if leftover:
            found.append(Check(f"as injected: {label}", None, "n/a: leftovers of an earlier run"))
        else:
            found.append(
                Check(f"as injected: {label}", observed == expected,
                      f"{observed:,} observed, {expected:,} expected")
            )  # fmt: skip
    return found


def _faults(outcome: Outcome) -> list[tuple[str, int, int]]:
    """(label, observed, expected) for each kind of fault, and for the confirmations."""
    rows = []
    for label, stage, attr, counter in FAULTS:
        s = outcome.stage(stage)
        observed = s.dead_by_class.get(counter, 0) if counter[0].isupper() else s.count(counter)
        rows.append((label, observed, int(getattr(outcome.expected, attr))))
    rows.append(("confirmations in the outbox", outcome.outbox, outcome.expected.confirmed))
    return rows


def passed(found: list[Check]) -> bool:
    """All applicable checks hold."""
    return all(c.ok is not False for c in found)


def render(console: Console, outcome: Outcome, found: list[Check]) -> None:
    """Print the summary tables and the verdict."""
    console.print(_stage_table(outcome))
    if outcome.latencies:
        console.print(_latency_table(outcome))
    console.print(_checks_table(found))
    if outcome.leftover:
        console.print(
            f"[yellow]note:[/] {outcome.leftover:,} records an earlier run left unconsumed were "
            f"consumed in this one: they are in the stage rows and the pipeline totals, not in "
            f"the latencies nor the 'as injected' checks",
            highlight=False,
        )
    for note in outcome.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)
    if passed(found):
        console.print("[bold green]PASS[/]: every record is accounted for.")
    else:
        failed = sum(1 for c in found if c.ok is False)
        console.print(f"[bold red]FAIL[/]: {failed} check(s) failed (marked FAIL above).")


def _stage_table(outcome: Outcome) -> Table:
    rate = outcome.published / outcome.publish_s if outcome.publish_s else 0.0
    table = Table(
        title=(
            f"orders pipeline: {outcome.published:,} records published in "
            f"{outcome.publish_s:.1f}s ({rate:,.0f}/s), drained {outcome.drain_s:.1f}s later"
        ),
        box=box.SIMPLE_HEAVY,
    )
    for col in ("stage", "in", "out", "filtered", "duplicates", "dead letters"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    table.add_column("dead letters by class")
    for col in ("active s", "rec/s active", "CPU s", "rec/s CPU"):
        table.add_column(col, justify="right")
    sums = dict.fromkeys(("filtered", "duplicates", "dead_letters"), 0)
    for s in outcome.stages:
        for key in sums:
            sums[key] += s.count(key)
        n_in = s.count("consumed")
        by_class = ", ".join(f"{k} {v:,}" for k, v in s.dead_by_class.items()) or "-"
        table.add_row(
            s.name, f"{n_in:,}", f"{s.count('produced'):,}", f"{s.count('filtered'):,}",
            f"{s.count('duplicates'):,}", f"{s.count('dead_letters'):,}", by_class,
            f"{s.active_s:.1f}", f"{n_in / s.active_s:,.0f}" if s.active_s else "-",
            f"{s.cpu_s:.1f}" if s.cpu_s is not None else "-",
            f"{n_in / s.cpu_s:,.0f}" if s.cpu_s else "-",
        )  # fmt: skip
    table.add_section()
    entered = outcome.published + outcome.leftover
    table.add_row(
        "pipeline", f"{entered:,}", f"{outcome.outbox:,}", f"{sums['filtered']:,}",
        f"{sums['duplicates']:,}", f"{sums['dead_letters']:,}", "", "", "", "", "",
    )  # fmt: skip
    return table


def _latency_table(outcome: Outcome) -> Table:
    table = Table(title="end-to-end latency (ms)", box=box.SIMPLE_HEAVY)
    for col in ("from -> to", "orders", "p50", "p99", "max"):
        table.add_column(col, justify="left" if col == "from -> to" else "right")
    for lat in outcome.latencies:
        table.add_row(
            lat.label, f"{lat.samples:,}", f"{lat.p50:,.0f}", f"{lat.p99:,.0f}",
            f"{lat.maximum:,.0f}",
        )  # fmt: skip
    return table


def _checks_table(found: list[Check]) -> Table:
    table = Table(title="do the numbers add up?", box=box.SIMPLE_HEAVY)
    table.add_column("check")
    table.add_column("result")
    table.add_column("numbers")
    marks = {True: "[green]ok[/]", False: "[bold red]FAIL[/]", None: "[dim]n/a[/]"}
    for c in found:
        table.add_row(c.name, marks[c.ok], c.detail)
    return table
