"""``pipeline jobs submit | status | callbacks``: thin commands over :mod:`pipeline.jobs`."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from pipeline.cli.commands import BootstrapOpt, bootstrap_address
from pipeline.cli.console import console
from pipeline.errors import ConfigError, DefinitionError, JobFailedError
from pipeline.loader import load_pipeline

out = console()
err = console(stderr=True)

RefArg = Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")]


def register(app: typer.Typer) -> None:
    """Add ``pipeline jobs ...`` to the ``pipeline`` CLI."""
    jobs_app = typer.Typer(
        help="Submit jobs to a pipeline built with .with_jobs(); see their status; deliver "
        "their callbacks.",
        no_args_is_help=True,
    )
    app.add_typer(jobs_app, name="jobs")
    jobs_app.command("submit")(submit)
    jobs_app.command("status")(status)
    jobs_app.command("callbacks")(callbacks)


def _jobs_pipeline(ref: str) -> Any:
    pipeline = load_pipeline(ref)
    if pipeline.jobs is None:
        raise DefinitionError(
            f"pipeline '{pipeline.name}' ({ref}) does not track jobs: build it with .with_jobs()"
        )
    return pipeline


def submit(
    ref: RefArg,
    value: Annotated[str, typer.Argument(metavar="JSON", help="The event, a JSON object.")],
    wait: Annotated[
        float | None, typer.Option(help="Wait up to SECONDS for the job's end; print it.")
    ] = None,
    callback: Annotated[str | None, typer.Option(help="A URL the job's end is POSTed to.")] = None,
    job_id: Annotated[str | None, typer.Option(help="The job's id (default: random).")] = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Publish one event as a job; print its id (and, with --wait, its result)."""
    from pipeline.jobs import JobClient

    pipeline = _jobs_pipeline(ref)
    try:
        event = json.loads(value)
    except ValueError as exc:
        raise ConfigError(f"the event is not JSON: {exc}") from exc

    async def go() -> int:
        async with JobClient(bootstrap_address(bootstrap), pipeline) as client:
            job = await client.submit(event, job_id=job_id, callback=callback)
            out.print(job)
            if wait is None:
                return 0
            try:
                result = await client.result(job, timeout=wait)
            except JobFailedError as exc:
                err.print(f"[red]failed[/red]: {exc}")
                return 1
            except TimeoutError:
                err.print(f"no end within {wait:g}s; see 'pipeline jobs status {ref} {job}'")
                return 2
            out.print_json(json.dumps(result))
            return 0

    raise typer.Exit(asyncio.run(go()))


def status(
    ref: RefArg,
    job: Annotated[str, typer.Argument(metavar="JOB_ID")],
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a job's status from the pipeline's status table (exit code 1: unknown job)."""
    from pipeline.jobs import read_status

    pipeline = _jobs_pipeline(ref)
    found = asyncio.run(read_status(bootstrap_address(bootstrap), pipeline.jobs.status, job))
    if found is None:
        err.print(f"no job {job} in {pipeline.jobs.status}")
        raise typer.Exit(1)
    doc = found.as_dict()
    if as_json:
        out.print_json(json.dumps(doc))
        return
    table = Table(title=f"job {job}", show_header=False)
    for k, v in doc.items():
        if v in (None, False) or k == "job":
            continue
        shown = json.dumps(v) if isinstance(v, dict | list) else str(v)
        if k == "time":
            shown = datetime.fromtimestamp(v / 1000, UTC).isoformat(timespec="milliseconds")
        table.add_row(k, shown)
    out.print(table)


def callbacks(
    ref: RefArg,
    bootstrap: BootstrapOpt = None,
    attempts: Annotated[int, typer.Option(help="POSTs per job end before giving up.")] = 8,
) -> None:
    """Deliver each job's end to its callback URL (POST, retried, Idempotency-Key); run it
    beside the stages (``pipeline up`` does)."""
    from pipeline.ops.callbacks import CallbackPolicy, run_callbacks

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    pipeline = _jobs_pipeline(ref)
    asyncio.run(
        run_callbacks(bootstrap_address(bootstrap), pipeline, CallbackPolicy(attempts=attempts))
    )
