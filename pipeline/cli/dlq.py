"""``pipeline dlq list | show | replay``: thin commands over :mod:`pipeline.dlq`."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.cli.commands import BootstrapOpt, bootstrap_address
from pipeline.cli.console import console
from pipeline.loader import load_pipeline

out = console()
err = console(stderr=True)

RefArg = Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")]
StageArg = Annotated[str, typer.Argument(metavar="STAGE", help="Stage name.")]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--where",
        "-w",
        help="FIELD=VALUE[,VALUE...] (repeatable, all must match); fields: error_class, key, "
        "stage, topic, partition (the original input topic and partition), at (PARTITION@OFFSET "
        "in the dead-letter topic: one dead letter).",
    ),
]
_REPLAY_EPILOG = (
    "Reads the dead-letter topic up to the end offsets found at the start; each dead letter is "
    "replayed at most once per run. Replaying again is harmless: the stage drops what it "
    "already processed as duplicates."
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")]
LaneOpt = Annotated[
    str | None,
    typer.Option(help="The priority lane (its topic), for a stage that reads several."),
]


def register(app: typer.Typer) -> None:
    """Add ``pipeline dlq ...`` to the ``pipeline`` CLI."""
    dlq_app = typer.Typer(
        help="Inspect and replay a stage's dead letters (topic P.S.dlq).", no_args_is_help=True
    )
    app.add_typer(dlq_app, name="dlq")
    dlq_app.command("list")(list_dead_letters)
    dlq_app.command("show")(show_dead_letters)
    dlq_app.command("replay", epilog=_REPLAY_EPILOG)(replay_dead_letters)


def list_dead_letters(
    ref: RefArg,
    stage: StageArg,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
    lane: LaneOpt = None,
) -> None:
    """Count a stage's dead letters by error class, overall and per partition."""
    from pipeline.dlq import summarize

    pipeline = load_pipeline(ref)
    summary = asyncio.run(summarize(bootstrap_address(bootstrap), pipeline, stage, lane))
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
        return
    parts = sorted(summary.by_partition)
    title = f"dead letters of stage '{stage}' ({summary.topic}): {summary.total}"
    if summary.replayed:
        title += f", {summary.replayed} of them replayed"
    table = Table(title=title)
    table.add_column("error class")
    table.add_column("total", justify="right")
    table.add_column("replayed", justify="right")
    for p in parts:
        table.add_column(f"partition {p}", justify="right")
    for cls, n in summary.by_class.most_common():
        replayed = str(summary.replayed_by_class.get(cls, 0))
        table.add_row(cls, str(n), replayed, *(str(summary.by_partition[p][cls]) for p in parts))
    out.print(table)


def show_dead_letters(
    ref: RefArg,
    stage: StageArg,
    limit: Annotated[int, typer.Option(help="Show at most N dead letters.")] = 20,
    where: WhereOpt = None,
    trace: Annotated[bool, typer.Option(help="Print each dead letter's traceback.")] = False,
    bootstrap: BootstrapOpt = None,
    lane: LaneOpt = None,
) -> None:
    """Show a stage's dead letters: error headers, and the value decoded where possible."""
    from pipeline.dlq import Where, show

    pipeline = load_pipeline(ref)
    filt = Where.parse(where or ())
    found = asyncio.run(
        show(bootstrap_address(bootstrap), pipeline, stage, limit=limit, where=filt, lane=lane)
    )
    for record, value in found:
        origin = record.origin
        where_from = f"{origin[0]}/{origin[1]}@{origin[2]}" if origin else "unknown origin"
        key = (record.key or b"").decode("utf-8", "replace")
        out.print(
            f"[bold]{record.partition}@{record.offset}[/] key={key} "
            f"[red]{record.error_class}[/] after {record.attempts} attempt(s), from {where_from}",
            highlight=False,
        )
        out.print(f"  message: {_cut(record.error_message)}", highlight=False, markup=False)
        shown = value if isinstance(value, str) else json.dumps(value, default=repr)
        out.print(f"  value:   {_cut(shown)}", highlight=False, markup=False)
        others = [k for k, _ in record.headers if not k.startswith("dlq.")]
        out.print(f"  headers: {', '.join(others) or 'none'} (+ dlq.*)", highlight=False)
        if trace and record.trace:
            out.print("  " + record.trace.rstrip().replace("\n", "\n  "), markup=False)
    where_text = "" if not filt.terms else f" where {filt}"
    out.print(f"shown {len(found)} dead letter(s){where_text} (limit {limit})", highlight=False)


def replay_dead_letters(
    ref: RefArg,
    stage: StageArg,
    where: WhereOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be replayed; publish nothing.")
    ] = False,
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
    lane: LaneOpt = None,
) -> None:
    """Re-publish a stage's dead letters to its input topic (error headers stripped)."""
    from pipeline.dlq import Where, replay

    pipeline = load_pipeline(ref)
    filt = Where.parse(where or ())
    address = bootstrap_address(bootstrap)

    async def go() -> Any:
        with Progress(
            TextColumn("dry run" if dry_run else "replaying"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=as_json,
        ) as bar:
            task = bar.add_task("replay", total=None)

            def progress(read: int, total: int) -> None:
                bar.update(task, completed=read, total=total)

            return await replay(
                address, pipeline, stage, where=filt, dry_run=dry_run, progress=progress,
                lane=lane,
            )  # fmt: skip

    report = asyncio.run(go())
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    verb = "would replay" if dry_run else "replayed"
    out.print(
        f"replay {report.replay_id} of stage '{stage}' ({filt}) to {report.topic}: "
        f"read {report.read}, matched {report.matched}, {verb} {report.replayed}, "
        f"skipped {report.skipped}" + (" (dry run: nothing published)" if dry_run else ""),
        highlight=False,
    )
    if report.by_class:
        table = Table()
        table.add_column("error class")
        table.add_column(verb, justify="right")
        for cls, n in report.by_class.most_common():
            table.add_row(cls, str(n))
        out.print(table)


def _cut(text: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters (``--trace`` shows the whole story)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
