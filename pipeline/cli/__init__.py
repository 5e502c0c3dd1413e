"""The ``pipeline`` command: thin; it parses arguments and calls the public API.

- :mod:`.kafka`: ``pipeline kafka ...``, the local broker or cluster;
- :mod:`.commands`: ``run``, ``graph``, ``topics``, ``publish``, ``tail``, ``deploy``;
- :mod:`.dlq`: ``pipeline dlq ...``, dead letters and their replay;
- :mod:`.status`: ``pipeline status``, lag, rates, instances and their health;
- :mod:`.up`: ``pipeline up``, every stage as a supervised process.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from pipeline.cli import commands, dlq, kafka, status, up
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

err = Console(stderr=True)


def main() -> None:
    """Entry point: run the CLI, turning framework errors into one readable paragraph."""
    try:
        app()
    except PipelineError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
