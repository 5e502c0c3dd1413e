"""Summaries of repeated runs, the printed table, and the JSON files in ``bench/results``."""

from __future__ import annotations

import json
import statistics
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS, RunResult


def summarize(runs: Sequence[RunResult]) -> dict[str, Any]:
    """Best and median of a contender's runs (best = highest records/s among good runs)."""
    good = [r for r in runs if r.records_per_s is not None and r.verified]
    out: dict[str, Any] = {
        "runs": [r.as_dict() for r in runs],
        "best_records_per_s": None,
        "median_records_per_s": None,
        "seconds": None,
        "records": None,
        "error": None,
    }
    if not good:
        errors = [r.error or _unverified(r) for r in runs]
        out["error"] = "; ".join(dict.fromkeys(errors)) or "no run"
        return out
    best = max(good, key=lambda r: r.records_per_s or 0.0)
    rates = [r.records_per_s or 0.0 for r in good]
    out.update(
        best_records_per_s=round(best.records_per_s or 0.0, 1),
        median_records_per_s=round(statistics.median(rates), 1),
        seconds=round(best.seconds or 0.0, 4),
        records=best.records,
    )
    return out


def _unverified(r: RunResult) -> str:
    return (
        f"{r.contender}: broker shows {r.output_records} output records and "
        f"{r.committed_records} committed offsets for {r.records} records"
    )


def ratio(
    summaries: dict[str, dict[str, Any]], a: str, b: str, which: str = "best"
) -> float | None:
    """``a``'s best (or median) records/s over ``b``'s (None when either has no good run)."""
    x = summaries.get(a, {}).get(f"{which}_records_per_s")
    y = summaries.get(b, {}).get(f"{which}_records_per_s")
    return round(x / y, 3) if x and y else None


def table(title: str, summaries: dict[str, dict[str, Any]], baseline: str | None) -> str:
    """A plain-text table of every contender's figures."""
    head = (
        f"{'contender':<16}{'best rec/s':>12}{'median rec/s':>14}{'records':>10}"
        f"{'seconds':>10}{'runs':>6}{'vs ' + (baseline or '-'):>20}  verified"
    )
    lines = [title, head, "-" * len(head)]
    for name, s in summaries.items():
        if s["error"]:
            lines.append(f"{name:<16}{'FAILED':>12}  {s['error']}")
            continue
        vs = ratio(summaries, name, baseline) if baseline else None
        verified = all(r["verified"] for r in s["runs"])
        lines.append(
            f"{name:<16}{s['best_records_per_s']:>12,.0f}{s['median_records_per_s']:>14,.0f}"
            f"{s['records']:>10,}{s['seconds']:>10.3f}{len(s['runs']):>6}"
            f"{'' if vs is None else f'{vs:.3f}':>20}  {'yes' if verified else 'NO'}"
        )
    return "\n".join(lines)


def write(name: str, data: dict[str, Any], directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def finish(
    name: str,
    doc: dict[str, Any],
    title: str,
    contender: str,
    baseline: str,
    directory: Path = RESULTS,
) -> Path:
    """Print a two-contender benchmark's table and ratio, write its JSON; returns the file."""
    print()
    print(table(title, doc["contenders"], baseline))
    print(f"ratio {contender}/{baseline}: {doc['ratio']}")
    path = write(name, doc, directory)
    print(f"[{name}] results: {path}")
    return path


async def pair(
    name: str,
    contenders: tuple[str, str],
    run_one: Callable[[str], Awaitable[RunResult]],
    *,
    repeat: int,
    target: float,
    conditions: dict[str, Any],
    title: str,
    results: Path,
) -> dict[str, Any]:
    """Alternate two contenders (baseline first), then report ``candidate / baseline`` against
    ``target``: the table, the ratio, ``results/<name>.json``; return the document."""
    from bench.common import alternate, machine

    baseline, candidate = contenders
    runs = await alternate(name, contenders, repeat, run_one)
    summaries = {contender: summarize(found) for contender, found in runs.items()}
    value = ratio(summaries, candidate, baseline)
    doc = {
        "benchmark": name,
        "ratio": value,
        "ratio_of_medians": ratio(summaries, candidate, baseline, "median"),
        "targets": {f"ratio_at_least_{target}": None if value is None else value >= target},
        "conditions": {
            **conditions,
            "repeat": repeat,
            "timing": "first records received -> commit covering the last record",
            **machine(),
        },
        "contenders": summaries,
    }
    print()
    print(table(title, summaries, baseline))
    print(f"ratio {candidate}/{baseline}: {value}")
    path = write(name, doc, results)
    print(f"[{name}] results: {path}")
    return doc
