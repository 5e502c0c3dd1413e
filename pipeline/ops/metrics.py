"""Prometheus metrics of a process's stage workers, read from their stats at scrape time.

Names follow Prometheus conventions (a ``pipeline_`` prefix, ``_total`` counters, base units
in seconds, ``pipeline`` and ``stage`` labels on everything):

========================================  ====================================================
``pipeline_records_total{outcome}``       inputs by how they ended: processed, filtered,
                                          duplicate, dead_letter
``pipeline_records_consumed_total``       inputs read
``pipeline_records_produced_total``       output records written
``pipeline_dead_letters_total{error}``    dead letters by error class
``pipeline_retries_total``                retries of the stage function
``pipeline_sequence_gaps_total``          sequence gaps seen (per writer)
``pipeline_commits_total``                commits (or transactions)
``pipeline_broker_errors_total``          transient broker errors retried
``pipeline_recoveries_total``             commits failed on the broker, started over
``pipeline_restored_records_total``       changelog records read back into state
``pipeline_ready``                        1 when set up, restored, running, reaching a broker
``pipeline_state{state}``                 1 for the worker's current state
``pipeline_records_held``                 records the breaker holds now
``pipeline_records_in_flight``            records being handled now
``pipeline_restore_seconds``              time spent restoring state so far (with the
                                          restored-records counter: restore progress)
``pipeline_assigned_partitions``          input partitions assigned to this worker
``pipeline_lag_records{partition}``       records behind the partition's end (high watermark)
``pipeline_record_handle_seconds``        histogram: handling time per record (per batch mean)
``pipeline_commit_seconds``               histogram: commit or transaction time
``pipeline_end_to_end_latency_seconds``   histogram: record timestamp to handled (per batch)
========================================  ====================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pipeline.runtime.stats import STATES, Buckets, StageStats

if TYPE_CHECKING:
    from pipeline.runtime.worker import StageWorker

_LABELS = ["pipeline", "stage"]

_COUNTERS = (
    ("pipeline_records_consumed", "Input records read.", "consumed"),
    ("pipeline_records_produced", "Output records written.", "produced"),
    ("pipeline_retries", "Retries of the stage function.", "retries"),
    ("pipeline_sequence_gaps", "Sequence gaps seen, per writer.", "gaps"),
    ("pipeline_commits", "Commits (transactions under exactly-once).", "commits"),
    ("pipeline_broker_errors", "Transient broker errors retried.", "broker_errors"),
    ("pipeline_recoveries", "Commits failed on the broker and started over.", "recoveries"),
    ("pipeline_restored_records", "Changelog records read back into state.", "restored"),
)
_OUTCOMES = (
    ("processed", "processed"),
    ("filtered", "filtered"),
    ("duplicate", "duplicates"),
    ("dead_letter", "dead_letters"),
)


class StageCollector(Collector):
    """Yields the metrics of ``workers`` whenever the registry is collected (scraped).

    Args:
        workers: The process's stage workers.
        lags: Partition lags per worker, gathered just before the scrape (see
            :func:`pipeline.ops.http.serve`); empty when unknown.
    """

    def __init__(self, workers: Sequence[StageWorker]) -> None:
        self.workers = workers
        self.lags: dict[str, dict[int, int]] = {}

    def collect(self) -> Iterator[Metric]:
        workers = [(w.node.pipeline, w.node.label, w.gauges(), w) for w in self.workers]
        outcomes = CounterMetricFamily(
            "pipeline_records", "Input records by how they ended.", labels=[*_LABELS, "outcome"]
        )
        for pipe, stage, stats, _ in workers:
            for outcome, attr in _OUTCOMES:
                outcomes.add_metric([pipe, stage, outcome], getattr(stats, attr))
        yield outcomes
        for name, doc, attr in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=_LABELS)
            for pipe, stage, stats, _ in workers:
                family.add_metric([pipe, stage], getattr(stats, attr))
            yield family
        dead = CounterMetricFamily(
            "pipeline_dead_letters", "Dead letters by error class.", labels=[*_LABELS, "error"]
        )
        for pipe, stage, stats, _ in workers:
            for error, count in sorted(stats.dead_by_error.items()):
                dead.add_metric([pipe, stage, error], count)
        yield dead
        yield from self._gauges(workers)
        yield from self._histograms(workers)

    def _gauges(
        self, workers: Iterable[tuple[str, str, StageStats, StageWorker]]
    ) -> Iterator[Metric]:
        ready = GaugeMetricFamily("pipeline_ready", "1 when the worker is ready.", labels=_LABELS)
        state = GaugeMetricFamily(
            "pipeline_state", "1 for the worker's current state.", labels=[*_LABELS, "state"]
        )
        held = GaugeMetricFamily(
            "pipeline_records_held", "Records the breaker holds now.", labels=_LABELS
        )
        in_flight = GaugeMetricFamily(
            "pipeline_records_in_flight", "Records being handled now.", labels=_LABELS
        )
        restoring = GaugeMetricFamily(
            "pipeline_restore_seconds",
            "Seconds spent restoring state from the changelog so far.",
            labels=_LABELS,
        )
        assigned = GaugeMetricFamily(
            "pipeline_assigned_partitions", "Input partitions assigned.", labels=_LABELS
        )
        lag = GaugeMetricFamily(
            "pipeline_lag_records",
            "Records behind the end of an input partition.",
            labels=[*_LABELS, "partition"],
        )
        for pipe, stage, stats, worker in workers:
            ready.add_metric([pipe, stage], 1.0 if stats.ready else 0.0)
            for name in STATES:
                state.add_metric([pipe, stage, name], 1.0 if stats.state == name else 0.0)
            held.add_metric([pipe, stage], stats.held)
            in_flight.add_metric([pipe, stage], stats.in_flight)
            restoring.add_metric([pipe, stage], stats.restore_seconds)
            assigned.add_metric([pipe, stage], len(worker.transport.assignment()))
            for partition, behind in sorted(self.lags.get(stage, {}).items()):
                lag.add_metric([pipe, stage, str(partition)], behind)
        yield from (ready, state, held, in_flight, restoring, assigned, lag)

    def _histograms(
        self, workers: Iterable[tuple[str, str, StageStats, StageWorker]]
    ) -> Iterator[Metric]:
        specs = (
            ("pipeline_record_handle_seconds", "Handling time per record.", "handle_seconds"),
            ("pipeline_commit_seconds", "Commit or transaction time.", "commit_seconds"),
            (
                "pipeline_end_to_end_latency_seconds",
                "From the record's timestamp to its handling.",
                "latency_seconds",
            ),
        )
        listed = list(workers)
        for name, doc, attr in specs:
            family = HistogramMetricFamily(name, doc, labels=_LABELS)
            for pipe, stage, stats, _ in listed:
                h: Buckets = getattr(stats, attr)
                buckets = [(_le(b), float(c)) for b, c in zip(h.bounds, h.counts, strict=True)]
                buckets.append(("+Inf", float(h.total)))
                family.add_metric([pipe, stage], buckets, h.sum)
            yield family


def _le(bound: float) -> str:
    return repr(float(bound))
