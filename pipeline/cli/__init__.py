"""The ``pipeline`` command: thin; it parses arguments and calls the public API.

- :mod:`.kafka`: ``pipeline kafka ...``, the local broker or cluster;
- :mod:`.commands`: ``run``, ``graph``, ``topics``, ``publish``, ``tail``, ``deploy``;
- :mod:`.dlq`: ``pipeline dlq ...``, dead letters and their replay;
- :mod:`.status`: ``pipeline status``, lag, rates, instances and their health;
- :mod:`.up`: ``pipeline up``, every stage as a supervised process.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import typer

from pipeline.cli import commands, dlq, kafka, status, up
from pipeline.cli.console import console
from pipeline.errors import PipelineError

app = typer.Typer(
    help="Pipes-and-filters stream processing on Apache Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(kafka.app, name="kafka")
commands.register(app)
dlq.register(app)
status.register(app)
up.register(app)

err = console(stderr=True)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="On an error, print the traceback too.")
    ] = False,
) -> None:
    if debug:
        os.environ["PIPELINE_DEBUG"] = "1"


def main() -> None:
    """Entry point: run the CLI, turning framework errors into one readable paragraph."""
    try:
        app()
    except PipelineError as exc:
        if os.environ.get("PIPELINE_DEBUG"):
            traceback.print_exception(exc)
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
