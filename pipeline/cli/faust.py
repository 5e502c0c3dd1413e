"""``pipeline faust``: run stages as agents of a faust-streaming app, with Faust's worker.

The same as ``faust -A MODULE:app worker`` on a module holding
``app = faust_app(pipeline, stages, bootstrap)``, without writing that module.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.commands import BootstrapOpt, bootstrap_address
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.loader import load_pipeline


def register(app: typer.Typer) -> None:
    app.command("faust")(faust)


def faust(
    ref: Annotated[str, typer.Argument(metavar="MODULE:PIPELINE")],
    stage: Annotated[list[str], typer.Option("--stage", "-s", help="Stage to run.")],
    bootstrap: BootstrapOpt = None,
    stats_file: Annotated[Path | None, typer.Option(help="Write JSON counters here.")] = None,
    commit_interval: Annotated[
        float, typer.Option(help="Seconds between Faust's offset commits.")
    ] = 1.0,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run stages as agents of a faust-streaming app (Faust's own worker; needs the
    'faust' extra). The app's id is the stage's consumer group, so its offsets, lag and
    dead letters are the stage's as with 'pipeline run'."""
    try:
        from pipeline.faust import FaustOptions, faust_app
    except ImportError as exc:
        raise ConfigError(
            "pipeline faust needs faust-streaming: pip install 'kafka-pipeline[faust]'"
        ) from exc
    pipeline = load_pipeline(ref)
    options = FaustOptions(
        commit_interval=commit_interval, stats_file=stats_file, datadir=Settings().home / "faust"
    )
    app = faust_app(pipeline, stage, bootstrap_address(bootstrap), options=options)
    level = log_level.upper()
    logging.getLogger("pipeline").setLevel(level)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # as pipeline run
    # Faust's worker command parses its own arguments: the web server is off (the
    # framework's stages report through their stats file and the broker's offsets).
    sys.argv = ["pipeline faust", "worker", "--without-web", "--loglevel", level.lower()]
    app.main()
