"""``pipeline status MODULE:PIPELINE [--watch] [--json]``: lag, rates, instances, health."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table

from pipeline.cli.commands import BootstrapOpt, bootstrap_address
from pipeline.cli.console import console
from pipeline.loader import load_pipeline
from pipeline.ops.status import StageStatus, pipeline_status

out = console()


def register(app: typer.Typer) -> None:
    app.command("status")(status)


def status(
    ref: Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")],
    bootstrap: BootstrapOpt = None,
    watch: Annotated[bool, typer.Option(help="Keep refreshing until Ctrl-C.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON document (a line each with --watch).")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, help="Seconds between the two samples rates come from.")
    ] = 1.0,
) -> None:
    """Per stage: instances and their health, lag per partition, rates, dead letters."""
    pipeline = load_pipeline(ref)
    address = bootstrap_address(bootstrap)

    def once() -> list[StageStatus]:
        return asyncio.run(pipeline_status(address, pipeline, interval))

    if as_json:
        while True:
            doc = {"pipeline": pipeline.name, "stages": [s.as_dict() for s in once()]}
            sys.stdout.write(json.dumps(doc) + "\n")  # never wrapped, whatever the terminal
            sys.stdout.flush()
            if not watch:
                return
    if not watch:
        out.print(_table(pipeline.name, once()))
        return
    with Live(console=out, auto_refresh=False) as live:
        while True:
            live.update(_table(pipeline.name, once()), refresh=True)


def _table(name: str, statuses: list[StageStatus]) -> Table:
    table = Table(title=f"pipeline {name}", box=None, title_justify="left")
    for column in ("stage", "instances", "health", "lag", "per partition", "in/s", "out/s",
                   "dead letters"):  # fmt: skip
        table.add_column(column, justify="right" if column not in ("stage", "health") else "left")
    for s in statuses:
        health = ", ".join(
            f"{m.health}{'' if m.ready in (None, True) else ' (not ready)'}"
            for m in s.members
            if m.health
        )
        parts = " ".join(f"{p}:{v}" for p, v in sorted(s.lag.items()))
        table.add_row(
            s.stage, str(len(s.members)), health or "-", str(s.total_lag), parts,
            f"{s.in_per_s:,.0f}", "-" if s.out_per_s is None else f"{s.out_per_s:,.0f}",
            str(s.dead_letters),
        )  # fmt: skip
    return table
